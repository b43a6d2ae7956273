"""The LoRA factors in `model.pth.tar` and their merge into the Qwen2 weights."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import spec
from .errors import ConversionError

# PEFT's names: llm.base_model.model.<Qwen2 module>.lora_{A,B}.default.weight
LORA_KEY = re.compile(r"^llm\.base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.default\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """The factors of one adapted Qwen2 weight W [out, in]: A [r, in] and B [out, r]."""

    target: str  # the Qwen2 tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    lora_a: torch.Tensor
    lora_b: torch.Tensor


@dataclass(frozen=True)
class LoraAdapter:
    rank: int
    alpha: float
    pairs: dict[str, LoraPair]  # by target name

    @property
    def scale(self) -> float:
        return spec.lora_scale(self.alpha, self.rank)


def expected_targets(num_layers: int) -> list[str]:
    """The Qwen2 weights the original adapts: the seven projections of every layer."""
    return [
        f"model.layers.{layer}.{module}.weight" for layer in range(num_layers) for module in spec.LORA_TARGET_MODULES
    ]


def collect_lora(
    tensors: dict[str, torch.Tensor],
    target_shapes: dict[str, tuple[int, ...]],
    num_layers: int,
    alpha: float,
    checkpoint: Path,
) -> LoraAdapter | None:
    """Pair up the `llm.*` tensors of the checkpoint and check them against the Qwen2 weights.

    Returns None when there are none. Refuses keys that are not LoRA factors,
    incomplete A/B pairs, targets other than the original's seven projections per
    layer, and shapes that do not fit the weight they adapt.
    """
    if not tensors:
        return None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise ConversionError(
                f"{checkpoint} holds {key}, which is not a LoRA factor (…lora_A/lora_B.default.weight): "
                "only LoRA fine-tunes of Qwen2 are supported; use the original release files"
            )
        factors.setdefault(f"{match['module']}.weight", {})[match["factor"]] = tensor

    damaged = f"{checkpoint} is damaged or not a FireRedASR-LLM release; download it again"
    for target, pair in factors.items():
        if len(pair) != 2:
            present, missing = ("lora_A", "lora_B") if "A" in pair else ("lora_B", "lora_A")
            raise ConversionError(f"incomplete LoRA pair for {target}: {present} without {missing}; {damaged}")

    expected = expected_targets(num_layers)
    missing = [t for t in expected if t not in factors]
    unexpected = sorted(set(factors) - set(expected))
    if missing or unexpected:
        detail = f"no LoRA for {missing[0]}" if missing else f"LoRA for unexpected weight {unexpected[0]}"
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected of {len(expected)} expected"
        raise ConversionError(f"{detail} ({counts}); {damaged}")

    ranks = {pair["A"].shape[0] for pair in factors.values() if pair["A"].dim() == 2}
    rank = min(ranks) if ranks else 0
    pairs = {}
    for target in expected:
        lora_a, lora_b = factors[target]["A"], factors[target]["B"]
        out_features, in_features = target_shapes[target]
        for factor, tensor, shape in (
            ("lora_A", lora_a, (rank, in_features)),
            ("lora_B", lora_b, (out_features, rank)),
        ):
            if tuple(tensor.shape) != shape:
                raise ConversionError(
                    f"{factor} of {target} has shape {list(tensor.shape)}, expected {list(shape)} "
                    f"(rank {rank}, weight {[out_features, in_features]}); {damaged}"
                )
            if not tensor.is_floating_point():
                raise ConversionError(f"{factor} of {target} has dtype {tensor.dtype}, expected floats; {damaged}")
        pairs[target] = LoraPair(target=target, lora_a=lora_a, lora_b=lora_b)
    return LoraAdapter(rank=rank, alpha=alpha, pairs=pairs)


def merge_rows_(weight_rows: torch.Tensor, lora_b_rows: torch.Tensor, lora_a: torch.Tensor, scale: float) -> None:
    """W += scale * B @ A in place, for fp32 rows of W and the same rows of B.

    Each row of the result depends only on the same row of W and of B, so a large
    weight can be merged a block of rows at a time.
    """
    weight_rows.addmm_(lora_b_rows.to(torch.float32), lora_a.to(torch.float32), alpha=scale)
