"""The model's transcription-endpoint settings and vLLM's use of them, without a server.

vLLM's `/v1/audio/transcriptions` takes its long-upload splitting, its resampling
and its chunk separators from the model's `SpeechToTextConfig` and
`validate_language`. These tests run vLLM's own splitter, resampler and
separator choice on that config, so they hold for every supported vLLM's Python
files (the 0.34 lane runs them too: no engine, no `VllmConfig`);
tests/test_vllm_serve.py checks the running server against them.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
from vllm.config import SpeechToTextConfig
from vllm.entrypoints.speech_to_text.base.serving import asr_inter_chunk_separator
from vllm.multimodal.audio import AudioResampler, split_audio

from fireredasr_converter import spec
from fireredasr_converter.configuration import FireRedAsrLlmConfig
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_vllm.model import FireRedAsrLlmForConditionalGeneration, FireRedAsrLlmProcessingInfo

# Long uploads: vLLM's transcription endpoint splits audio longer than the model's
# max_audio_seconds (30 s for the fixture) with the model's SpeechToTextConfig.

MAX_CLIP_SAMPLES = 30 * spec.SAMPLE_RATE
MIN_CLIP_SAMPLES = spec.min_samples_for_one_embedding()


@pytest.fixture(scope="module")
def stt_config(converted_fp32):
    """The model's SpeechToTextConfig, as the server builds it (no engine needed)."""
    model_config = types.SimpleNamespace(
        model=str(converted_fp32),
        revision=None,
        hf_config=FireRedAsrLlmConfig.from_pretrained(converted_fp32),
    )
    return FireRedAsrLlmForConditionalGeneration.get_speech_to_text_config(model_config, "transcribe")


def server_chunks(samples: np.ndarray, config) -> list[np.ndarray]:
    """The chunks the server cuts an upload into: vLLM's own splitter with the model's config."""
    return split_audio(
        audio_data=samples,
        sample_rate=int(config.sample_rate),
        max_clip_duration_s=config.max_audio_clip_s,
        overlap_duration_s=config.overlap_chunk_second,
        min_energy_window_size=config.min_energy_split_window_size,
    )


def test_long_uploads_are_chunked_at_max_audio_seconds(stt_config):
    assert stt_config.allow_audio_chunking
    assert stt_config.max_audio_clip_s == 30
    assert stt_config.min_energy_split_window_size >= MIN_CLIP_SAMPLES


def _quiet_before_each_boundary(num_samples: int, window: int) -> np.ndarray:
    """Loud noise, except one silent window as late as vLLM's splitter can cut.

    The cut lands at the start of the quietest window ending at or before each
    30 s boundary; a silent window right before the boundary pulls the cut as
    late as it can go, which leaves the shortest possible tail.
    """
    audio = np.random.default_rng(5).uniform(-0.5, 0.5, num_samples).astype(np.float32)
    for boundary in range(MAX_CLIP_SAMPLES, num_samples, MAX_CLIP_SAMPLES):
        audio[boundary - 2 * window : boundary] = 0.0
    return audio


@pytest.mark.parametrize("tail", [1, 320, 1039, 1600], ids=["1-sample", "20ms", "min-1", "100ms"])
@pytest.mark.parametrize("signal", ["speech", "silence", "quiet-at-boundary"])
def test_vllm_splitter_never_leaves_a_chunk_the_processor_refuses(signal, tail, stt_config):
    # A tail of a few samples past 30 s (or past 60 s) must not become a chunk
    # shorter than the model's minimum clip, nor may any chunk exceed 30 s.
    window = stt_config.min_energy_split_window_size
    for num_samples in (MAX_CLIP_SAMPLES + tail, 2 * MAX_CLIP_SAMPLES + tail):
        audio = {
            "speech": lambda: synthetic_speech(num_samples, seed=21),
            "silence": lambda: np.zeros(num_samples, dtype=np.float32),
            "quiet-at-boundary": lambda: _quiet_before_each_boundary(num_samples, window),
        }[signal]()
        chunks = server_chunks(audio, stt_config)
        lengths = [chunk.shape[0] for chunk in chunks]
        assert len(chunks) == num_samples // MAX_CLIP_SAMPLES + 1
        assert sum(lengths) == num_samples
        assert min(lengths) > window >= MIN_CLIP_SAMPLES, lengths
        assert max(lengths) <= MAX_CLIP_SAMPLES, lengths
        if signal == "quiet-at-boundary":
            # The case this signal builds did happen: the cut took the silent window.
            assert MAX_CLIP_SAMPLES - 2 * window <= lengths[0] <= MAX_CLIP_SAMPLES - window


@pytest.mark.parametrize(
    ("language", "separator"),
    [(None, ""), ("zh", ""), ("en", " ")],
)
def test_chunk_texts_are_joined_by_language(language, separator):
    # vLLM picks the separator from the validated language (and the model's
    # no-space languages); a request without a language is taken as Chinese.
    model = FireRedAsrLlmForConditionalGeneration
    assert asr_inter_chunk_separator(model.validate_language(language), model.no_space_languages) == separator


@pytest.mark.parametrize("language", ["not-a-language", "fr"])
def test_other_languages_are_refused(language):
    # vLLM itself only warns for a known language the model does not list (fr).
    with pytest.raises(ValueError, match=rf"language '{language}': .*pass language 'zh' or 'en'"):
        FireRedAsrLlmForConditionalGeneration.validate_language(language)


def test_uploads_are_resampled_as_offline_requests_are(stt_config, converted_fp32):
    """vLLM 0.34+: the endpoint resamples uploads with the resampler the model's data parser uses offline.

    Before 0.34 the config has no such field and the endpoint's audio decoder
    resamples; the config then carries nothing that vLLM would refuse.
    """
    if "audio_resample_method" not in {field.name for field in dataclasses.fields(SpeechToTextConfig)}:
        assert not hasattr(stt_config, "audio_resample_method")
        pytest.skip("this vLLM's transcription endpoint has no resampler choice (added in 0.34)")
    ctx = types.SimpleNamespace(model_config=types.SimpleNamespace(model=str(converted_fp32), revision=None))
    offline = FireRedAsrLlmProcessingInfo(ctx).get_data_parser().audio_resampler
    assert stt_config.audio_resample_method == offline.method == "pyav"
    assert stt_config.sample_rate == offline.target_sr == spec.SAMPLE_RATE
    # The two paths then give the model the same samples for a 44.1 kHz upload.
    audio = synthetic_speech(44100, seed=3)
    served = AudioResampler(target_sr=stt_config.sample_rate, method=stt_config.audio_resample_method)
    np.testing.assert_array_equal(served.resample(audio, orig_sr=44100), offline.resample(audio, orig_sr=44100))
