"""Find and check everything a FireRedASR-AED release folder holds.

`discover_aed_release` loads `model.pth.tar` safely, takes the encoder and decoder
hyper-parameters from its pickled args and checks them against the tensor
shapes, reads `dict.txt` as the original's TokenDict does, and reads the CMVN
statistics. FireRedASR2-AED releases have the same files and one more head
(`ctc.ctc_lo`, a linear over the encoder output for word timestamps), which is
checked and carried along. `is_aed_release` tells an AED folder from an LLM one. Every
inconsistency is a one-line `ConversionError` raised before anything is written.
The shared readers and checks are `release`'s (the LLM release's module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import aed_spec, spec
from .configuration import FireRedAsrAedConfig, FireRedAsrEncoderConfig
from .errors import ConversionError
from .release import (
    CMVN_FILE,
    MODEL_CHECKPOINT,
    _args_of,
    _cmvn_stats,
    _encoder_config,
    _expect_shape,
    _required_arg,
    _state_dict_of,
)
from .repo_format import ENCODER_PREFIX
from .sources import Checkpoint, check_readable, load_checkpoint

DECODER_PREFIX = "decoder."
# FireRedASR2-AED adds a CTC head over the encoder output (the original uses it for word timestamps only).
CTC_PREFIX = "ctc."
CTC_TENSORS = ("ctc.ctc_lo.weight", "ctc.ctc_lo.bias")
AED_LAYOUTS = {
    False: "FireRedASR-AED (dict.txt and train_bpe1000.model)",
    True: "FireRedASR2-AED (dict.txt and train_bpe1000.model, CTC head)",
}
_AED_FIX = (
    "SRC must be a FireRedASR-AED release folder (model.pth.tar, cmvn.ark, "
    f"{aed_spec.DICT_FILE}, {aed_spec.SPM_FILE})"
)
_DOWNLOAD_AGAIN = "download the release again"
# dict.txt of the released model is about 50 kB; anything near this is not a token list.
MAX_DICT_BYTES = 64 << 20
# The tied output projection: the original's state_dict() holds it under its own name too.
OUTPUT_PROJECTION = "decoder.tgt_word_prj.weight"
EMBEDDING = "decoder.tgt_word_emb.weight"
DECODER_POSITIONS = "decoder.positional_encoding.pe"


def is_aed_release(src: Path) -> bool:
    """Whether `src` looks like a FireRedASR-AED release (it has the AED's dict.txt, and no LLM encoder file)."""
    src = Path(src)
    return (src / aed_spec.DICT_FILE).is_file() and not (src / "asr_encoder.pth.tar").exists()


@dataclass(frozen=True)
class AedRelease:
    """A checked FireRedASR-AED release, with its tensors memory-mapped or read lazily."""

    model_dir: Path
    model_checkpoint: Checkpoint
    encoder_tensors: dict[str, torch.Tensor]  # encoder.* names
    decoder_tensors: dict[str, torch.Tensor]  # decoder.* names, the tied projection left out
    ctc_tensors: dict[str, torch.Tensor]  # FireRedASR2-AED's ctc.* head; empty for FireRedASR-AED
    config: FireRedAsrAedConfig
    max_audio_seconds: float
    cmvn_stats: np.ndarray
    tokens: tuple[str, ...]  # dict.txt: token i on line i, "<space>" read as " "

    @property
    def layout(self) -> str:
        return AED_LAYOUTS[bool(self.ctc_tensors)]

    @property
    def dict_path(self) -> Path:
        return self.model_dir / aed_spec.DICT_FILE

    @property
    def spm_path(self) -> Path:
        return self.model_dir / aed_spec.SPM_FILE

    @property
    def input_files(self) -> list[Path]:
        """Every file the conversion reads."""
        return [self.model_checkpoint.path, self.model_dir / CMVN_FILE, self.dict_path, self.spm_path]


def discover_aed_release(src: Path) -> AedRelease:
    model_dir = Path(src)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a folder: {_AED_FIX}")
    model_dir = model_dir.resolve()
    for name in (aed_spec.DICT_FILE, aed_spec.SPM_FILE, CMVN_FILE):
        check_readable(model_dir / name, _AED_FIX)
    checkpoint = load_checkpoint(model_dir / MODEL_CHECKPOINT, _AED_FIX)
    path = checkpoint.path
    args = _args_of(checkpoint)
    state = _state_dict_of(checkpoint, required=True)
    for key in state:
        if not key.startswith((ENCODER_PREFIX, DECODER_PREFIX)) and key not in CTC_TENSORS:
            raise ConversionError(
                f"{path} holds unknown tensor {key} (expected encoder.*, decoder.* or FireRedASR2's ctc.ctc_lo.*): "
                f"{_DOWNLOAD_AGAIN}"
            )
    encoder_tensors = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    encoder_config = _encoder_config(args, path, encoder_tensors, path)

    vocab_size, decoder_layers, max_len = (_required_arg(args, name, path) for name in ("odim", "n_layers_dec", "pe_maxlen"))
    ids = {name: _token_id_arg(args, name, path, vocab_size) for name in ("sos_id", "eos_id", "pad_id")}
    decoder_tensors = _decoder_tensors(state, path, encoder_config, vocab_size, decoder_layers, max_len)
    ctc_tensors = _ctc_tensors(state, path, encoder_config.d_model, vocab_size)

    tokens = read_dict(model_dir / aed_spec.DICT_FILE)
    if len(tokens) != vocab_size:
        raise ConversionError(
            f"{model_dir / aed_spec.DICT_FILE} lists {len(tokens)} tokens, the model's args say odim={vocab_size}: "
            f"the dict and the model do not belong together; {_DOWNLOAD_AGAIN}"
        )
    if aed_spec.UNK_TOKEN not in tokens:
        raise ConversionError(f"{model_dir / aed_spec.DICT_FILE} has no {aed_spec.UNK_TOKEN} token: {_DOWNLOAD_AGAIN}")
    config = FireRedAsrAedConfig(
        encoder_config=encoder_config.to_dict(),
        vocab_size=vocab_size,
        decoder_layers=decoder_layers,
        decoder_attention_heads=encoder_config.n_head,
        decoder_ffn_dim=4 * encoder_config.d_model,
        max_target_positions=max_len,
        pad_token_id=ids["pad_id"],
        bos_token_id=ids["sos_id"],
        eos_token_id=ids["eos_id"],
        decoder_start_token_id=ids["sos_id"],
        unk_token_id=tokens.index(aed_spec.UNK_TOKEN),
        ctc_head=bool(ctc_tensors),
    )
    return AedRelease(
        model_dir=model_dir,
        model_checkpoint=checkpoint,
        encoder_tensors=encoder_tensors,
        decoder_tensors=decoder_tensors,
        ctc_tensors=ctc_tensors,
        config=config,
        max_audio_seconds=_aed_max_audio_seconds(args, path),
        cmvn_stats=_cmvn_stats(model_dir / CMVN_FILE, encoder_config.idim),
        tokens=tokens,
    )


def _aed_max_audio_seconds(args, path: Path) -> float:
    """The clip limit: the args' `input_length_max`, at most the project's segment length.

    The original README lets FireRedASR-AED take clips of up to 60 s; served here, longer
    audio is segmented to `spec.MAX_CLIP_SECONDS` as for the LLM, so a larger training
    limit is lowered to that, not refused.
    """
    value = getattr(args, "input_length_max", spec.MAX_CLIP_SECONDS)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = min(value, spec.MAX_CLIP_SECONDS)
    try:
        return spec.check_max_audio_seconds(value)
    except ValueError as error:
        raise ConversionError(f"input_length_max in the args of {path}: {error}; {_DOWNLOAD_AGAIN}") from None


def _ctc_tensors(state: dict[str, torch.Tensor], path: Path, d_model: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """FireRedASR2-AED's CTC head (a linear from the encoder width to the vocabulary), both tensors or none."""
    found = {name: state[name] for name in CTC_TENSORS if name in state}
    if not found:
        return {}
    why = f"d_model {d_model}, odim {vocab_size}"
    for name, shape in zip(CTC_TENSORS, ((vocab_size, d_model), (vocab_size,))):
        _expect_shape(found, name, shape, path, why)
    return found


def _token_id_arg(args, name: str, path: Path, vocab_size: int) -> int:
    value = getattr(args, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ConversionError(
            f"the args of {path} lack a token id {name} in [0, {vocab_size}) (found {value!r}): {_DOWNLOAD_AGAIN}"
        )
    return value


def decoder_tensor_shapes(d_model: int, layers: int, vocab_size: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """The original TransformerDecoder's tensors (the tied projection left out) and their shapes, in state-dict order."""
    d = d_model
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (vocab_size, d), DECODER_POSITIONS: (1, max_len, d)}
    for layer in range(layers):
        prefix = f"decoder.layer_stack.{layer}"
        for attention in ("self_attn", "cross_attn"):
            shapes[f"{prefix}.{attention}_norm.weight"] = (d,)
            shapes[f"{prefix}.{attention}_norm.bias"] = (d,)
            for projection, bias in (("w_qs", True), ("w_ks", False), ("w_vs", True), ("fc", True)):
                shapes[f"{prefix}.{attention}.{projection}.weight"] = (d, d)
                if bias:
                    shapes[f"{prefix}.{attention}.{projection}.bias"] = (d,)
        shapes[f"{prefix}.mlp_norm.weight"] = (d,)
        shapes[f"{prefix}.mlp_norm.bias"] = (d,)
        shapes[f"{prefix}.mlp.w_1.weight"] = (4 * d, d)
        shapes[f"{prefix}.mlp.w_1.bias"] = (4 * d,)
        shapes[f"{prefix}.mlp.w_2.weight"] = (d, 4 * d)
        shapes[f"{prefix}.mlp.w_2.bias"] = (d,)
    shapes["decoder.layer_norm_out.weight"] = (d,)
    shapes["decoder.layer_norm_out.bias"] = (d,)
    return shapes


def _decoder_tensors(
    state: dict[str, torch.Tensor],
    path: Path,
    encoder: FireRedAsrEncoderConfig,
    vocab_size: int,
    layers: int,
    max_len: int,
) -> dict[str, torch.Tensor]:
    """decoder.* without the tied projection, each checked against the args; the projection must equal the embedding."""
    expected = decoder_tensor_shapes(encoder.d_model, layers, vocab_size, max_len)
    found = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIX) and k != OUTPUT_PROJECTION}
    why = f"d_model {encoder.d_model}, odim {vocab_size}, pe_maxlen {max_len}"
    for name, shape in expected.items():
        _expect_shape(found, name, shape, path, why)
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ConversionError(
            f"{path} holds {extra[0]}, which the args (n_layers_dec={layers}) leave no place for: {_DOWNLOAD_AGAIN}"
        )
    if OUTPUT_PROJECTION in state:
        projection = state[OUTPUT_PROJECTION]
        if tuple(projection.shape) != (vocab_size, encoder.d_model) or not torch.equal(projection, found[EMBEDDING]):
            raise ConversionError(
                f"{OUTPUT_PROJECTION} in {path} differs from {EMBEDDING}, which the original ties it to: "
                f"{_DOWNLOAD_AGAIN}"
            )
    return {name: found[name] for name in expected}


def read_dict(path: Path) -> tuple[str, ...]:
    """dict.txt as the original's TokenDict reads it: `token id` or `token` per line, ids in line order.

    A line holding only whitespace is the token " " and `<space>` is read as " ",
    as the original does; ids must count up from 0 and tokens must be distinct.
    """
    check_readable(path, _AED_FIX)
    if path.stat().st_size > MAX_DICT_BYTES:
        raise ConversionError(f"{path} is over {MAX_DICT_BYTES >> 20} MiB, not a token list: {_DOWNLOAD_AGAIN}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConversionError(f"{path} is not UTF-8 text (byte {error.start}): {_DOWNLOAD_AGAIN}") from None
    # Text-mode reading's universal newlines: \r\n and \r end a line as \n does.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    tokens: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines):
        fields = line.strip().split()
        if len(fields) >= 2:
            token, index_text = fields[0], fields[1]
            if not (index_text.isascii() and index_text.lstrip("-").isdigit()):
                raise ConversionError(f"{path} line {number + 1}: {index_text[:20]!r} is not a token id: {_DOWNLOAD_AGAIN}")
            index = int(index_text)
        else:
            token, index = (fields[0] if fields else " "), number
        if index != len(tokens):
            raise ConversionError(
                f"{path} line {number + 1} gives id {index}, expected {len(tokens)} (ids count up from 0 line by "
                f"line): {_DOWNLOAD_AGAIN}"
            )
        if token == aed_spec.SPACE_TOKEN:
            token = " "
        if token in seen:
            raise ConversionError(
                f"{path} lists {token[:20]!r} twice (ids {seen[token]} and {index}): {_DOWNLOAD_AGAIN}"
            )
        seen[token] = index
        tokens.append(token)
    if not tokens:
        raise ConversionError(f"{path} is empty: {_DOWNLOAD_AGAIN}")
    return tuple(tokens)
