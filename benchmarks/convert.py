"""Benchmark fireredasr-convert against a plain copy of the same input bytes.

Builds a synthetic release (default: the real FireRedASR-LLM-L shapes, 8.35 B
parameters, ~19 GB of inputs; `--scale` shrinks it), then in the same run:
copies every input file with shutil.copyfile, converts the release in a child
process, and copies again. Prints the times, the ratio of the conversion to the
faster copy, and the conversion's peak resident memory (the child's VmHWM,
which counts memory-mapped pages too).
Targets at full scale: peak RSS <= 3 GiB and conversion <= 2x the copy.

    python benchmarks/convert.py [--scale 0.25] [--workdir DIR] [--dtype bf16]

Needs about twice the input size of free disk in the work folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from fireredasr_converter.fixtures import LLM_L_SHAPES, build_release, scaled_shapes
from fireredasr_converter.release import discover_release

GIB = 2**30
PEAK_RSS_TARGET = 3 * GIB
TIME_RATIO_TARGET = 2.0

# Runs in the child: times convert() alone (imports excluded), then reports
# its own peak RSS from /proc, which includes file pages mapped in.
_CHILD = """
import json, sys, time
from pathlib import Path
from fireredasr_converter.pipeline import convert
start = time.perf_counter()
result = convert(Path(sys.argv[1]), Path(sys.argv[2]), dtype=sys.argv[3], quiet=False)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"seconds": seconds, "vm_hwm_kib": int(status["VmHWM"].split()[0]),
                  "total_size": result.total_size, "num_shards": result.num_shards}))
"""


def copy_inputs(files: list[Path], dest: Path) -> tuple[float, int]:
    """Copy the files with shutil.copyfile; (seconds, bytes)."""
    dest.mkdir()
    copied = 0
    start = time.perf_counter()
    for index, path in enumerate(files):
        shutil.copyfile(path, dest / f"{index:03d}-{path.name}")
        copied += path.stat().st_size
    return time.perf_counter() - start, copied


def convert_in_child(src: Path, out: Path, dtype: str) -> dict:
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(out), dtype], stdout=subprocess.PIPE, check=True, text=True
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    report["process_seconds"] = time.perf_counter() - start
    return report


@click.command()
@click.option("--scale", type=float, default=1.0, show_default=True, help="Shrink the LLM-L shapes (0 < F <= 1).")
@click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), help="Where to build (default: a temp folder)."
)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--keep", is_flag=True, help="Keep the release and the converted repo.")
def main(scale: float, workdir: Path | None, dtype: str, keep: bool) -> None:
    shapes = scaled_shapes(LLM_L_SHAPES, scale) if scale < 1 else LLM_L_SHAPES
    root = Path(tempfile.mkdtemp(prefix="fireredasr-bench-", dir=workdir))
    try:
        start = time.perf_counter()
        fixture = build_release(root / "release", shapes)
        click.echo(f"built the release at scale {scale:g} in {time.perf_counter() - start:.0f} s: {shapes}", err=True)
        # Exactly the files the conversion reads.
        input_files = discover_release(fixture.model_dir).input_files

        # The copy runs before and after the conversion; the faster one is the
        # baseline, so page-cache and background-load luck cannot flatter the ratio.
        copy_seconds = []
        for step in ("copy", "convert", "copy"):
            os.sync()
            if step == "copy":
                seconds, input_bytes = copy_inputs(input_files, root / "copy")
                copy_seconds.append(seconds)
                shutil.rmtree(root / "copy")
            else:
                report = convert_in_child(fixture.model_dir, root / "converted", dtype)
                if not keep:
                    shutil.rmtree(root / "converted")

        copy_best = min(copy_seconds)
        ratio = report["seconds"] / copy_best
        peak = report["vm_hwm_kib"] * 1024
        click.echo(
            f"scale {scale:g}: {input_bytes / 1e9:.2f} GB of inputs -> {report['total_size'] / 1e9:.2f} GB "
            f"of {dtype} weights in {report['num_shards']} shard(s)"
        )
        click.echo(
            f"plain copy of the inputs: {copy_seconds[0]:.1f} s before, {copy_seconds[1]:.1f} s after "
            f"({input_bytes / copy_best / 1e6:.0f} MB/s at best)"
        )
        click.echo(
            f"conversion: {report['seconds']:.1f} s (child process {report['process_seconds']:.1f} s with imports)"
        )
        click.echo(f"time ratio conversion / best copy: {ratio:.2f} (target <= {TIME_RATIO_TARGET:g})")
        click.echo(f"peak RSS of the conversion: {peak / GIB:.2f} GiB (target <= {PEAK_RSS_TARGET / GIB:g} GiB)")
    finally:
        if keep:
            click.echo(f"kept {root}", err=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
