"""Find and check everything a FireRedASR-LLM release folder holds.

`discover_release` works out the layout (v1: FireRedASR-LLM-L with a
`Qwen2-7B-Instruct` symlink; v2: FireRedASR2-LLM with the folder bundled), loads
the checkpoints safely, takes the encoder hyper-parameters from the pickled
args and checks them against the tensor shapes, finds the LoRA factors and
their rank, and reads the CMVN statistics. Every inconsistency is a one-line
`ConversionError` raised before anything is written.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import spec
from .configuration import FireRedAsrEncoderConfig
from .errors import ConversionError
from .lora import LoraAdapter, collect_lora
from .repo_format import ENCODER_PREFIX, INDEX_NAME, PROJECTOR_PREFIX
from .safe_io import UnsafeInput, load_json
from .sources import (
    Checkpoint,
    SafetensorsFolder,
    check_readable,
    load_checkpoint,
    read_kaldi_matrix,
    tensor_problem,
)
from .tokenizer import SourceTokenizer, inspect_tokenizer

MODEL_CHECKPOINT = "model.pth.tar"
ENCODER_CHECKPOINT = "asr_encoder.pth.tar"
CMVN_FILE = "cmvn.ark"
QWEN2_FOLDER = "Qwen2-7B-Instruct"
LAYOUTS = {
    "v1": "FireRedASR-LLM-L (Qwen2 folder linked)",
    "v2": "FireRedASR2-LLM (Qwen2 folder bundled)",
}

LLM_PREFIX = "llm."
_ENCODER_LAYER = re.compile(r"^encoder\.layer_stack\.(\d+)\.(.+)$")
_QWEN2_TENSOR = re.compile(r"^(model\.|lm_head\.)")


def _int_in(low: int, high: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _number_in(low: float, high: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def _optional(check):
    return lambda v: v is None or check(v)


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(item) for item in v)


_SIZE = _int_in(1, 2**31 - 1)
_TOKEN_ID = _int_in(0, 2**31 - 1)
_STRING = lambda v: isinstance(v, str) and len(v) <= 200  # noqa: E731
# The keys of a Qwen2 config.json (transformers 4.x and 5) and what each may hold: the
# converted repo's text_config is built from these alone. Any other key (`auto_map`,
# which would make `trust_remote_code` load someone's code, `quantization_config`, ...)
# is dropped.
QWEN2_CONFIG_KEYS = {
    "architectures": _list_of(_STRING),
    "attention_dropout": _number_in(0, 1),
    "bos_token_id": _optional(_TOKEN_ID),
    "eos_token_id": lambda v: _optional(_TOKEN_ID)(v) or _list_of(_TOKEN_ID)(v),
    "pad_token_id": _optional(_TOKEN_ID),
    "hidden_act": _STRING,
    "hidden_size": _SIZE,
    "initializer_range": _number_in(0, 1),
    "intermediate_size": _SIZE,
    "max_position_embeddings": _SIZE,
    "max_window_layers": _int_in(0, 2**31 - 1),
    "model_type": _STRING,
    "num_attention_heads": _SIZE,
    "num_hidden_layers": _SIZE,
    "num_key_value_heads": _SIZE,
    "rms_norm_eps": _number_in(1e-30, 1),
    "rope_theta": _number_in(1e-30, 1e30),
    "rope_scaling": _optional(lambda v: isinstance(v, dict)),
    "rope_parameters": _optional(lambda v: isinstance(v, dict)),
    "sliding_window": _optional(_int_in(0, 2**31 - 1)),
    "layer_types": _list_of(_STRING),
    "tie_word_embeddings": lambda v: isinstance(v, bool),
    "use_cache": lambda v: isinstance(v, bool),
    "use_sliding_window": lambda v: isinstance(v, bool),
    "torch_dtype": _optional(_STRING),
    "dtype": _optional(_STRING),
    "transformers_version": _STRING,
    "vocab_size": _SIZE,
}
_RELEASE_FIX = "SRC must be a FireRedASR-LLM release folder (model.pth.tar, asr_encoder.pth.tar, cmvn.ark)"
_DOWNLOAD_AGAIN = "download the release again"


@dataclass(frozen=True)
class Qwen2Folder:
    path: Path
    config: dict  # config.json as stored
    weights: SafetensorsFolder
    tokenizer: SourceTokenizer

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]


@dataclass(frozen=True)
class Release:
    """A checked FireRedASR-LLM release, with its tensors memory-mapped or read lazily."""

    model_dir: Path
    layout: str  # a key of LAYOUTS
    llm: Qwen2Folder
    model_checkpoint: Checkpoint
    encoder_checkpoint: Checkpoint
    encoder_source: Checkpoint  # the checkpoint whose encoder.* tensors are used
    encoder_tensors: dict[str, torch.Tensor]  # encoder.* names
    projector_tensors: dict[str, torch.Tensor]  # encoder_projector.* names
    encoder_config: FireRedAsrEncoderConfig
    encoder_downsample_rate: int
    max_audio_seconds: float
    cmvn_stats: np.ndarray
    lora: LoraAdapter | None

    @property
    def input_files(self) -> list[Path]:
        """Every file the conversion reads."""
        model_files = [self.model_checkpoint.path, self.encoder_checkpoint.path, self.model_dir / CMVN_FILE]
        llm_files = [self.llm.path / "config.json", *self.llm.weights.files, *self.llm.tokenizer.files]
        index = self.llm.path / INDEX_NAME
        return model_files + ([index] if index.exists() else []) + llm_files


def discover_release(src: Path, llm_dir: Path | None = None, lora_alpha: float | None = None) -> Release:
    model_dir = Path(src)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a folder: {_RELEASE_FIX}")
    model_dir = model_dir.resolve()
    llm_path, layout = _find_llm_folder(model_dir, llm_dir)

    model_checkpoint = load_checkpoint(model_dir / MODEL_CHECKPOINT, _RELEASE_FIX)
    encoder_checkpoint = load_checkpoint(model_dir / ENCODER_CHECKPOINT, _RELEASE_FIX)
    model_args = _args_of(model_checkpoint)
    model_state = _state_dict_of(model_checkpoint, required=True)
    _refuse_unknown_keys(model_checkpoint, model_state)

    llm = _read_llm_folder(llm_path)
    encoder_source, encoder_tensors = _pick_encoder(model_checkpoint, model_state, encoder_checkpoint)
    encoder_config = _encoder_config(
        _args_of(encoder_checkpoint), encoder_checkpoint.path, encoder_tensors, encoder_source.path
    )
    downsample_rate = _required_arg(model_args, "encoder_downsample_rate", model_checkpoint.path)
    projector_tensors = _projector_tensors(
        model_state, model_checkpoint.path, encoder_config.d_model, downsample_rate, llm.hidden_size
    )
    lora = _lora(model_args, model_state, model_checkpoint.path, llm, lora_alpha)
    return Release(
        model_dir=model_dir,
        layout=layout,
        llm=llm,
        model_checkpoint=model_checkpoint,
        encoder_checkpoint=encoder_checkpoint,
        encoder_source=encoder_source,
        encoder_tensors=encoder_tensors,
        projector_tensors=projector_tensors,
        encoder_config=encoder_config,
        encoder_downsample_rate=downsample_rate,
        max_audio_seconds=_max_audio_seconds(model_args, model_checkpoint.path),
        cmvn_stats=_cmvn_stats(model_dir / CMVN_FILE, encoder_config.idim),
        lora=lora,
    )


def _find_llm_folder(model_dir: Path, llm_dir: Path | None) -> tuple[Path, str]:
    """The Qwen2 folder (resolved) and the release layout."""
    linked = model_dir / QWEN2_FOLDER
    bundled = linked.is_dir() and not linked.is_symlink()
    if llm_dir is not None:
        if not Path(llm_dir).is_dir():
            raise ConversionError(f"--llm-dir {llm_dir} is not a folder: pass the Qwen2-7B-Instruct folder")
        return Path(llm_dir).resolve(), "v2" if bundled else "v1"
    if linked.is_symlink() and not linked.exists():
        raise ConversionError(
            f"{linked} is a broken symlink (-> {os.readlink(linked)}): point it at your Qwen2-7B-Instruct folder "
            f"with `ln -sfn /path/to/Qwen2-7B-Instruct {linked}`, or pass --llm-dir"
        )
    if linked.exists() and not linked.is_dir():
        raise ConversionError(
            f"{linked} is not a folder: make it the Qwen2-7B-Instruct folder or a link to it, or pass --llm-dir"
        )
    if not linked.exists():
        raise ConversionError(
            f"no {QWEN2_FOLDER} in {model_dir}: link the Qwen2-7B-Instruct folder as the original README says "
            f"(`ln -s /path/to/Qwen2-7B-Instruct {linked}`), or pass --llm-dir"
        )
    return linked.resolve(), "v2" if bundled else "v1"


def _args_of(checkpoint: Checkpoint) -> argparse.Namespace:
    args = checkpoint.package.get("args")
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(
            f"{checkpoint.path} has no training args (an argparse.Namespace under 'args'): {_DOWNLOAD_AGAIN}"
        )
    return args


def _required_arg(args: argparse.Namespace, name: str, path: Path):
    value = getattr(args, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConversionError(
            f"the args of {path} lack a positive integer {name} (found {value!r}): {_DOWNLOAD_AGAIN}"
        )
    return value


def _max_audio_seconds(args: argparse.Namespace, path: Path) -> float:
    """The clip limit the model was trained with (`input_length_max`; the original's default 30 s)."""
    try:
        return spec.check_max_audio_seconds(getattr(args, "input_length_max", spec.MAX_CLIP_SECONDS))
    except ValueError as error:
        raise ConversionError(f"input_length_max in the args of {path}: {error}; {_DOWNLOAD_AGAIN}") from None


def _state_dict_of(checkpoint: Checkpoint, required: bool) -> dict[str, torch.Tensor]:
    state = checkpoint.package.get("model_state_dict")
    if state is None and not required:
        return {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{checkpoint.path} has no model_state_dict of tensors: {_DOWNLOAD_AGAIN}")
    for name, tensor in state.items():
        problem = tensor_problem(name, tuple(tensor.shape))
        if problem is not None:
            raise ConversionError(f"{checkpoint.path}: {problem}: {_DOWNLOAD_AGAIN}")
    return state


def _refuse_unknown_keys(checkpoint: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    for key in state:
        if not key.startswith((ENCODER_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX)):
            raise ConversionError(
                f"{checkpoint.path} holds unknown tensor {key} (expected encoder.*, encoder_projector.* or llm.* LoRA "
                f"factors): {_DOWNLOAD_AGAIN}"
            )


def _read_llm_folder(path: Path) -> Qwen2Folder:
    fix = f"{path} must be a Qwen2-7B-Instruct folder (config.json, safetensors weights, tokenizer files)"
    config = _qwen2_config(path / "config.json", fix)
    weights = SafetensorsFolder(path, fix)
    unknown = [name for name in weights.tensors if not _QWEN2_TENSOR.match(name)]
    if unknown:
        raise ConversionError(f"{path} holds {unknown[0]}, which is not a Qwen2 tensor (model.*, lm_head.*): {fix}")
    embedding = weights.tensors.get("model.embed_tokens.weight")
    expected = (config["vocab_size"], config["hidden_size"])
    if embedding is None or embedding.shape != expected:
        found = list(embedding.shape) if embedding else "nothing"
        raise ConversionError(
            f"model.embed_tokens.weight in {path} is {found}, expected {list(expected)} from config.json: {fix}"
        )
    layers = {int(m.group(1)) for name in weights.tensors if (m := re.match(r"^model\.layers\.(\d+)\.", name))}
    if layers != set(range(config["num_hidden_layers"])):
        raise ConversionError(
            f"{path} holds weights of {len(layers)} decoder layers, "
            f"config.json says {config['num_hidden_layers']}: {fix}"
        )
    tokenizer = inspect_tokenizer(path, embedding_rows=config["vocab_size"])
    return Qwen2Folder(path=path, config=config, weights=weights, tokenizer=tokenizer)


def _qwen2_config(path: Path, fix: str) -> dict:
    """config.json reduced to `QWEN2_CONFIG_KEYS`, each value checked; the sizes the converter uses required."""
    check_readable(path, fix)
    try:
        stored = load_json(path)
    except UnsafeInput as error:
        raise ConversionError(f"{path} cannot be used: {error}; {fix}") from None
    if stored.get("model_type") != "qwen2":
        raise ConversionError(f"{path} has model_type {str(stored.get('model_type'))[:40]!r}, expected 'qwen2': {fix}")
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if field not in stored:
            raise ConversionError(f"{path} lacks {field}: {fix}")
    config = {key: value for key, value in stored.items() if key in QWEN2_CONFIG_KEYS}
    for key, value in config.items():
        if not QWEN2_CONFIG_KEYS[key](value):
            raise ConversionError(f"{path} gives {key} as {str(value)[:40]!r}, which a Qwen2 config cannot hold: {fix}")
    return config


def _pick_encoder(
    model_checkpoint: Checkpoint, model_state: dict[str, torch.Tensor], encoder_checkpoint: Checkpoint
) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """The fine-tuned encoder of model.pth.tar; asr_encoder.pth.tar's only if model.pth.tar has none.

    asr_encoder.pth.tar may also hold AED weights: the LLM's encoder was
    fine-tuned after that, so its copy in model.pth.tar always wins.
    """
    encoder = {k: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}
    if encoder:
        return model_checkpoint, encoder
    aed_state = _state_dict_of(encoder_checkpoint, required=False)
    encoder = {k: v for k, v in aed_state.items() if k.startswith(ENCODER_PREFIX)}
    if encoder:
        return encoder_checkpoint, encoder
    raise ConversionError(
        f"no encoder weights (encoder.*) in {model_checkpoint.path} or {encoder_checkpoint.path}: {_DOWNLOAD_AGAIN}"
    )


def _expect_shape(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], path: Path, why: str) -> None:
    if name not in tensors:
        raise ConversionError(f"{path} lacks {name}: {_DOWNLOAD_AGAIN}")
    found = tuple(tensors[name].shape)
    if found != shape:
        raise ConversionError(
            f"{name} in {path} has shape {list(found)}, expected {list(shape)} ({why}): the checkpoint does not "
            f"match its args; {_DOWNLOAD_AGAIN}"
        )


def _encoder_config(
    args: argparse.Namespace, args_path: Path, tensors: dict[str, torch.Tensor], path: Path
) -> FireRedAsrEncoderConfig:
    """Encoder hyper-parameters from asr_encoder.pth.tar's args, checked against the tensors."""
    idim, n_layers, n_head, d_model, kernel = (
        _required_arg(args, name, args_path) for name in ("idim", "n_layers_enc", "n_head", "d_model", "kernel_size")
    )
    if d_model % n_head:
        raise ConversionError(
            f"the args of {args_path} give d_model {d_model} not divisible by n_head {n_head}: {_DOWNLOAD_AGAIN}"
        )

    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, tensor in tensors.items():
        if match := _ENCODER_LAYER.match(name):
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tuple(tensor.shape)
    if sorted(layers) != list(range(n_layers)):
        raise ConversionError(
            f"{path} holds {len(layers)} encoder layers, its args say n_layers_enc={n_layers}: {_DOWNLOAD_AGAIN}"
        )
    for index, layer in layers.items():
        if layer != layers[0]:
            differing = sorted(set(layer.items()) ^ set(layers[0].items()))[0][0]
            raise ConversionError(
                f"encoder layer {index} of {path} differs from layer 0 at {differing}: {_DOWNLOAD_AGAIN}"
            )

    conv0 = "encoder.input_preprocessor.conv.0.weight"
    if conv0 not in tensors or tensors[conv0].dim() != 4:
        raise ConversionError(f"{path} lacks the subsampling convolution {conv0}: {_DOWNLOAD_AGAIN}")
    channels = tensors[conv0].shape[0]
    subsampled_idim = spec.subsampled_feature_width(idim)
    checks = (
        (
            "encoder.input_preprocessor.out.weight",
            (d_model, channels * subsampled_idim),
            f"d_model {d_model}, idim {idim}",
        ),
        ("encoder.layer_stack.0.mhsa.pos_bias_u", (n_head, d_model // n_head), f"n_head {n_head}"),
        ("encoder.layer_stack.0.conv.depthwise_conv.weight", (2 * d_model, 1, kernel), f"kernel_size {kernel}"),
        ("encoder.positional_encoding.pe", (1, 2 * spec.RELATIVE_POSITION_MAX_LEN - 1, d_model), "relative positions"),
    )
    for name, shape, why in checks:
        _expect_shape(tensors, name, shape, path, why)
    return FireRedAsrEncoderConfig(
        idim=idim, n_layers=n_layers, n_head=n_head, d_model=d_model, kernel_size=kernel, subsampling_channels=channels
    )


def _projector_tensors(
    state: dict[str, torch.Tensor], path: Path, encoder_dim: int, downsample_rate: int, llm_hidden: int
) -> dict[str, torch.Tensor]:
    expected = {
        "linear1.weight": (llm_hidden, encoder_dim * downsample_rate),
        "linear1.bias": (llm_hidden,),
        "linear2.weight": (llm_hidden, llm_hidden),
        "linear2.bias": (llm_hidden,),
    }
    why = f"encoder dim {encoder_dim} x downsample rate {downsample_rate} -> Qwen2 hidden size {llm_hidden}"
    tensors = {k: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    for suffix, shape in expected.items():
        _expect_shape(tensors, PROJECTOR_PREFIX + suffix, shape, path, why)
    if len(tensors) != len(expected):
        extra = sorted(set(tensors) - {PROJECTOR_PREFIX + s for s in expected})[0]
        raise ConversionError(f"{path} holds unknown tensor {extra}: {_DOWNLOAD_AGAIN}")
    return tensors


def _lora(
    args: argparse.Namespace, state: dict[str, torch.Tensor], path: Path, llm: Qwen2Folder, alpha: float | None
) -> LoraAdapter | None:
    if alpha is not None and not alpha > 0:
        raise ConversionError(f"--lora-alpha must be positive, got {alpha}")
    targets = {name: stored.shape for name, stored in llm.weights.tensors.items()}
    lora = collect_lora(
        {k: v for k, v in state.items() if k.startswith(LLM_PREFIX)},
        targets,
        llm.num_layers,
        spec.LORA_DEFAULT_ALPHA if alpha is None else alpha,
        path,
    )
    # The original wraps Qwen2 in LoRA only when the LLM was trained (freeze_llm=0, use_lora=1).
    uses_lora = bool(getattr(args, "use_lora", lora is not None)) and not getattr(args, "freeze_llm", False)
    if uses_lora and lora is None:
        raise ConversionError(
            f"the args of {path} say the LLM was LoRA-tuned but it holds no LoRA factors: {_DOWNLOAD_AGAIN}"
        )
    if lora is not None and not uses_lora:
        raise ConversionError(
            f"{path} holds LoRA factors but its args say they were not used (use_lora/freeze_llm): {_DOWNLOAD_AGAIN}"
        )
    return lora


def _cmvn_stats(path: Path, idim: int) -> np.ndarray:
    stats = read_kaldi_matrix(path)
    if stats.shape != (2, idim + 1):
        raise ConversionError(
            f"{path} holds a {stats.shape[0]} x {stats.shape[1]} matrix, expected 2 x {idim + 1} "
            f"(sums and squares of {idim} dims plus the frame count): {_DOWNLOAD_AGAIN}"
        )
    try:
        spec.cmvn_from_stats(stats)
    except ValueError as error:
        raise ConversionError(f"{path}: {error}: the statistics are empty or damaged; {_DOWNLOAD_AGAIN}") from None
    return stats
