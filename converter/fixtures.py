"""Synthetic FireRedASR-LLM releases: the original on-disk layout with random weights.

`build_release` writes a directory that looks exactly like what users download
(`model.pth.tar`, `asr_encoder.pth.tar`, `cmvn.ark`, ... next to a Qwen2-7B-Instruct
folder), at any size: `TINY_SHAPES` for tests, `LLM_L_SHAPES` (8.35 B parameters) for
benchmarks. Every tensor is drawn from its own generator seeded by (seed, name), so a
release is reproducible and each tensor is independent of the others' shapes. The
Qwen2 shards are streamed to disk one tensor at a time, so a full-size build never
holds more than `model.pth.tar`'s state dict in memory.

Command line: `python -m fireredasr_converter.fixtures DEST [--shapes tiny|llm-l] ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from . import spec
from .repo_format import DTYPE_NAMES, INDEX_NAME, PROJECTOR_PREFIX, SAFETENSORS_DTYPE_NAMES, SHARD_NAME
from .writer import safetensors_header

V1_MODEL_DIR = "FireRedASR-LLM-L"
V2_MODEL_DIR = "FireRedASR2-LLM"
QWEN2_DIR = "Qwen2-7B-Instruct"
VARIANTS = ("v1", "v2")
ENCODER_SOURCES = ("model", "asr_encoder")

LORA_PREFIX = "llm.base_model.model.model.layers"
# The released AED's output vocabulary; `asr_encoder.pth.tar` records it in its args.
AED_VOCAB_SIZE = 7832



@dataclass(frozen=True, kw_only=True)
class ReleaseShapes:
    """Sizes of a FireRedASR-LLM release: Conformer encoder, Qwen2 decoder, LoRA, tokenizer."""

    idim: int = spec.NUM_MEL_BINS
    encoder_layers: int
    encoder_heads: int
    encoder_dim: int
    encoder_kernel: int = 33
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    llm_vocab_rows: int  # embedding rows; larger than the tokenizer, as in Qwen2
    lora_rank: int
    bpe_vocab_size: int  # regular (non-special) tokens

    def __post_init__(self):
        problems = []
        if self.encoder_dim % self.encoder_heads or self.encoder_dim % 2:
            problems.append(f"encoder_dim {self.encoder_dim} must be even and divisible by encoder_heads {self.encoder_heads}")
        if self.encoder_kernel % 2 == 0:
            problems.append(f"encoder_kernel {self.encoder_kernel} must be odd")
        if self.llm_hidden % self.llm_heads:
            problems.append(f"llm_hidden {self.llm_hidden} must be divisible by llm_heads {self.llm_heads}")
        if self.llm_heads % self.llm_kv_heads:
            problems.append(f"llm_heads {self.llm_heads} must be divisible by llm_kv_heads {self.llm_kv_heads}")
        if self.bpe_vocab_size < 256:
            problems.append(f"bpe_vocab_size {self.bpe_vocab_size} must cover the 256 byte tokens")
        # Three Qwen2 special tokens plus the converter's <speech> must fit in the embedding.
        if self.bpe_vocab_size + len(spec.QWEN2_SPECIAL_TOKENS) + 1 > self.llm_vocab_rows:
            problems.append(f"llm_vocab_rows {self.llm_vocab_rows} must exceed bpe_vocab_size + 4")
        if problems:
            raise ValueError("invalid ReleaseShapes: " + "; ".join(problems))

    @property
    def llm_head_dim(self) -> int:
        return self.llm_hidden // self.llm_heads

    @property
    def encoder_head_dim(self) -> int:
        return self.encoder_dim // self.encoder_heads


TINY_SHAPES = ReleaseShapes(
    encoder_layers=2,
    encoder_heads=4,
    encoder_dim=64,
    llm_hidden=128,
    llm_layers=2,
    llm_heads=2,  # head_dim 64: vLLM's CPU attention backend needs it
    llm_kv_heads=1,
    llm_intermediate=256,
    llm_vocab_rows=512,
    lora_rank=8,
    bpe_vocab_size=300,
)

# FireRedASR-LLM-L: Conformer-L encoder and Qwen2-7B-Instruct, LoRA rank 64.
LLM_L_SHAPES = ReleaseShapes(
    encoder_layers=16,
    encoder_heads=20,
    encoder_dim=1280,
    llm_hidden=3584,
    llm_layers=28,
    llm_heads=28,
    llm_kv_heads=4,
    llm_intermediate=18944,
    llm_vocab_rows=152064,
    lora_rank=64,
    bpe_vocab_size=151643,
)


def scaled_shapes(shapes: ReleaseShapes, scale: float) -> ReleaseShapes:
    """Shrink depths and widths by `scale` (0 < scale <= 1), keeping head sizes.

    Layer counts, head counts (hence widths) and the MLP size scale; the head
    dimensions, the grouped-query ratio, the kernel, the LoRA rank and the
    vocabulary stay, so a scaled release exercises the same code paths.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")

    def shrink(value: int, multiple: int = 1) -> int:
        return max(multiple, round(value * scale / multiple) * multiple)

    encoder_heads = shrink(shapes.encoder_heads)
    kv_heads = shrink(shapes.llm_kv_heads)
    llm_heads = kv_heads * (shapes.llm_heads // shapes.llm_kv_heads)
    return ReleaseShapes(
        idim=shapes.idim,
        encoder_layers=shrink(shapes.encoder_layers),
        encoder_heads=encoder_heads,
        encoder_dim=encoder_heads * shapes.encoder_head_dim,
        encoder_kernel=shapes.encoder_kernel,
        llm_hidden=llm_heads * shapes.llm_head_dim,
        llm_layers=shrink(shapes.llm_layers),
        llm_heads=llm_heads,
        llm_kv_heads=kv_heads,
        llm_intermediate=shrink(shapes.llm_intermediate, 64),
        llm_vocab_rows=shapes.llm_vocab_rows,
        lora_rank=shapes.lora_rank,
        bpe_vocab_size=shapes.bpe_vocab_size,
    )


@dataclass(frozen=True)
class ReleaseFixture:
    """A written release. `llm_dir` is the real Qwen2 folder (v1: the symlink's target)."""

    model_dir: Path
    llm_dir: Path
    shapes: ReleaseShapes
    variant: str
    lora_alpha: int


# --- random tensors ------------------------------------------------------------


class _RandomTensor(NamedTuple):
    """A tensor drawn from N(mean, std^2) with its own generator."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    def materialize(self, seed: int, namespace: str, dtype: torch.dtype) -> torch.Tensor:
        digest = hashlib.blake2b(f"{seed}/{namespace}/{self.name}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.empty(self.shape, dtype=dtype).normal_(self.mean, self.std, generator=generator)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ReleaseWeights:
    """Given tensors for a release in place of random ones (a trained model).

    `model`: model.pth.tar's state dict by its names (`encoder.*` without the
    derived `encoder.positional_encoding.pe`, `encoder_projector.*`, the LoRA
    tensors); `llm`: the Qwen2 folder's tensors by Hugging Face names;
    `cmvn_stats`: Kaldi CMVN statistics (2 x 81) of the training features.
    """

    model: Mapping[str, torch.Tensor]
    llm: Mapping[str, torch.Tensor]
    cmvn_stats: np.ndarray


class _TensorValues:
    """Where a release's tensor values come from: random draws, or `ReleaseWeights`.

    Decoy AED weights (namespace "aed") are always random. Every given tensor
    must be used exactly where its name and shape say (`check_all_used`).
    """

    def __init__(self, seed: int, given: ReleaseWeights | None):
        self.seed = seed
        self.given = given
        self.used: set[tuple[str, str]] = set()

    def value(self, t: _RandomTensor, namespace: str, dtype: torch.dtype) -> torch.Tensor:
        if self.given is None or namespace == "aed":
            return t.materialize(self.seed, namespace, dtype)
        table_name = "llm" if namespace == "llm" else "model"
        table = getattr(self.given, table_name)
        if t.name not in table:
            raise ValueError(f"the given {table_name} weights lack {t.name} {t.shape}")
        value = table[t.name]
        if tuple(value.shape) != t.shape:
            raise ValueError(f"given {table_name} tensor {t.name} has shape {tuple(value.shape)}, expected {t.shape}")
        self.used.add((table_name, t.name))
        return value.detach().to(device="cpu", dtype=dtype).contiguous()

    def cmvn_stats(self) -> np.ndarray:
        return _cmvn_stats(self.seed) if self.given is None else np.asarray(self.given.cmvn_stats, dtype=np.float64)

    def check_all_used(self) -> None:
        if self.given is None:
            return
        unused = sorted(
            f"{table_name}:{name}"
            for table_name in ("model", "llm")
            for name in getattr(self.given, table_name)
            if (table_name, name) not in self.used
        )
        if unused:
            raise ValueError(f"given tensors that the release at these shapes has no place for: {unused[:5]}")


# Trained-looking magnitudes: weights ~ N(0, 1/fan_in) keep activations at unit
# scale through every layer; norms near 1 and small biases keep a forward pass
# finite in fp32 and bf16 while every parameter still changes the result.
_SMALL = 0.02


def _linear(name: str, out_features: int, in_features: int, bias: bool = True) -> list[_RandomTensor]:
    tensors = [_RandomTensor(f"{name}.weight", (out_features, in_features), in_features**-0.5)]
    if bias:
        tensors.append(_RandomTensor(f"{name}.bias", (out_features,), _SMALL))
    return tensors


def _conv(name: str, out_channels: int, in_channels: int, kernel: tuple[int, ...], bias: bool) -> list[_RandomTensor]:
    fan_in = in_channels * math.prod(kernel)
    tensors = [_RandomTensor(f"{name}.weight", (out_channels, in_channels, *kernel), fan_in**-0.5)]
    if bias:
        tensors.append(_RandomTensor(f"{name}.bias", (out_channels,), _SMALL))
    return tensors


def _layer_norm(name: str, dim: int) -> list[_RandomTensor]:
    return [_RandomTensor(f"{name}.weight", (dim,), _SMALL, mean=1.0), _RandomTensor(f"{name}.bias", (dim,), _SMALL)]


def _rms_norm(name: str, dim: int) -> _RandomTensor:
    return _RandomTensor(f"{name}.weight", (dim,), _SMALL, mean=1.0)


# --- the Conformer encoder and the adapter (model.pth.tar) ----------------------



def _feed_forward(prefix: str, d: int) -> list[_RandomTensor]:
    return _layer_norm(f"{prefix}.net.0", d) + _linear(f"{prefix}.net.1", 4 * d, d) + _linear(f"{prefix}.net.4", d, 4 * d)


def _conformer_block(prefix: str, shapes: ReleaseShapes) -> list[_RandomTensor]:
    d, heads = shapes.encoder_dim, shapes.encoder_heads
    tensors = _feed_forward(f"{prefix}.ffn1", d)
    # A module's own parameters come before its children's in the state dict.
    pos_bias_std = (2.0 / (heads + shapes.encoder_head_dim)) ** 0.5  # xavier, as the original's init
    tensors += [
        _RandomTensor(f"{prefix}.mhsa.pos_bias_u", (heads, shapes.encoder_head_dim), pos_bias_std),
        _RandomTensor(f"{prefix}.mhsa.pos_bias_v", (heads, shapes.encoder_head_dim), pos_bias_std),
    ]
    for projection in ("w_qs", "w_ks", "w_vs"):
        tensors += _linear(f"{prefix}.mhsa.{projection}", d, d, bias=False)
    for norm in ("layer_norm_q", "layer_norm_k", "layer_norm_v"):
        tensors += _layer_norm(f"{prefix}.mhsa.{norm}", d)
    tensors += _linear(f"{prefix}.mhsa.fc", d, d, bias=False)
    tensors += _linear(f"{prefix}.mhsa.linear_pos", d, d, bias=False)
    tensors += _layer_norm(f"{prefix}.conv.pre_layer_norm", d)
    tensors += _conv(f"{prefix}.conv.pointwise_conv1", 4 * d, d, (1,), bias=False)
    # Depthwise: one input channel per group.
    tensors += _conv(f"{prefix}.conv.depthwise_conv", 2 * d, 1, (shapes.encoder_kernel,), bias=False)
    tensors += _layer_norm(f"{prefix}.conv.batch_norm", 2 * d)
    tensors += _conv(f"{prefix}.conv.pointwise_conv2", d, 2 * d, (1,), bias=False)
    tensors += _feed_forward(f"{prefix}.ffn2", d)
    tensors += _layer_norm(f"{prefix}.layer_norm", d)
    return tensors


def _encoder_state_dict(shapes: ReleaseShapes, values: _TensorValues, namespace: str) -> dict[str, torch.Tensor]:
    """Every `encoder.*` tensor of the original ConformerEncoder, in its state-dict order."""
    channels = spec.SUBSAMPLING_CHANNELS
    subsampled_idim = spec.subsampled_feature_width(shapes.idim)
    stem = _conv("encoder.input_preprocessor.conv.0", channels, 1, (3, 3), bias=True)
    stem += _conv("encoder.input_preprocessor.conv.2", channels, channels, (3, 3), bias=True)
    stem += _linear("encoder.input_preprocessor.out", shapes.encoder_dim, channels * subsampled_idim)
    state = {t.name: values.value(t, namespace, torch.float32) for t in stem}
    state["encoder.positional_encoding.pe"] = spec.relative_position_table(shapes.encoder_dim)
    for layer in range(shapes.encoder_layers):
        for t in _conformer_block(f"encoder.layer_stack.{layer}", shapes):
            state[t.name] = values.value(t, namespace, torch.float32)
    return state


def _adapter_tensors(shapes: ReleaseShapes, downsample_rate: int) -> list[_RandomTensor]:
    return _linear(f"{PROJECTOR_PREFIX}linear1", shapes.llm_hidden, shapes.encoder_dim * downsample_rate) + _linear(
        f"{PROJECTOR_PREFIX}linear2", shapes.llm_hidden, shapes.llm_hidden
    )


def _qwen2_projection_shapes(shapes: ReleaseShapes) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the seven LoRA-targeted projections of a Qwen2 layer."""
    q_dim = shapes.llm_heads * shapes.llm_head_dim
    kv_dim = shapes.llm_kv_heads * shapes.llm_head_dim
    hidden, inter = shapes.llm_hidden, shapes.llm_intermediate
    return {
        "self_attn.q_proj": (q_dim, hidden),
        "self_attn.k_proj": (kv_dim, hidden),
        "self_attn.v_proj": (kv_dim, hidden),
        "self_attn.o_proj": (hidden, q_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


# Size of the merged LoRA update relative to the base weight it is added to.
_LORA_UPDATE_RATIO = 0.25


def _lora_tensors(shapes: ReleaseShapes) -> list[_RandomTensor]:
    """PEFT's LoRA A [r, in] and B [out, r] for every target of every layer.

    B is non-zero (unlike a fresh PEFT init) and scaled so the merged update
    alpha/r * B @ A is about a quarter of the base weight at any rank: the merge
    matters without swamping the base model.
    """
    rank = shapes.lora_rank
    # (B @ A) has entries of std sqrt(r) * std_B * std_A; std_A = 1/sqrt(in) as for W.
    b_std = _LORA_UPDATE_RATIO / (spec.lora_scale(spec.LORA_DEFAULT_ALPHA, rank) * rank**0.5)
    projections = _qwen2_projection_shapes(shapes)
    tensors = []
    for layer in range(shapes.llm_layers):
        for target in spec.LORA_TARGET_MODULES:
            out_features, in_features = projections[target]
            prefix = f"{LORA_PREFIX}.{layer}.{target}"
            tensors.append(_RandomTensor(f"{prefix}.lora_A.default.weight", (rank, in_features), in_features**-0.5))
            tensors.append(_RandomTensor(f"{prefix}.lora_B.default.weight", (out_features, rank), b_std))
    return tensors


def _model_args(encoder_source: str) -> argparse.Namespace:
    # encoder_path and llm_dir are paths on the training machine in the real release.
    return argparse.Namespace(
        encoder_path="/training/pretrained_models/FireRedASR-AED-L/model.pth.tar",
        llm_dir="/training/pretrained_models/Qwen2-7B-Instruct",
        freeze_encoder=int(encoder_source == "asr_encoder"),
        freeze_llm=0,
        use_lora=1,
        use_fp16=0,
        use_flash_attn=0,
        encoder_downsample_rate=2,
        input_length_max=30.0,
        input_length_min=0.1,
        output_length_max=150,
        output_length_min=1,
        unk="<unk>",
    )


def _asr_encoder_args(shapes: ReleaseShapes) -> argparse.Namespace:
    return argparse.Namespace(
        idim=shapes.idim,
        n_layers_enc=shapes.encoder_layers,
        n_head=shapes.encoder_heads,
        d_model=shapes.encoder_dim,
        kernel_size=shapes.encoder_kernel,
        pe_maxlen=spec.RELATIVE_POSITION_MAX_LEN,
        residual_dropout=0.1,
        dropout_rate=0.1,
        odim=AED_VOCAB_SIZE,
        n_layers_dec=shapes.encoder_layers,
        d_inner=4 * shapes.encoder_dim,
        sos_id=3,
        eos_id=4,
        pad_id=2,
        blank_id=0,
    )


def _write_model_checkpoint(path: Path, shapes: ReleaseShapes, values: _TensorValues, encoder_source: str) -> None:
    args = _model_args(encoder_source)
    state: dict[str, torch.Tensor] = {}
    if encoder_source == "model":
        state.update(_encoder_state_dict(shapes, values, "encoder"))
    # Module order of the original FireRedAsrLlm: encoder, llm (LoRA), encoder_projector.
    for t in _lora_tensors(shapes) + _adapter_tensors(shapes, args.encoder_downsample_rate):
        state[t.name] = values.value(t, "model", torch.float32)
    torch.save({"args": args, "model_state_dict": state}, path)


def _write_asr_encoder_checkpoint(
    path: Path, shapes: ReleaseShapes, values: _TensorValues, encoder_source: str, asr_encoder_weights: bool
) -> None:
    package: dict[str, object] = {"args": _asr_encoder_args(shapes)}
    if encoder_source == "asr_encoder" or asr_encoder_weights:
        # The LLM's encoder when model.pth.tar has none; otherwise decoy AED weights
        # that a converter must not pick.
        namespace = "encoder" if encoder_source == "asr_encoder" else "aed"
        state = _encoder_state_dict(shapes, values, namespace)
        embedding = _RandomTensor("decoder.tgt_word_emb.weight", (AED_VOCAB_SIZE, shapes.encoder_dim), _SMALL)
        # The AED decoder's tensors are never given: the LLM release does not use them.
        state[embedding.name] = embedding.materialize(values.seed, namespace, torch.float32)
        for t in _layer_norm("decoder.layer_norm_out", shapes.encoder_dim):
            state[t.name] = t.materialize(values.seed, namespace, torch.float32)
        state["decoder.tgt_word_prj.weight"] = state[embedding.name]  # tied in the AED
        package["model_state_dict"] = state
    torch.save(package, path)


# --- CMVN statistics ---------------------------------------------------------------

# About 100 hours of 10 ms frames.
_CMVN_FRAME_COUNT = 36_000_000


def _cmvn_stats(seed: int) -> np.ndarray:
    """Kaldi CMVN statistics (2 x 81 float64) of plausible 80-bin log-mel features."""
    rng = np.random.default_rng([seed, 0xC3])
    bins = np.arange(spec.NUM_MEL_BINS) / (spec.NUM_MEL_BINS - 1)
    # Shaped like the log-mel statistics of 16-bit speech (and of `synthetic_speech`):
    # quiet lowest bins, a broad mid-band hump, wider spread in the low bands.
    mean = 15.0 - 8.0 * np.exp(-bins / 0.08) + 1.2 * np.sin(2 * np.pi * bins) + rng.normal(0, 0.2, bins.size)
    std = 5.5 - 2.5 * bins**2 + rng.normal(0, 0.1, bins.size)
    count = float(_CMVN_FRAME_COUNT)
    stats = np.zeros((2, spec.NUM_MEL_BINS + 1), dtype=np.float64)
    stats[0, :-1] = mean * count
    stats[0, -1] = count
    stats[1, :-1] = (std * std + mean * mean) * count
    return stats


def _kaldi_binary_matrix(matrix: np.ndarray) -> bytes:
    """A Kaldi binary double matrix (no key), as `copy-matrix --binary=true` writes it."""
    rows, cols = matrix.shape
    header = b"\0B" + b"DM " + b"\x04" + struct.pack("<i", rows) + b"\x04" + struct.pack("<i", cols)
    return header + np.ascontiguousarray(matrix, dtype="<f8").tobytes()


def _kaldi_text_matrix(matrix: np.ndarray) -> str:
    rows = ["  " + " ".join(repr(float(v)) for v in row) + " " for row in matrix]
    return " [\n" + "\n".join(rows) + "]\n"


# --- the Qwen2 folder -----------------------------------------------------------------


def _qwen2_tensors(shapes: ReleaseShapes) -> list[_RandomTensor]:
    """Every tensor of Qwen2ForCausalLM with Hugging Face names, in checkpoint order."""
    hidden = shapes.llm_hidden
    projections = _qwen2_projection_shapes(shapes)
    tensors = [_RandomTensor("model.embed_tokens.weight", (shapes.llm_vocab_rows, hidden), _SMALL)]
    for layer in range(shapes.llm_layers):
        prefix = f"model.layers.{layer}"
        for target in spec.LORA_TARGET_MODULES:
            out_features, in_features = projections[target]
            # Qwen2 has biases on q, k and v only.
            bias = target in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            tensors += _linear(f"{prefix}.{target}", out_features, in_features, bias=bias)
        tensors.append(_rms_norm(f"{prefix}.input_layernorm", hidden))
        tensors.append(_rms_norm(f"{prefix}.post_attention_layernorm", hidden))
    tensors.append(_rms_norm("model.norm", hidden))
    tensors += _linear("lm_head", shapes.llm_vocab_rows, hidden, bias=False)
    return tensors


def _partition(tensors: list[_RandomTensor], parts: int, itemsize: int) -> list[list[_RandomTensor]]:
    """Split into `parts` contiguous runs of about equal bytes (each tensor goes where its middle falls)."""
    total = sum(t.numel for t in tensors) * itemsize
    runs: list[list[_RandomTensor]] = [[] for _ in range(parts)]
    start = 0
    for t in tensors:
        size = t.numel * itemsize
        runs[min(parts - 1, (2 * start + size) * parts // (2 * total))].append(t)
        start += size
    if any(not run for run in runs):
        raise ValueError(f"llm_shards={parts} leaves a shard empty at these shapes; use fewer shards")
    return runs


def _write_safetensors_streaming(
    path: Path, tensors: list[_RandomTensor], values: _TensorValues, namespace: str, dtype: torch.dtype
) -> None:
    """Write a safetensors file one tensor at a time.

    The header is known from the shapes alone, so each tensor is generated,
    written and dropped in turn; `safetensors.torch.save_file` would need the
    whole shard in memory.
    """
    with open(path, "wb") as f:
        f.write(safetensors_header([(t.name, tuple(t.shape)) for t in tensors], dtype))
        for t in tensors:
            # Tensor memory is little-endian on every platform torch supports, as safetensors stores it.
            f.write(values.value(t, namespace, dtype).view(torch.uint8).numpy().data)


def _qwen2_shards(shapes: ReleaseShapes, dtype: torch.dtype, shards: int) -> dict[str, list[_RandomTensor]]:
    """File name -> tensors, named as Hugging Face names Qwen2 checkpoints."""
    tensors = _qwen2_tensors(shapes)
    if shards == 1:
        return {"model.safetensors": tensors}
    itemsize = torch.empty((), dtype=dtype).element_size()
    runs = _partition(tensors, shards, itemsize)
    return {SHARD_NAME.format(index=index, count=shards): run for index, run in enumerate(runs, start=1)}


def _write_qwen2_weights(
    llm_dir: Path, shards: dict[str, list[_RandomTensor]], values: _TensorValues, dtype: torch.dtype
) -> None:
    for filename, tensors in shards.items():
        _write_safetensors_streaming(llm_dir / filename, tensors, values, "llm", dtype)
    if len(shards) > 1:
        itemsize = torch.empty((), dtype=dtype).element_size()
        weight_map = {t.name: filename for filename, tensors in shards.items() for t in tensors}
        total_size = sum(t.numel for tensors in shards.values() for t in tensors) * itemsize
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(llm_dir / INDEX_NAME, index)


def _qwen2_config(shapes: ReleaseShapes, dtype: torch.dtype, special_ids: dict[str, int]) -> dict:
    # The fields and values of Qwen2-7B-Instruct's config.json, at the given shapes.
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": special_ids[spec.PAD_TOKEN],
        "eos_token_id": special_ids[spec.EOS_TOKEN],
        "hidden_act": "silu",
        "hidden_size": shapes.llm_hidden,
        "initializer_range": 0.02,
        "intermediate_size": shapes.llm_intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": shapes.llm_layers,
        "model_type": "qwen2",
        "num_attention_heads": shapes.llm_heads,
        "num_hidden_layers": shapes.llm_layers,
        "num_key_value_heads": shapes.llm_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": DTYPE_NAMES[dtype],
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": shapes.llm_vocab_rows,
    }


def _qwen2_generation_config(special_ids: dict[str, int]) -> dict:
    pad, eos = special_ids[spec.PAD_TOKEN], special_ids[spec.EOS_TOKEN]
    return {
        "bos_token_id": pad,
        "pad_token_id": pad,
        "do_sample": True,
        "eos_token_id": [eos, pad],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "transformers_version": "4.41.2",
    }


# --- the tokenizer ----------------------------------------------------------------------

# Training text for the byte-level BPE: the prompt and chat-template words plus
# everyday English and Chinese, so common words and characters become single tokens.
_TOKENIZER_CORPUS = (
    "system user assistant You are a helpful assistant.",
    "请转写音频为文字",
    "user: 请转写音频为文字 assistant: 好的，这是转写结果。",
    "Please transcribe the audio into text.",
    "The weather is nice today, so we are going for a walk in the park.",
    "Speech recognition turns the sound of a voice into written words.",
    "She read the meeting notes aloud and everyone listened carefully.",
    "The train to the city leaves at half past seven in the morning.",
    "We measured the error rate on the test set and it went down again.",
    "Could you repeat that more slowly? I did not catch the last sentence.",
    "The children were singing in the garden while their parents cooked dinner.",
    "A good model should work well on noisy phone calls and quiet studio recordings.",
    "He opened the window, and the sound of rain filled the small room.",
    "Numbers like 2024, 3.14 and 100 percent also appear in spoken language.",
    "Thank you for calling, how can I help you today?",
    "The news report said the river was higher than it has been in years.",
    "Our team will present the new results at the conference next week.",
    "Learning a language takes time, patience and a lot of listening.",
    "今天天气很好，我们一起去公园散步吧。",
    "语音识别系统把说话的声音转换成文字。",
    "请把这段会议录音整理成文字记录。",
    "他在电话里说明天上午九点开会。",
    "这个模型在嘈杂的环境里也能听清楚。",
    "我们测试了很多数据，错误率又下降了。",
    "孩子们在院子里唱歌，爸爸妈妈在做晚饭。",
    "请你说慢一点，我没有听清楚最后一句话。",
    "火车早上七点半从北京出发，下午到达上海。",
    "新闻报道说这条河的水位是多年来最高的。",
    "学习一门语言需要时间、耐心和大量的练习。",
    "感谢您的来电，请问有什么可以帮您？",
    "下个星期我们会在大会上介绍新的结果。",
    "他打开窗户，雨声充满了整个小房间。",
    "音频文件的采样率是一万六千赫兹。",
    "文字转写的结果会保存在数据库里。",
)

# The corpus above supports about 1,150 regular tokens. Larger vocabularies are
# filled up with entries no merge produces (they can only be decoded), so the
# special tokens get the ids a real Qwen2 tokenizer gives them (151643.. at full size).
_RESERVED_TOKEN = "<reserved_{}>"


def build_tokenizer(bpe_vocab_size: int, extra_corpus: Sequence[str] = ()) -> Tokenizer:
    """The release's Qwen2-style byte-level BPE tokenizer, trained on the built-in corpus plus `extra_corpus`.

    Deterministic: the same arguments give the same vocabulary and ids.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator([*_TOKENIZER_CORPUS, *extra_corpus], trainer)

    trained = json.loads(tokenizer.to_str())
    vocab = trained["model"]["vocab"]
    for index in range(bpe_vocab_size - len(vocab)):
        vocab[_RESERVED_TOKEN.format(index)] = len(vocab)
    tokenizer = Tokenizer.from_str(json.dumps(trained))
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in spec.QWEN2_SPECIAL_TOKENS]
    )
    return tokenizer


# Qwen2-style ChatML: a default system turn unless the conversation brings one.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _write_tokenizer(llm_dir: Path, bpe_vocab_size: int, extra_corpus: Sequence[str]) -> dict[str, int]:
    """Write Qwen2's tokenizer files; returns the special tokens' ids."""
    tokenizer = build_tokenizer(bpe_vocab_size, extra_corpus)
    tokenizer.save(str(llm_dir / "tokenizer.json"))
    tokenizer.model.save(str(llm_dir))  # vocab.json and merges.txt
    special_ids = {token: tokenizer.token_to_id(token) for token in spec.QWEN2_SPECIAL_TOKENS}
    added_tokens_decoder = {
        str(special_ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in spec.QWEN2_SPECIAL_TOKENS
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [spec.BOS_TOKEN, spec.EOS_TOKEN],
        "bos_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": spec.EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": spec.PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(llm_dir / "tokenizer_config.json", tokenizer_config)
    return special_ids


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_qwen2_folder(
    llm_dir: Path,
    shapes: ReleaseShapes,
    values: _TensorValues,
    dtype: torch.dtype,
    shards: dict[str, list[_RandomTensor]],
    tokenizer_corpus: Sequence[str],
) -> None:
    llm_dir.mkdir()
    special_ids = _write_tokenizer(llm_dir, shapes.bpe_vocab_size, tokenizer_corpus)
    _write_json(llm_dir / "config.json", _qwen2_config(shapes, dtype, special_ids))
    _write_json(llm_dir / "generation_config.json", _qwen2_generation_config(special_ids))
    _write_qwen2_weights(llm_dir, shards, values, dtype)


# --- the release --------------------------------------------------------------------------


def build_release(
    dest: Path,
    shapes: ReleaseShapes = TINY_SHAPES,
    *,
    variant: str = "v1",
    seed: int = 0,
    encoder_source: str = "model",
    asr_encoder_weights: bool = False,
    llm_dtype: torch.dtype = torch.bfloat16,
    llm_shards: int = 2,
    weights: ReleaseWeights | None = None,
    tokenizer_corpus: Sequence[str] = (),
) -> ReleaseFixture:
    """Write a FireRedASR-LLM release under `dest`: random weights, or the given `weights`.

    v1: `dest/FireRedASR-LLM-L/` with a relative symlink `Qwen2-7B-Instruct ->
    ../Qwen2-7B-Instruct` and the real Qwen2 folder beside it, as the original
    README has users set it up. v2: `dest/FireRedASR2-LLM/` with the Qwen2
    folder bundled inside.

    encoder_source="model" puts the fine-tuned encoder in `model.pth.tar`;
    "asr_encoder" leaves it out there (freeze_encoder=1) and stores it in
    `asr_encoder.pth.tar`. asr_encoder_weights=True gives `asr_encoder.pth.tar`
    decoy AED weights (different from the LLM's encoder) in the "model" case.
    `weights` (a trained model) replaces every random tensor and the CMVN
    statistics; `tokenizer_corpus` is text the tokenizer learns merges from, on
    top of the built-in corpus.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if encoder_source not in ENCODER_SOURCES:
        raise ValueError(f"unknown encoder_source {encoder_source!r}; use one of {', '.join(ENCODER_SOURCES)}")
    if llm_dtype not in SAFETENSORS_DTYPE_NAMES:
        raise ValueError(f"llm_dtype {llm_dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    if llm_shards < 1:
        raise ValueError(f"llm_shards must be at least 1, got {llm_shards}")
    shards = _qwen2_shards(shapes, llm_dtype, llm_shards)  # checked before anything is written

    dest = Path(dest)
    model_dir = dest / (V1_MODEL_DIR if variant == "v1" else V2_MODEL_DIR)
    llm_dir = dest / QWEN2_DIR if variant == "v1" else model_dir / QWEN2_DIR
    for path in (model_dir, llm_dir):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} already exists; build the release in an empty destination")
    model_dir.mkdir(parents=True)

    values = _TensorValues(seed, weights)
    _write_model_checkpoint(model_dir / "model.pth.tar", shapes, values, encoder_source)
    _write_asr_encoder_checkpoint(model_dir / "asr_encoder.pth.tar", shapes, values, encoder_source, asr_encoder_weights)
    stats = values.cmvn_stats()
    (model_dir / "cmvn.ark").write_bytes(_kaldi_binary_matrix(stats))
    (model_dir / "cmvn.txt").write_text(_kaldi_text_matrix(stats))
    (model_dir / "config.yaml").write_text("")

    _write_qwen2_folder(llm_dir, shapes, values, llm_dtype, shards, tokenizer_corpus)
    values.check_all_used()
    if variant == "v1":
        os.symlink(Path("..") / QWEN2_DIR, model_dir / QWEN2_DIR, target_is_directory=True)
    return ReleaseFixture(
        model_dir=model_dir, llm_dir=llm_dir, shapes=shapes, variant=variant, lora_alpha=spec.LORA_DEFAULT_ALPHA
    )


# --- audio -----------------------------------------------------------------------------------


def synthetic_speech(num_samples: int, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like 16 kHz mono clip, float32 in [-1, 1].

    Syllables of 120-300 ms (some silent) with a gliding pitch; each voiced
    syllable is a harmonic series shaped by three formant resonances that move
    from syllable to syllable, plus a little breath noise. Not intelligible,
    but its fbank features vary over time and frequency like speech.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = np.random.default_rng([seed, 0x5EEC])
    rate = spec.SAMPLE_RATE
    n = np.arange(num_samples)

    syllable_lengths = rng.uniform(0.12, 0.30, num_samples // int(0.12 * rate) + 2) * rate
    boundaries = np.concatenate([[0.0], np.cumsum(syllable_lengths)])
    centres = (boundaries[:-1] + boundaries[1:]) / 2
    voiced = rng.random(len(centres)) > 0.2

    base_pitch = rng.uniform(100.0, 220.0)
    pitch = np.interp(n, centres, base_pitch * np.exp(rng.normal(0.0, 0.12, len(centres))))
    formants = [
        np.interp(n, centres, rng.uniform(low, high, len(centres)))
        for low, high in ((300.0, 850.0), (900.0, 2300.0), (2400.0, 3300.0))
    ]
    bandwidths = (90.0, 120.0, 180.0)
    formant_gains = (1.0, 0.6, 0.3)

    # Position within its syllable, 0..1, for a raised-cosine loudness envelope.
    index = np.searchsorted(boundaries, n, side="right") - 1
    within = (n - boundaries[index]) / syllable_lengths[index]
    envelope = np.sin(np.pi * within) ** 2 * voiced[index]

    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = np.zeros(num_samples)
    for harmonic in range(1, int(4000 / pitch.min(initial=4000.0)) + 1):
        frequency = harmonic * pitch
        shape = sum(
            gain * np.exp(-0.5 * ((frequency - centre) / width) ** 2)
            for gain, centre, width in zip(formant_gains, formants, bandwidths)
        )
        voice += (shape + 0.05) / harmonic**0.5 * np.sin(harmonic * phase)

    noise = rng.standard_normal(num_samples)
    signal = envelope * voice + 0.005 * (envelope + 0.05) * noise
    peak = np.abs(signal).max(initial=0.0)
    if peak > 0:
        signal *= 0.6 / peak
    return signal.astype(np.float32)


# --- command line ---------------------------------------------------------------------------

_NAMED_SHAPES = {"tiny": TINY_SHAPES, "llm-l": LLM_L_SHAPES}


@click.command()
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shapes", "shapes_name", type=click.Choice(list(_NAMED_SHAPES)), default="tiny", show_default=True)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Shrink depths and widths, 0 < F <= 1.")
@click.option("--variant", type=click.Choice(VARIANTS), default="v1", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(dest: Path, shapes_name: str, scale: float, variant: str, seed: int) -> None:
    """Write a FireRedASR-LLM release with random weights under DEST."""
    try:
        shapes = scaled_shapes(_NAMED_SHAPES[shapes_name], scale)
        fixture = build_release(dest, shapes, variant=variant, seed=seed)
    except (ValueError, FileExistsError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"wrote {fixture.model_dir} (Qwen2 folder: {fixture.llm_dir})")


if __name__ == "__main__":
    main()
