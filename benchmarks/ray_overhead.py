"""Ray-path benchmark: `fireredasr-transcribe` with one engine vs `--engine ray` with 1, 2, ... replicas.

Runs the CLI once per mode in this invocation, each a subprocess as users run
it, over the same wav.scp of the demo model's held-out clips (repeated to
`--clips`), writing Kaldi text to a pipe that is read line by line:

- single: `--engine vllm`, one engine in the process;
- ray xN: `--engine ray --num-replicas N` (a local Ray cluster the CLI starts,
  or `--ray-address` to use a running one, e.g. `auto` on a GPU cluster).

Reported per mode: the whole run's wall time (Ray start, engine loads and
reading included), utterances/s over the whole run, and utterances/s between
the first and the last transcript written (engine loads excluded: steady
state, meaningful when each replica gets several batches of `--batch-size`
files); then each Ray mode's ratios to the single engine. The transcripts of
every mode must be identical; the script fails otherwise.

    python benchmarks/ray_overhead.py                                  # 256 clips, single vs ray x1, x2
    python benchmarks/ray_overhead.py --model ./out --clips 20000 --replicas 1,2,4,8 --ray-address auto
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from fireredasr_converter.pipeline import convert
from fireredasr_vllm import demo


MIN_SPREAD_SECONDS = 1.0


def demo_model(work: Path) -> Path:
    """The demo model converted to fp32 in `work` (kept there for the next invocation)."""
    path = work / "demo-fp32"
    if not path.exists():
        convert(demo.RELEASE_DIR, path, dtype="fp32")
    return path


def write_scp(folder: Path, clips: int) -> Path:
    """`clips` utterances cycling through the held-out clips, each id unique."""
    heldout = demo.heldout_clips()
    scp = folder / "wav.scp"
    scp.write_text("".join(f"u{n:06d} {heldout[n % len(heldout)][1]}\n" for n in range(clips)), encoding="utf-8")
    return scp


def timed_run(command: list[str]) -> dict:
    """Run the CLI with the transcripts on a pipe; when each line came, and the whole run's wall time."""
    start = time.monotonic()
    # stderr to a file: a pipe read only after stdout ends blocks the CLI once it fills.
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as stderr_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        lines, times = [], []
        for line in process.stdout:
            lines.append(line)
            times.append(time.monotonic() - start)
        returncode = process.wait()
        stderr_file.seek(0)
        stderr = stderr_file.read()
    if returncode != 0:
        raise click.ClickException(f"{' '.join(command[3:])} failed:\n{stderr[-3000:]}")
    wall = time.monotonic() - start
    # Lines that all come within a second (one engine batch) give no steady rate: too few clips per engine.
    spread = times[-1] - times[0] if times else 0.0
    steady = (len(times) - 1) / spread if spread >= MIN_SPREAD_SECONDS else float("nan")
    return {"lines": lines, "wall": wall, "overall": len(lines) / wall, "steady": steady}


@click.command()
@click.option("--model", type=click.Path(path_type=Path, file_okay=False),
              help="A converted repo [default: the demo model, converted here].")
@click.option("--clips", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--replicas", default="1,2", show_default=True, help="Replica counts to run with --engine ray.")
@click.option("--ray-address", help="A running Ray cluster (`auto`: the one `ray start` runs here) [default: a local one].")
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), help="Keep the files here.")
def main(model, clips, replicas, ray_address, tensor_parallel_size, batch_size, workdir):
    """Utterances/s of the single engine and of Ray replicas on the same clips, and their ratios."""
    counts = [int(n) for n in replicas.split(",")]
    work = Path(workdir or tempfile.mkdtemp(prefix="fireredasr-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    model = model or demo_model(work)
    scp = write_scp(work, clips)
    base = [sys.executable, "-m", "fireredasr_vllm.transcribe", "-m", str(model), "--wav-scp", str(scp), "-q",
            "--batch-size", str(batch_size), "--tensor-parallel-size", str(tensor_parallel_size)]  # fmt: skip
    modes = {"single": base}
    for count in counts:
        address = ["--ray-address", ray_address] if ray_address else []
        modes[f"ray x{count}"] = [*base, "--engine", "ray", "--num-replicas", str(count), *address]
    click.echo(f"{clips} clips, model {model}")

    results = {}
    for name, command in modes.items():
        results[name] = timed_run(command)
        click.echo(f"{name:8} {results[name]['wall']:8.1f} s  {results[name]['overall']:8.2f} utt/s overall  "
                   f"{results[name]['steady']:8.2f} utt/s first to last line")  # fmt: skip
    single = results.pop("single")
    for name, result in results.items():
        if result["lines"] != single["lines"]:
            raise click.ClickException(f"{name} wrote other transcripts than the single engine")
        click.echo(f"{name} / single: overall {result['overall'] / single['overall']:.2f}x, "
                   f"first to last line {result['steady'] / single['steady']:.2f}x")  # fmt: skip
    click.echo("transcripts identical in every mode")
    if any(math.isnan(r["steady"]) for r in (single, *results.values())):
        click.echo("nan: every line came within a second; give more --clips per engine for a steady rate")


if __name__ == "__main__":
    main()
