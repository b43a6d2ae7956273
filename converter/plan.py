"""The conversion plan: every output tensor, where it comes from, and which shard it goes to.

Output tensors are produced a block of rows at a time (`PlannedTensor.blocks`),
cast once to the output dtype; LoRA targets are merged in fp32 block by block.
Shards are filled in plan order up to `max_shard_size`, as Hugging Face does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import ConversionError
from .lora import LoraPair, merge_rows_
from .release import LAYOUTS, Release
from .repo_format import DTYPE_NAMES, DTYPES, LANGUAGE_MODEL_PREFIX, SHARD_NAME
from .sources import Checkpoint, SafetensorsFolder
from .spec import SPEECH_TOKEN

DEFAULT_MAX_SHARD_SIZE = "5GB"
# Rows are converted in blocks of about this many elements: large enough for
# fast kernels, small enough that a block's fp32 working set stays tens of MB.
BLOCK_ELEMENTS = 4 << 20

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(size: str | int) -> int:
    """Bytes in "5GB" (10^9, as Hugging Face counts), "500MiB" (2^20) or a plain int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if match is None:
            raise ConversionError(f"cannot read size {size!r}: write it like 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ConversionError(f"size {size!r} must be positive")
    return value


def format_size(num_bytes: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{num_bytes} B"


class TensorSource(Protocol):
    dtype: torch.dtype

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) (a 0-d tensor whole), possibly in `buffer` (flat, of `dtype`)."""

    def done(self) -> None:
        """Called once the tensor has been written."""


@dataclass(frozen=True)
class CheckpointTensor:
    """A tensor of a pickled checkpoint (memory-mapped when the format allows)."""

    checkpoint: Checkpoint
    tensor: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        # A view: the memory map already is the buffer.
        return self.tensor[start:stop] if self.tensor.dim() else self.tensor

    def done(self) -> None:
        self.checkpoint.release_pages(self.tensor)


@dataclass(frozen=True)
class SafetensorsTensor:
    """A tensor of the Qwen2 folder, read from its shard on demand."""

    folder: SafetensorsFolder
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return self.folder.tensors[self.name].dtype

    def read_rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self.folder.read_rows(self.name, start, stop, buffer)

    def done(self) -> None:
        pass


class BlockBuffers:
    """Scratch tensors reused from block to block.

    A fresh allocation per block would cost page faults on every block, which
    on a ~17 GB conversion adds up to more than the arithmetic. Each role
    rotates through `slots` buffers, so a block handed to a write queue stays
    intact while the next `slots - 1` blocks are computed.
    """

    def __init__(self, slots: int = 1):
        self._slots = slots
        self._flat: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}
        self._turns: Counter = Counter()

    def get(self, role: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = (role, dtype, self._turns[(role, dtype)] % self._slots)
        self._turns[(role, dtype)] += 1
        flat = self._flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self._flat[key] = torch.empty(numel, dtype=dtype)
        return flat[:numel]


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # the converted repo's name
    shape: tuple[int, ...]
    source: TensorSource
    lora: LoraPair | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * dtype.itemsize

    def blocks(self, dtype: torch.dtype, lora_scale: float, buffers: BlockBuffers) -> Iterator[torch.Tensor]:
        """The output tensor a block of rows at a time, cast once to `dtype`.

        A block is only valid until the next one is asked for: the buffers are reused.
        """
        rows = self.shape[0] if self.shape else 1
        row_numel = math.prod(self.shape[1:])
        block_rows = max(1, BLOCK_ELEMENTS // max(1, row_numel))
        lora_a = None if self.lora is None else self.lora.lora_a.to(torch.float32)
        for start in range(0, rows, block_rows):
            stop = min(rows, start + block_rows)
            numel = (stop - start) * row_numel
            values = self.source.read_rows(start, stop, buffers.get("read", self.source.dtype, numel))
            if self.lora is not None:
                merged = buffers.get("merge", torch.float32, numel).view(values.shape)
                merged.copy_(values)
                merge_rows_(merged, self.lora.lora_b[start:stop], lora_a, lora_scale)
                values = merged
            if values.dtype != dtype:
                values = buffers.get("cast", dtype, numel).view(values.shape).copy_(values)
            yield self._checked(values)

    def _checked(self, values: torch.Tensor) -> torch.Tensor:
        # min/max propagate NaN, so both are finite exactly when every value is.
        if values.numel() and values.is_floating_point():
            low, high = torch.aminmax(values)
            if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                origin = "merging its LoRA factors and casting" if self.lora is not None else "casting"
                raise ConversionError(
                    f"{self.name} has NaN or infinite values after {origin} to {DTYPE_NAMES[values.dtype]}: "
                    "check the release files, or convert with --dtype fp32 if fp16's range is exceeded"
                )
        return values


@dataclass(frozen=True)
class PlannedShard:
    filename: str
    tensors: list[PlannedTensor]


@dataclass(frozen=True)
class ConversionPlan:
    dtype: torch.dtype
    lora_scale: float
    shards: list[PlannedShard]

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [tensor for shard in self.shards for tensor in shard.tensors]

    @property
    def total_size(self) -> int:
        return sum(tensor.nbytes(self.dtype) for tensor in self.tensors)

    def weight_map(self) -> dict[str, str]:
        return {tensor.name: shard.filename for shard in self.shards for tensor in shard.tensors}


def plan_tensors(release: Release, language_model_prefix: str = LANGUAGE_MODEL_PREFIX) -> list[PlannedTensor]:
    """Every output tensor in write order: encoder, adapter, then Qwen2 in storage order.

    Encoder and adapter keep the original's names; the Qwen2 names get `language_model_prefix`.
    """
    planned = [
        PlannedTensor(name, tuple(tensor.shape), CheckpointTensor(release.encoder_source, tensor))
        for name, tensor in release.encoder_tensors.items()
    ]
    planned += [
        PlannedTensor(name, tuple(tensor.shape), CheckpointTensor(release.model_checkpoint, tensor))
        for name, tensor in release.projector_tensors.items()
    ]
    lora_pairs = release.lora.pairs if release.lora is not None else {}
    weights = release.llm.weights
    planned += [
        PlannedTensor(
            language_model_prefix + name, stored.shape, SafetensorsTensor(weights, name), lora_pairs.get(name)
        )
        for name, stored in weights.tensors.items()
    ]
    return planned


def build_plan(
    release: Release, dtype: str, max_shard_size: str | int, language_model_prefix: str = LANGUAGE_MODEL_PREFIX
) -> ConversionPlan:
    lora_scale = release.lora.scale if release.lora is not None else 0.0
    return shard_plan(plan_tensors(release, language_model_prefix), dtype, max_shard_size, lora_scale)


def shard_plan(
    tensors: list[PlannedTensor], dtype: str, max_shard_size: str | int, lora_scale: float = 0.0
) -> ConversionPlan:
    """`tensors` in shards of at most `max_shard_size` bytes each (in `dtype`), filled in order."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    limit = parse_size(max_shard_size)
    groups: list[list[PlannedTensor]] = []
    filled = 0
    for tensor in tensors:
        size = tensor.nbytes(torch_dtype)
        # A tensor larger than the limit gets a shard of its own.
        if not groups or (groups[-1] and filled + size > limit):
            groups.append([])
            filled = 0
        groups[-1].append(tensor)
        filled += size
    shards = [PlannedShard(SHARD_NAME.format(index=i + 1, count=len(groups)), group) for i, group in enumerate(groups)]
    return ConversionPlan(dtype=torch_dtype, lora_scale=lora_scale, shards=shards)


def describe(release: Release, plan: ConversionPlan, speech_token: str = SPEECH_TOKEN) -> list[str]:
    """The plan as `--dry-run` prints it."""
    encoder = release.encoder_config
    lines = [
        f"release: {release.model_dir} ({release.layout}: {LAYOUTS[release.layout]})",
        f"Qwen2 folder: {release.llm.path}",
        f"encoder: from {release.encoder_source.path.name}, {encoder.n_layers} layers, d_model {encoder.d_model}, "
        f"{encoder.n_head} heads, kernel {encoder.kernel_size}",
        f"adapter: downsample rate {release.encoder_downsample_rate}",
    ]
    if release.lora is None:
        lines.append("LoRA: none, Qwen2 weights copied as they are")
    else:
        lora = release.lora
        lines.append(
            f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.scale:g}), "
            f"{len(lora.pairs)} weights merged in fp32"
        )
    lines += [
        f"tokenizer: {speech_token} added as token {release.llm.tokenizer.speech_token_id} "
        f"(embedding of {release.llm.config['vocab_size']} rows kept as is)",
        f"output: {DTYPE_NAMES[plan.dtype]}, {len(plan.tensors)} tensors, {format_size(plan.total_size)} "
        f"in {len(plan.shards)} shard(s):",
    ]
    for shard in plan.shards:
        conversions = Counter(
            f"{DTYPE_NAMES[t.source.dtype]}{' + LoRA' if t.lora is not None else ''}" for t in shard.tensors
        )
        sources = ", ".join(f"{count} from {kind}" for kind, count in sorted(conversions.items()))
        size = sum(t.nbytes(plan.dtype) for t in shard.tensors)
        lines.append(
            f"  {shard.filename}: {len(shard.tensors)} tensors, {format_size(size)} "
            f"({shard.tensors[0].name} .. {shard.tensors[-1].name}; {sources})"
        )
    return lines
