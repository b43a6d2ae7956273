"""The converted repo's format contract: file names, tensor-name prefixes, shard naming, dtype names.

Every package, benchmark and script that writes or reads a converted repo takes
these names from here. Does not hold the model's maths (`spec`) or the release's
own layout (`release`).
"""

from __future__ import annotations

import torch

# Weights: Hugging Face's sharded safetensors layout (the release's Qwen2 folder uses it too).
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
# Every name SHARD_NAME gives, as an fnmatch pattern: no `*`, so it never matches a
# path in a subfolder (fnmatch's `*` crosses `/`).
SHARD_NAME_GLOB = SHARD_NAME.replace("{index:05d}", "[0-9]" * 5).replace("{count:05d}", "[0-9]" * 5)

# Tensor names: the speech encoder and adapter keep the release's names (`encoder.*`,
# `encoder_projector.*`); Qwen2's tensors, LoRA merged, go under `language_model.`.
ENCODER_PREFIX = "encoder."
PROJECTOR_PREFIX = "encoder_projector."
SPEECH_ENCODER_PREFIXES = (ENCODER_PREFIX, PROJECTOR_PREFIX)
LANGUAGE_MODEL_PREFIX = "language_model."

# Output dtypes: the converter's short names, their torch dtypes, the names config.json
# and vLLM use, and safetensors' header spellings.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def dtype_name(short_name: str) -> str:
    """The config/vLLM name of a converter dtype: "bf16" -> "bfloat16"."""
    return DTYPE_NAMES[DTYPES[short_name]]
