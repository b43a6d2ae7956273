"""The Python API (`fireredasr_vllm.FireRedAsr`) on the shipped demo model.

Without an engine (the reference backend, one clip at a time): audio given as
paths or arrays, the options, the typed errors, a batch with broken files.
On the suite's shared demo engines: a three-minute recording's segments equal
`fireredasr-transcribe`'s JSON lines, and the original's recipe gives the
reference's token ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import speech_recording

from fireredasr_converter import spec
from fireredasr_vllm import (
    GREEDY,
    ORIGINAL_RECIPE,
    AudioError,
    Decoding,
    EngineError,
    FireRedAsr,
    SegmenterSettings,
    TimedText,
    TooLongForModel,
    TranscriptionError,
    TranscriptionFailed,
    demo,
)
from fireredasr_vllm.audio_input import load_audio
from fireredasr_vllm.errors import recording_error
from fireredasr_vllm.transcribe import EXIT_PARTIAL, main
from fireredasr_vllm.transcript_formats import join_texts

# Times are written rounded to the millisecond in JSON lines.
MILLISECOND = 3


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    """Four held-out clips and one said twice (where the recipe's repetition penalty matters)."""
    clips = {uttid: load_audio(str(path)) for uttid, path, _ in demo.heldout_clips()[:4]}
    first = next(iter(clips))
    clips[f"{first}-twice"] = np.concatenate([clips[first], clips[first]])
    return clips


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A three-minute recording of speech between silences and noise, a held-out clip, and broken files."""
    folder = tmp_path_factory.mktemp("api-audio")
    long, _, _ = speech_recording(180.0, seed=1)
    paths = {"long": folder / "long.wav", "short": demo.HELDOUT_DIR / "heldout00001-zh.wav"}
    sf.write(paths["long"], long, spec.SAMPLE_RATE, subtype="FLOAT")
    paths["corrupt"] = folder / "corrupt.wav"
    paths["corrupt"].write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    paths["too_short"] = folder / "too_short.wav"
    sf.write(paths["too_short"], np.zeros(400, dtype=np.float32), spec.SAMPLE_RATE)
    paths["missing"] = folder / "missing.wav"
    return paths


@pytest.fixture(scope="module")
def reference_asr(demo_fp32):
    """The API on the plain PyTorch reference: no engine."""
    return FireRedAsr(demo_fp32, backend="reference")


# --- without an engine ------------------------------------------------------------


def test_a_clip_as_a_path_or_an_array_gives_the_reference_transcript(reference_asr, demo_reference, clips):
    uttid, samples = next(iter(clips.items()))
    expected = demo_reference.transcribe([samples])[0]
    for audio in (str(demo.HELDOUT_DIR / f"{uttid}.wav"), (samples, spec.SAMPLE_RATE)):
        segments, info = reference_asr.transcribe(audio)
        assert info.duration == len(samples) / spec.SAMPLE_RATE == info.duration_after_vad
        assert (info.language, info.decoding, info.vad) == (None, GREEDY, SegmenterSettings(max_seconds=30.0))
        # Decoded whole, as the original does: one segment over the whole clip.
        assert list(segments) == [TimedText(0.0, info.duration, expected.text, tuple(expected.token_ids))]


def test_an_array_at_another_rate_is_resampled_as_a_file_is(reference_asr, clips, tmp_path):
    samples = next(iter(clips.values()))
    at_8k = samples[::2].copy()
    path = tmp_path / "8k.wav"
    sf.write(path, at_8k, 8000, subtype="FLOAT")
    from_file = list(reference_asr.transcribe(str(path))[0])
    from_array = list(reference_asr.transcribe((at_8k, 8000))[0])
    assert from_array == from_file and from_file[0].text


@pytest.mark.parametrize(
    ("audio", "error", "message"),
    [
        ((np.zeros((2, 16000), np.float32), 16000), AudioError, "give mono samples as a 1-D numpy array"),
        ((np.zeros(16000, np.int16), 16000), AudioError, "give floating-point samples"),
        ((np.zeros(16000, np.float32), 0), AudioError, "sampling rate must be a positive integer"),
        ((np.full(16000, np.nan, np.float32), 16000), AudioError, "NaN or infinite samples"),
        ((np.zeros(100, np.float32), 16000), AudioError, "audio is too short"),
        ((np.zeros(0, np.float32), 16000), AudioError, "holds no samples"),
        (np.zeros(16000, np.float32), TypeError, "a bare array has no sampling rate"),
        (16000, TypeError, "give a file path or"),
    ],
    ids=["stereo", "int16", "rate", "nan", "too-short", "empty", "bare-array", "number"],
)
def test_bad_audio_is_refused_before_decoding_with_a_typed_error(reference_asr, audio, error, message):
    with pytest.raises(error, match=message) as raised:
        reference_asr.transcribe(audio)
    assert "\n" not in str(raised.value)


def test_bad_options_are_refused(reference_asr, clips):
    audio = (next(iter(clips.values())), spec.SAMPLE_RATE)
    with pytest.raises(ValueError, match="over the model's clip limit"):
        reference_asr.transcribe(audio, vad=SegmenterSettings(max_seconds=40.0))
    with pytest.raises(ValueError, match="segment must be one of"):
        reference_asr.transcribe(audio, segment="never")
    with pytest.raises(TypeError, match="decoding must be"):
        reference_asr.transcribe(audio, decoding={"beam_size": 3})


def test_a_folder_that_is_no_converted_repo_is_the_clis_error(tmp_path, monkeypatch):
    # The CLI sets vLLM's logging variables for its process; here they end with the test.
    for name in ("VLLM_LOGGING_STREAM", "VLLM_LOGGING_LEVEL"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    with pytest.raises(TranscriptionFailed, match=r"cannot load .*; pass a converted repo") as raised:
        FireRedAsr(tmp_path)
    result = CliRunner().invoke(main, ["-m", str(tmp_path), str(demo.HELDOUT_DIR / "heldout00000-en.wav")])
    assert f"error: {raised.value}\n" in result.output


def test_many_recordings_with_broken_ones_in_input_order(reference_asr, files, demo_reference, clips):
    heard = []
    inputs = {name: files[name] for name in ("corrupt", "short", "missing", "too_short")}
    inputs["array"] = (next(iter(clips.values())), spec.SAMPLE_RATE)
    results = list(reference_asr.transcribe_many(inputs, on_audio=heard.append))
    assert [key for key, _ in results] == list(inputs)
    results = dict(results)
    assert isinstance(results["corrupt"], AudioError) and "unreadable audio" in str(results["corrupt"])
    assert isinstance(results["missing"], AudioError) and "no such file" in str(results["missing"])
    assert isinstance(results["too_short"], AudioError) and "audio is too short" in str(results["too_short"])
    for key in ("short", "array"):
        (segment,) = results[key].segments
        samples = load_audio(str(files["short"])) if key == "short" else inputs["array"][0]
        assert segment.token_ids == tuple(demo_reference.transcribe([samples])[0].token_ids)
        assert results[key].text == segment.text and results[key].info.duration == len(samples) / spec.SAMPLE_RATE
    # Progress hears every second of the recordings that were transcribed.
    assert sum(heard) == pytest.approx(results["short"].info.duration + results["array"].info.duration, abs=1e-9)
    # As they finish: the same results, keyed the same way.
    unordered = dict(reference_asr.transcribe_many(inputs, ordered=False))
    assert {k: str(v) if isinstance(v, Exception) else v for k, v in unordered.items()} == {
        k: str(v) if isinstance(v, Exception) else v for k, v in results.items()
    }
    # A list is keyed by position.
    assert [key for key, _ in reference_asr.transcribe_many([files["short"], files["missing"]])] == [0, 1]


def test_refusals_become_typed_errors_with_the_same_message():
    from vllm.exceptions import VLLMValidationError

    too_long = VLLMValidationError(
        "The decoder prompt (length 1100) is longer than the maximum model length of 1024. Make sure that "
        "`max_model_len` is no smaller than the number of text tokens plus multimodal tokens."
    )
    cases = [(too_long, TooLongForModel), (ValueError("audio is too long: 31.00 s"), AudioError),
             (VLLMValidationError("The decoder prompt cannot be empty"), EngineError)]  # fmt: skip
    for error, kind in cases:
        typed = recording_error(error)
        assert type(typed) is kind and str(typed) == str(error) and typed.__cause__ is error
        assert isinstance(typed, TranscriptionError)
    already = AudioError("x: unreadable audio")
    assert recording_error(already) is already


# --- on the suite's demo engines ---------------------------------------------------


@pytest.fixture(scope="module")
def engine_asr(demo_llm):
    """The API around the suite's greedy demo engine (the one `fireredasr-transcribe` builds by default)."""
    return FireRedAsr(demo_llm)


@pytest.mark.vllm
def test_a_long_recording_equals_the_clis_json_lines(engine_asr, files, demo_fp32, shared_engines, tmp_path):
    segments, info = engine_asr.transcribe(str(files["long"]))
    got = list(segments)
    output = tmp_path / "out.jsonl"
    names = ["long", "corrupt", "short", "missing"]
    result = CliRunner().invoke(main, ["-m", str(demo_fp32), *map(str, (files[n] for n in names)), "-f", "jsonl",
                                       "-o", str(output), "-q"])  # fmt: skip
    assert result.exit_code == EXIT_PARTIAL, result.output
    (record, short) = map(json.loads, output.read_text(encoding="utf-8").splitlines())
    assert record["uttid"] == "long" and len(got) == len(record["segments"]) > 3
    assert record["segments"] == [
        {"start": round(s.start, MILLISECOND), "end": round(s.end, MILLISECOND), "text": s.text} for s in got
    ]
    assert record["text"] == join_texts([s.text for s in got])
    assert record["duration"] == round(info.duration, MILLISECOND) and info.duration >= 180.0
    assert 0 < info.duration_after_vad < info.duration
    assert all(s.token_ids for s in got)

    # The same recordings through transcribe_many: the broken ones carry the message the CLI printed.
    results = dict(engine_asr.transcribe_many({n: files[n] for n in names}))
    for name in ("corrupt", "missing"):
        assert isinstance(results[name], AudioError)
        assert f"skipped {name}: {results[name]}\n" in result.output
    assert results["long"].segments == tuple(got)
    assert [s.text for s in results["short"].segments] == [s["text"] for s in short["segments"]]


@pytest.mark.vllm
def test_a_penalty_on_an_engine_without_the_processor_is_refused(engine_asr, clips):
    audio = (next(iter(clips.values())), spec.SAMPLE_RATE)
    with pytest.raises(ValueError, match=r"penalty_processor=True.*FireRedAsr\(model, decoding=\.\.\.\)"):
        engine_asr.transcribe(audio, decoding=ORIGINAL_RECIPE)


@pytest.mark.vllm
def test_the_recipe_through_the_api_gives_the_reference_ids(recipe_llm, demo_reference, clips):
    asr = FireRedAsr(recipe_llm, decoding=ORIGINAL_RECIPE)
    results = dict(asr.transcribe_many({uttid: (samples, spec.SAMPLE_RATE) for uttid, samples in clips.items()}))
    for uttid, samples in clips.items():
        expected = demo_reference.generate_ids(samples, num_beams=3, repetition_penalty=3.0, length_penalty=1.0)
        (segment,) = results[uttid].segments
        assert segment.token_ids == tuple(expected), uttid
        assert results[uttid].info.decoding == ORIGINAL_RECIPE
    # Another decoding per call, on the same engine: greedy, the reference's greedy ids.
    uttid = next(uttid for uttid in clips if uttid.endswith("-twice"))
    segments, _ = asr.transcribe((clips[uttid], spec.SAMPLE_RATE), decoding=Decoding())
    assert [s.token_ids for s in segments] == [tuple(demo_reference.generate_ids(clips[uttid]))]


@pytest.mark.vllm
def test_segments_are_decoded_as_they_are_asked_for_and_stopping_early_leaves_the_engine_clean(engine_asr, demo_llm, files):
    engine = demo_llm.llm_engine
    segments, info = engine_asr.transcribe(str(files["long"]))
    # Read and segmented, nothing sent to the engine yet.
    assert info.duration_after_vad > 0 and engine.get_num_unfinished_requests() == 0
    first = next(segments)
    assert first.start >= 0 and engine.get_num_unfinished_requests() > 0  # the later segments are in flight
    segments.close()
    assert engine.get_num_unfinished_requests() == 0
    many = engine_asr.transcribe_many([files["short"], files["long"]])
    key, result = next(many)
    assert key == 0 and result.segments
    many.close()
    assert engine.get_num_unfinished_requests() == 0
    # The engine serves the next call as usual.
    assert list(engine_asr.transcribe(str(files["short"]))[0]) == list(result.segments)
