"""Long-form benchmark: `fireredasr-transcribe` on one long recording, VAD segments vs fixed 30 s windows.

Builds a recording of `--minutes` minutes from the demo model's held-out clips
(real espeak-ng speech with known transcripts) separated by silences and
background noise, `--silence` of it not speech, and runs the CLI twice in this
invocation, each a subprocess as users run it, on the same model:

- vad: the recording as one file; the CLI cuts it with Silero VAD (the default);
- fixed: the recording cut blindly every 30 s into files, each decoded whole
  (what a pipeline without a VAD does: every sample goes to the model).

Reported per mode: the audio seconds sent to the model, the number of clips, the
wall time of the whole CLI run and its real-time factor (wall / audio, model
load included and excluded), the tokens generated, and the word/character error
rate against the known transcripts; then the ratios vad / fixed.

    python benchmarks/longform.py                      # 20 min, 30% silence, the demo model
    python benchmarks/longform.py --model ./out        # any converted repo (e.g. a GPU run of LLM-L)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import soundfile as sf

from fireredasr_converter import spec
from fireredasr_converter.pipeline import convert
from fireredasr_vllm import demo
from fireredasr_vllm.audio_input import load_audio
from fireredasr_vllm.scoring import score
from fireredasr_vllm.transcript_formats import join_texts

WINDOW_SECONDS = 30


def build_recording(minutes: float, silence: float, seed: int) -> tuple[np.ndarray, str]:
    """Held-out clips in random order with gaps making up `silence` of the audio, and the spoken text."""
    rng = np.random.default_rng(seed)
    clips = [(load_audio(str(path)), text) for _, path, text in demo.heldout_clips()]
    speech_seconds = sum(len(a) for a, _ in clips) / spec.SAMPLE_RATE
    mean_gap = silence / (1 - silence) * speech_seconds / len(clips)
    parts, texts, total = [], [], 0
    while total < minutes * 60 * spec.SAMPLE_RATE:
        audio, text = clips[rng.integers(len(clips))]
        gap = np.zeros(int(rng.exponential(mean_gap) * spec.SAMPLE_RATE), dtype=np.float32)
        if rng.random() < 0.3:  # background noise instead of silence now and then
            gap = (0.005 * rng.standard_normal(len(gap))).astype(np.float32)
        parts += [gap, audio]
        texts.append(text)
        total += len(gap) + len(audio)
    return np.concatenate(parts), join_texts(texts)


def run_cli(model: Path, scp: Path, output: Path) -> tuple[float, str]:
    command = [sys.executable, "-m", "fireredasr_vllm.transcribe", "-m", str(model), "--wav-scp", str(scp),
               "-o", str(output), "--format", "jsonl", "--quiet"]  # fmt: skip
    start = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - start
    if completed.returncode != 0:
        raise click.ClickException(f"fireredasr-transcribe failed:\n{completed.stderr[-3000:]}")
    return wall, completed.stderr


def load_seconds(stderr: str) -> float:
    # The CLI's summary line ends with "(...; model load 12.3 s)".
    return float(stderr.rsplit("model load ", 1)[1].split(" s)", 1)[0])


@click.command()
@click.option("--model", type=click.Path(path_type=Path, file_okay=False),
              help="A converted repo [default: the demo model, converted here].")
@click.option("--minutes", type=float, default=20.0, show_default=True)
@click.option("--silence", type=click.FloatRange(0.0, 0.9), default=0.3, show_default=True,
              help="Share of the recording that is silence or noise.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), help="Keep the files here.")
def main(model, minutes, silence, seed, workdir):
    """Time the CLI on one long recording, with the VAD and with fixed 30 s windows."""
    work = Path(workdir or tempfile.mkdtemp(prefix="fireredasr-longform-"))
    work.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = work / "demo-fp32"
        if not model.exists():
            convert(demo.RELEASE_DIR, model, dtype="fp32")
    audio, spoken = build_recording(minutes, silence, seed)
    duration = len(audio) / spec.SAMPLE_RATE
    sf.write(work / "long.wav", audio, spec.SAMPLE_RATE, subtype="FLOAT")
    (work / "vad.scp").write_text(f"long {work / 'long.wav'}\n")
    windows = work / "windows"
    windows.mkdir(exist_ok=True)
    step = WINDOW_SECONDS * spec.SAMPLE_RATE
    lines = []
    for number, start in enumerate(range(0, len(audio), step)):
        path = windows / f"w{number:05d}.wav"
        sf.write(path, audio[start : start + step], spec.SAMPLE_RATE, subtype="FLOAT")
        lines.append(f"w{number:05d} {path}\n")
    (work / "fixed.scp").write_text("".join(lines))
    click.echo(f"recording: {duration / 60:.1f} min, {silence:.0%} silence or noise, model {model}")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    results = {}
    for mode in ("vad", "fixed"):
        output = work / f"{mode}.jsonl"
        wall, stderr = run_cli(model, work / f"{mode}.scp", output)
        records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        segments = [s for r in records for s in r["segments"]]
        text = join_texts([r["text"] for r in records])
        results[mode] = {
            "clips": len(segments),
            "sent": sum(s["end"] - s["start"] for s in segments),
            "wall": wall,
            "decode": wall - load_seconds(stderr),
            "tokens": sum(len(tokenizer(s["text"])["input_ids"]) for s in segments),
            "error": score({"all": spoken}, {"all": text}).total.error_rate,
        }
    click.echo(f"{'mode':6} {'clips':>6} {'audio sent':>11} {'wall s':>8} {'RTF':>7} {'RTF excl. load':>15} "
               f"{'text tokens':>12} {'error %':>8}")  # fmt: skip
    for mode, r in results.items():
        click.echo(f"{mode:6} {r['clips']:6d} {r['sent']:10.1f}s {r['wall']:8.1f} {r['wall'] / duration:7.4f} "
                   f"{r['decode'] / duration:15.4f} {r['tokens']:12d} {r['error']:8.2f}")  # fmt: skip
    vad, fixed = results["vad"], results["fixed"]
    click.echo(
        f"vad / fixed: audio sent {vad['sent'] / fixed['sent']:.2f}x, decode time {vad['decode'] / fixed['decode']:.2f}x, "
        f"whole run {vad['wall'] / fixed['wall']:.2f}x; error rate {vad['error']:.2f}% vs {fixed['error']:.2f}%"
    )


if __name__ == "__main__":
    main()
