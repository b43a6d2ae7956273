"""Offline transcription with vLLM's `LLM` engine and the plugin.

Thin helpers that the setup script (and the transcription CLI) share: engine
settings that work on CPU and GPU, and the one way a clip becomes a request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fireredasr_converter import spec
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor

# Room for the longest accepted clip (30 s: 375 speech embeddings), the prompt and
# as many generated tokens as embeddings.
DEFAULT_MAX_MODEL_LEN = 1024


def create_engine(model: str | Path, *, dtype: str = "auto", max_model_len: int = DEFAULT_MAX_MODEL_LEN, **engine_kwargs):
    """A vLLM `LLM` for a converted repo, with settings the CPU backend needs when it is the platform."""
    from vllm import LLM
    from vllm.platforms import current_platform

    settings = {"dtype": dtype, "max_model_len": max_model_len}
    if current_platform.is_cpu():
        # The CPU backend sizes its KV cache from this variable (GiB) and compiles slowly.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        settings.update(enforce_eager=True, gpu_memory_utilization=0.2)
    settings.update(engine_kwargs)
    return LLM(model=str(model), **settings)


def transcription_request(waveform: np.ndarray, sampling_rate: int = spec.SAMPLE_RATE) -> dict:
    """One clip as a vLLM prompt: the original's transcription prompt with the audio attached."""
    return {"prompt": spec.transcription_prompt(), "multi_modal_data": {"audio": (waveform, sampling_rate)}}


def transcribe(llm, waveforms: Sequence[np.ndarray], sampling_rate: int = spec.SAMPLE_RATE) -> list[str]:
    """Greedy transcripts, at most N new tokens per clip (the original's default)."""
    from vllm import SamplingParams

    config = llm.llm_engine.model_config.hf_config
    extractor = FireRedAsrFeatureExtractor.from_pretrained(llm.llm_engine.model_config.model)
    params = []
    for waveform in waveforms:
        num_samples = round(len(waveform) * extractor.sampling_rate / sampling_rate)
        count = spec.speech_embedding_count_for_samples(num_samples, config.encoder_downsample_rate)
        params.append(SamplingParams(temperature=0.0, max_tokens=max(1, count)))
    outputs = llm.generate([transcription_request(w, sampling_rate) for w in waveforms], params, use_tqdm=False)
    return [output.outputs[0].text for output in outputs]
