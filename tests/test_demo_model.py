"""The shipped demo model recognises speech end to end: release -> fireredasr-convert -> vLLM.

`fireredasr_vllm.demo` holds a tiny FireRedASR-LLM trained on digit strings read by
espeak-ng in English and Mandarin, in the original release layout, with held-out
clips (unseen voices and digit strings). Unlike the random-weight fixtures it stops
on `<|im_end|>` by itself, so these tests see the regime real models live in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer
from vllm_helpers import CPU_ENGINE_ENV

from fireredasr_converter import spec
from fireredasr_converter.pipeline import convert
from fireredasr_converter.stock_vllm import STOCK_VLLM_TARGET
from fireredasr_vllm import demo
from fireredasr_vllm.offline import stream_transcriptions, transcribe
from fireredasr_vllm.scoring import main as score_main
from fireredasr_vllm.scoring import score
from fireredasr_vllm.audio_input import load_audio

pytestmark = pytest.mark.vllm

# The bound for greedy decoding of the held-out set (English by words, Mandarin by characters).
MAX_ERROR_RATE = 5.0
STOCK_WORKER = Path(__file__).resolve().parent / "stock_vllm_worker.py"


# Session scope: conftest runs this module's tests on the shared demo engine after the
# others, and these would otherwise be made again for them.
@pytest.fixture(scope="session")
def heldout() -> dict[str, tuple[np.ndarray, str]]:
    clips = {uttid: (load_audio(str(path)), text) for uttid, path, text in demo.heldout_clips()}
    assert len(clips) >= 20
    assert {uttid.rsplit("-", 1)[-1] for uttid in clips} == {"en", "zh"}
    return clips


@pytest.fixture(scope="session")
def repos(demo_fp32, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("demo")
    converted = {"fp32": demo_fp32, "bf16": folder / "demo-bf16", "stock": folder / "demo-stock"}
    convert(demo.RELEASE_DIR, converted["bf16"], dtype="bf16")
    convert(demo.RELEASE_DIR, converted["stock"], dtype="fp32", target=STOCK_VLLM_TARGET)
    return converted


def vllm_transcripts(llm, heldout) -> dict[str, object]:
    results = dict(stream_transcriptions(llm, ((uttid, clip) for uttid, (clip, _) in heldout.items())))
    assert not [uttid for uttid, result in results.items() if isinstance(result, Exception)]
    return results


def error_rate(heldout, hypotheses: dict[str, str]) -> float:
    return score({uttid: text for uttid, (_, text) in heldout.items()}, hypotheses).total.error_rate


@pytest.fixture(scope="module")
def fp32_results(demo_llm, heldout):
    return vllm_transcripts(demo_llm, heldout)


def test_fp32_transcripts_are_accurate_and_end_on_im_end(fp32_results, repos, heldout):
    eos = AutoTokenizer.from_pretrained(repos["fp32"]).convert_tokens_to_ids(spec.EOS_TOKEN)
    for uttid, result in fp32_results.items():
        # The model stopped by itself, well before the N-token limit.
        assert result.token_ids[-1] == eos, (uttid, result.token_ids)
        limit = spec.speech_embedding_count_for_samples(len(heldout[uttid][0]))
        assert len(result.token_ids) < limit
    assert error_rate(heldout, {uttid: r.text for uttid, r in fp32_results.items()}) <= MAX_ERROR_RATE


def test_reference_gives_the_same_ids(fp32_results, demo_reference, heldout):
    for uttid, (clip, _) in heldout.items():
        assert demo_reference.generate_ids(clip) == fp32_results[uttid].token_ids, uttid


def test_fireredasr_score_computes_the_error_rate(fp32_results, heldout, tmp_path):
    hypotheses = tmp_path / "hyp"
    hypotheses.write_text("".join(f"{uttid}\t{fp32_results[uttid].text}\n" for uttid in heldout), encoding="utf-8")
    result = CliRunner().invoke(score_main, [str(demo.HELDOUT_DIR / "text"), str(hypotheses), "--summary-only"])
    assert result.exit_code == 0, result.output
    expected = error_rate(heldout, {uttid: r.text for uttid, r in fp32_results.items()})
    assert f"CER/WER {expected:.2f}%" in result.output


def test_bf16_conversion_is_as_accurate(repos, heldout, engines):
    results = vllm_transcripts(engines.get(repos["bf16"], dtype="bfloat16"), heldout)
    assert error_rate(heldout, {uttid: r.text for uttid, r in results.items()}) <= MAX_ERROR_RATE


def test_stock_vllm_export_reaches_the_same_error_rate(repos, heldout, fp32_results, tmp_path, engines):
    """Stock vLLM's FireRedASR2 (no plugin) on the same release: every clip is under 30 s."""
    engines.close()  # the stock engine runs in a process of its own: one engine alive at a time
    np.savez(tmp_path / "clips.npz", **{uttid: clip for uttid, (clip, _) in heldout.items()})
    job = {
        "repo": str(repos["stock"]),
        "clips": str(tmp_path / "clips.npz"),
        "max_tokens": {uttid: spec.speech_embedding_count_for_samples(len(clip)) for uttid, (clip, _) in heldout.items()},
        "solo": list(heldout)[:1],  # the worker reports the prompt of its first solo clip
        "batched": list(heldout),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, **CPU_ENGINE_ENV, "VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    completed = subprocess.run(
        [sys.executable, str(STOCK_WORKER), str(tmp_path / "job.json"), str(tmp_path / "result.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    batched = json.loads((tmp_path / "result.json").read_text())["batched"]
    tokenizer = AutoTokenizer.from_pretrained(repos["stock"])
    stock_texts = {uttid: tokenizer.decode(batched[uttid]["token_ids"], skip_special_tokens=True) for uttid in heldout}
    plugin_rate = error_rate(heldout, {uttid: r.text for uttid, r in fp32_results.items()})
    assert error_rate(heldout, stock_texts) <= max(MAX_ERROR_RATE, plugin_rate)


def test_stereo_clips_in_either_axis_order_get_the_mono_transcript(demo_llm, heldout):
    """The token limit comes from the samples, not `len()`: 2 for a channels-first (2, N) clip
    (which then stopped after one token)."""
    clips = [clip for clip, _ in list(heldout.values())[:2]]
    llm = demo_llm
    mono = transcribe(llm, clips)
    channels_first = transcribe(llm, [np.stack([clip, clip]) for clip in clips])
    channels_last = transcribe(llm, [np.stack([clip, clip], axis=1) for clip in clips])
    with pytest.raises(TypeError, match=r"\(key, waveform\) pairs.*enumerate"):
        list(stream_transcriptions(llm, clips))
    assert all(len(text.split()) > 1 or len(text) > 1 for text in mono)
    assert channels_first == mono and channels_last == mono


def test_the_server_takes_zh_or_en_and_joins_chunk_texts_with_one_separator():
    from fireredasr_vllm.model import FireRedAsrLlmForConditionalGeneration as Model

    assert Model.validate_language(None) == "zh" and Model.validate_language("en") == "en"
    with pytest.raises(ValueError, match=r"language 'fr'.*'zh' or 'en'"):
        Model.validate_language("fr")
    # vLLM joins chunk texts with " " for English: a chunk's own edge spaces would double it.
    assert " ".join(Model.post_process_output(text) for text in ("two one ", " eight")) == "two one eight"
