"""The demo model: a tiny FireRedASR-LLM trained here on synthetic digit speech, shipped in the original layout.

`assets/` holds what `python -m fireredasr_vllm.demo.train` wrote: the release
(`FireRedASR-LLM-L/` with its `Qwen2-7B-Instruct` link, and the Qwen2 folder
beside it) and `heldout/` (16 kHz WAVs, Kaldi `wav.scp` and `text`). It recognises
digit strings of 3-8 digits read digit by digit in English or Mandarin. The
random-weight fixture builder stays the tool for parity tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
RELEASE_DIR = ASSETS / "FireRedASR-LLM-L"
HELDOUT_DIR = ASSETS / "heldout"


def heldout_clips() -> list[tuple[str, Path, str]]:
    """(uttid, wav path, reference transcript) of every held-out clip, in `wav.scp` order."""
    texts = dict(
        line.split("\t", 1) for line in (HELDOUT_DIR / "text").read_text(encoding="utf-8").splitlines() if line
    )
    clips = []
    for line in (HELDOUT_DIR / "wav.scp").read_text(encoding="utf-8").splitlines():
        if line:
            uttid, path = line.split(maxsplit=1)
            clips.append((uttid, HELDOUT_DIR / path, texts[uttid]))
    return clips
