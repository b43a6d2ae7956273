"""The converted repo's configs built from the release: config, preprocessor config, generation config.

The plugin format's config classes are defined in `configuration` and
`feature_extraction`; the stock-vLLM export builds its own config from
`text_config` (`stock_vllm`). Tokenizer files are written by `tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig

from . import spec
from .configuration import ARCHITECTURE, FireRedAsrLlmConfig
from .feature_extraction import FireRedAsrFeatureExtractor
from .plan import ConversionPlan
from .provenance import PROVENANCE_KEY
from .release import Release
from .repo_format import DTYPE_NAMES


def text_config(release: Release) -> dict:
    """The Qwen2 config of the source folder with the original's special token ids."""
    ids = release.llm.tokenizer.special_token_ids
    return {
        **release.llm.config,
        "pad_token_id": ids[spec.PAD_TOKEN],
        "bos_token_id": ids[spec.BOS_TOKEN],
        "eos_token_id": ids[spec.EOS_TOKEN],
    }


def build_config(release: Release, plan: ConversionPlan, conversion: dict) -> FireRedAsrLlmConfig:
    return FireRedAsrLlmConfig(
        architectures=[ARCHITECTURE],
        encoder_config=release.encoder_config.to_dict(),
        text_config=text_config(release),
        encoder_downsample_rate=release.encoder_downsample_rate,
        speech_token_id=release.llm.tokenizer.speech_token_id,
        dtype=DTYPE_NAMES[plan.dtype],
        **{PROVENANCE_KEY: conversion},
    )


def write_preprocessor_config(release: Release, folder: Path) -> None:
    mean, istd, count = spec.cmvn_from_stats(release.cmvn_stats)
    FireRedAsrFeatureExtractor(
        cmvn_mean=mean.tolist(),
        cmvn_istd=istd.tolist(),
        cmvn_frame_count=count,
        max_audio_seconds=release.max_audio_seconds,
    ).save_pretrained(folder)


def write_generation_config(release: Release, folder: Path) -> None:
    ids = release.llm.tokenizer.special_token_ids
    GenerationConfig(
        bos_token_id=ids[spec.BOS_TOKEN],
        eos_token_id=ids[spec.EOS_TOKEN],
        pad_token_id=ids[spec.PAD_TOKEN],
        do_sample=False,
        num_beams=1,
    ).save_pretrained(folder)
