"""The shared facts every package imports: `spec` (lengths, prompt, geometry) and `repo_format` (names).

Each fact is checked against an independent computation: the real layers whose
shapes a formula predicts, the tokenizer that must see the prompt as the
original does, the files the converter writes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tolerances import F64_EPS
from torch import nn
from transformers import AutoTokenizer

from fireredasr_converter import repo_format, spec


@pytest.mark.parametrize("idim", [80, 81, 7, 128])
def test_subsampled_width_is_what_two_stride_2_convolutions_leave(idim):
    convolutions = nn.Sequential(nn.Conv2d(1, 1, 3, 2), nn.Conv2d(1, 1, 3, 2))
    assert convolutions(torch.zeros(1, 1, 50, idim)).shape[-1] == spec.subsampled_feature_width(idim)


@pytest.mark.parametrize("num_samples", [400, 401, 559, 560, 1040, 16000, 480000])
def test_frame_and_embedding_counts_follow_the_front_end(num_samples):
    frames = spec.fbank_frame_count(num_samples)
    # Kaldi's snip-edges framing: whole 25 ms windows every 10 ms.
    assert frames == 1 + (num_samples - spec.FRAME_LENGTH_SAMPLES) // spec.FRAME_SHIFT_SAMPLES
    # The encoder sees the frames plus six zero frames through two stride-2 convolutions.
    convolutions = nn.Sequential(nn.Conv2d(1, 1, 3, 2), nn.Conv2d(1, 1, 3, 2))
    time_steps = convolutions(torch.zeros(1, 1, frames + spec.ENCODER_INPUT_PADDING, 80)).shape[2]
    assert spec.encoder_frame_count(frames) == time_steps
    assert spec.speech_embedding_count_for_samples(num_samples) == time_steps // 2


def test_the_shortest_clip_gives_exactly_one_embedding():
    shortest = spec.min_samples_for_one_embedding()
    assert spec.speech_embedding_count_for_samples(shortest) == 1
    assert spec.speech_embedding_count_for_samples(shortest - 1) == 0
    assert spec.max_fbank_frames(30.0) == spec.fbank_frame_count(30 * spec.SAMPLE_RATE)


def test_the_prompt_tokenizes_with_one_speech_token_and_ends_on_the_assistant_turn(converted_fp32):
    tokenizer = AutoTokenizer.from_pretrained(converted_fp32)
    ids = tokenizer(spec.transcription_prompt())["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids(spec.SPEECH_TOKEN)) == 1
    special = [spec.BOS_TOKEN, spec.SPEECH_TOKEN, spec.EOS_TOKEN, spec.BOS_TOKEN]
    assert [t for t in tokenizer.convert_ids_to_tokens(ids) if t in special] == special
    assert spec.transcription_prompt().endswith("<|im_start|>assistant\n")
    assert spec.TRANSCRIBE_INSTRUCTION in spec.transcription_prompt()
    assert spec.transcription_prompt("<|AUDIO|>") == spec.transcription_prompt().replace(spec.SPEECH_TOKEN, "<|AUDIO|>")


def test_cmvn_from_stats_normalises_the_statistics_it_came_from():
    rng = np.random.default_rng(0)
    frames = rng.normal(3.0, 2.0, size=(1000, 4))
    stats = np.stack([np.append(frames.sum(0), len(frames)), np.append((frames**2).sum(0), 0.0)])
    means, inverse_std, count = spec.cmvn_from_stats(stats)
    normalised = (frames - means) * inverse_std
    assert count == len(frames)
    # Float64 sums of n terms err by at most n u sum|terms| (u = eps / 2); the variance
    # E[x^2] - mean^2 cancels, multiplying that by (E[x^2] + 2 mean^2) / variance; the
    # check's own mean and std add n u each. Bounded by n eps (that factor + 2).
    n = len(frames)
    cancellation = ((frames**2).mean(0) + 2 * frames.mean(0) ** 2) / frames.var(0)
    atol = n * F64_EPS * (cancellation.max() + 2)
    np.testing.assert_allclose(normalised.mean(0), 0.0, atol=atol)
    np.testing.assert_allclose(normalised.std(0), 1.0, atol=atol)


def test_repo_format_names_are_the_ones_a_converted_repo_uses(converted_fp32):
    index = json.loads((converted_fp32 / repo_format.INDEX_NAME).read_text())
    names = set(index["weight_map"])
    assert all(n.startswith((*repo_format.SPEECH_ENCODER_PREFIXES, repo_format.LANGUAGE_MODEL_PREFIX)) for n in names)
    assert any(n.startswith(repo_format.ENCODER_PREFIX) for n in names)
    assert any(n.startswith(repo_format.PROJECTOR_PREFIX) for n in names)
    assert set(index["weight_map"].values()) == {repo_format.SHARD_NAME.format(index=1, count=1)}
    config = json.loads((converted_fp32 / "config.json").read_text())
    assert config["dtype"] == repo_format.dtype_name("fp32") == "float32"


def test_dtype_names_agree_with_torch_and_safetensors():
    for short, dtype in repo_format.DTYPES.items():
        assert repo_format.DTYPE_NAMES[dtype] == str(dtype).removeprefix("torch.")
        assert repo_format.dtype_name(short) == repo_format.DTYPE_NAMES[dtype]
    assert repo_format.SAFETENSORS_DTYPE_NAMES == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
