"""Checks of the written repo, run before it is moved into place.

The index and every shard header must list exactly the planned tensors with
their planned shapes and dtype. Then rows of sampled tensors are read back and
compared with the sources: copies bit for bit (after the same cast), LoRA merges
against an independent float64 recomputation of W + (alpha/r) * B @ A.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConversionError
from .plan import ConversionPlan, PlannedTensor
from .repo_format import DTYPE_NAMES, INDEX_NAME, SAFETENSORS_DTYPE_NAMES

# A merged value may differ from the float64 reference by the output dtype's
# rounding (under one ulp: the relative term) plus fp32 accumulation error
# (an absolute term relative to the row's largest value).
_MERGE_RELATIVE_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _fail(problem: str) -> ConversionError:
    return ConversionError(
        f"verification of the written repo failed: {problem}; nothing was written, please report this bug"
    )


def check_index_and_shards(folder: Path, plan: ConversionPlan) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    if index["weight_map"] != dict(sorted(plan.weight_map().items())):
        raise _fail(f"{INDEX_NAME} does not list the planned tensors")
    if index["metadata"]["total_size"] != plan.total_size:
        raise _fail(f"{INDEX_NAME} total_size is not {plan.total_size}")
    for shard in plan.shards:
        with safe_open(folder / shard.filename, framework="pt") as stored:
            if stored.metadata() != {"format": "pt"}:
                raise _fail(f"{shard.filename} metadata is {stored.metadata()}")
            if set(stored.keys()) != {tensor.name for tensor in shard.tensors}:
                raise _fail(f"{shard.filename} does not hold the planned tensors")
            for tensor in shard.tensors:
                stored_slice = stored.get_slice(tensor.name)
                if (
                    tuple(stored_slice.get_shape()) != tensor.shape
                    or stored_slice.get_dtype() != SAFETENSORS_DTYPE_NAMES[plan.dtype]
                ):
                    raise _fail(
                        f"{tensor.name} is {stored_slice.get_dtype()} {stored_slice.get_shape()}, "
                        f"planned {DTYPE_NAMES[plan.dtype]} {list(tensor.shape)}"
                    )


def _sample_rows(rows: int) -> list[int]:
    return sorted({0, rows // 2, rows - 1})


def _check_copied(tensor: PlannedTensor, stored, dtype: torch.dtype) -> None:
    if not tensor.shape:
        expected, found = tensor.source.read_rows(0, 1).to(dtype), stored.get_tensor(tensor.name)
    else:
        row = tensor.shape[0] - 1
        expected, found = tensor.source.read_rows(row, row + 1).to(dtype), stored.get_slice(tensor.name)[row : row + 1]
    if not torch.equal(expected.reshape(-1).view(torch.uint8), found.reshape(-1).view(torch.uint8)):
        raise _fail(f"{tensor.name} does not equal its source")


def _check_merged(tensor: PlannedTensor, stored, dtype: torch.dtype, scale: float) -> None:
    lora = tensor.lora
    lora_a = lora.lora_a.to(torch.float64)
    for row in _sample_rows(tensor.shape[0]):
        weight = tensor.source.read_rows(row, row + 1).to(torch.float64)
        reference = weight + scale * (lora.lora_b[row : row + 1].to(torch.float64) @ lora_a)
        found = stored.get_slice(tensor.name)[row : row + 1].to(torch.float64)
        tolerance = _MERGE_RELATIVE_TOLERANCE[dtype] * reference.abs() + 1e-6 * reference.abs().max()
        if not bool(((found - reference).abs() <= tolerance).all()):
            worst = (found - reference).abs().max().item()
            raise _fail(f"row {row} of merged {tensor.name} is off by up to {worst:g} from W + (alpha/r) B A")


def sampled_tensors(plan: ConversionPlan) -> list[PlannedTensor]:
    """What check_tensor_values reads back: the merged weights of the first and the last
    decoder layer, and the first and last tensor of every shard.

    Every tensor would mean re-reading ~19 GB of sources that the conversion has
    long pushed out of the page cache; errors in the merge or the block loop show
    in any merged tensor, and shard boundaries catch offset mistakes.
    """
    chosen = {id(tensor) for shard in plan.shards for tensor in (shard.tensors[0], shard.tensors[-1])}
    merged = [tensor for tensor in plan.tensors if tensor.lora is not None]
    if merged:
        layers = {_decoder_layer(tensor) for tensor in merged}
        chosen |= {id(t) for t in merged if _decoder_layer(t) in (min(layers), max(layers))}
    return [tensor for tensor in plan.tensors if id(tensor) in chosen]


def _decoder_layer(tensor: PlannedTensor) -> int:
    return int(tensor.lora.target.split(".")[2])  # model.layers.<i>.…


def check_tensor_values(folder: Path, plan: ConversionPlan) -> None:
    """Sampled rows of sampled tensors against their sources."""
    sampled = {id(tensor) for tensor in sampled_tensors(plan)}
    for shard in plan.shards:
        with safe_open(folder / shard.filename, framework="pt") as stored:
            for tensor in shard.tensors:
                if id(tensor) not in sampled:
                    continue
                if tensor.lora is None:
                    _check_copied(tensor, stored, plan.dtype)
                else:
                    _check_merged(tensor, stored, plan.dtype, plan.lora_scale)
                tensor.source.done()
