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
    from ..scoring import read_kaldi_text
    from ..audio_input import read_wav_scp

    texts = read_kaldi_text(HELDOUT_DIR / "text")
    # The shipped wav.scp lists paths relative to its folder.
    return [(u.uttid, HELDOUT_DIR / u.path, texts[u.uttid]) for u in read_wav_scp(HELDOUT_DIR / "wav.scp")]
