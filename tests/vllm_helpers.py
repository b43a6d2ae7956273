"""Settings and checks shared by the tests that run the plugin in a vLLM engine."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tolerances import float32_atol, speech_encoder_reduction_length

from fireredasr_converter import spec
from fireredasr_converter.fixtures import TINY_SHAPES
from fireredasr_vllm import engine as engine_module
from fireredasr_vllm.engine import CPU_ENGINE_SETTINGS, DEFAULT_MAX_MODEL_LEN

# vLLM's CPU backend sizes its KV cache from this variable (GiB); the tiny model needs little.
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}

# The engines tests build without `create_engine` (stock vLLM, the server, Model Runner V2's
# parts) get its CPU settings too. MAX_MODEL_LEN holds the longest accepted clip (30 s:
# N = 375 placeholders) plus the prompt and N generated tokens.
MAX_MODEL_LEN = DEFAULT_MAX_MODEL_LEN
ENGINE_KWARGS = {**CPU_ENGINE_SETTINGS, "max_model_len": MAX_MODEL_LEN, "seed": 0}

def _same_dtype_as_auto(model, dtype: str) -> str:
    """`dtype` as the engine runs it, for a bf16 repo: "auto" and "bfloat16" build the same engine.

    (The CLI and the API ask for the repo's own dtype by name, a plain `create_engine(repo)`
    for "auto".) An fp32 repo's "auto" stays itself: vLLM would run it in half precision.
    """
    if dtype != "auto":
        return dtype
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    return "bfloat16" if (config.get("torch_dtype") or config.get("dtype")) == "bfloat16" else dtype


# The product's functions, whatever `share_engines` does to the modules that imported them.
PRODUCT_CREATE_ENGINE, PRODUCT_SHUTDOWN_ENGINE = engine_module.create_engine, engine_module.shutdown_engine


class Engines:
    """The suite's vLLM engines, built with the product's `create_engine`: at most one alive at a time.

    `get(model, **settings)` hands back the live engine when it was built for the same
    model and settings, and otherwise shuts it down and builds the one asked for. The
    settings are completed with `create_engine`'s and the CLI's defaults before they are
    compared, so a test asking for `dtype="float32"` and `fireredasr-transcribe` on the same
    repo (through `transcribe_in_process`) share one engine. conftest orders the tests by
    the engine they use, so each engine starts once per run.
    """

    DEFAULTS = {"penalty_processor": False, "dtype": "auto", "max_model_len": MAX_MODEL_LEN, "tensor_parallel_size": 1, "seed": 0}

    def __init__(self):
        self.key: tuple | None = None
        self.engine = None

    def get(self, model, **settings):
        settings = {**self.DEFAULTS, **settings}
        key_settings = {**settings, "dtype": _same_dtype_as_auto(model, settings["dtype"])}
        key = (str(Path(model).resolve()), tuple(sorted(key_settings.items())))
        if self.engine is not None and key == self.key:
            return self.engine
        self.close()
        # vLLM caches rotary embeddings process-wide by shape and dtype; test_model_runner_v2
        # builds a model on the meta device, whose cached meta tables a later in-process
        # engine of the same shape would reuse ("Cannot copy out of meta tensor").
        from vllm.model_executor.layers import rotary_embedding

        rotary_embedding._ROPE_DICT.clear()
        with pytest.MonkeyPatch.context() as env:
            # test_recipe sends a function to the engine with apply_model (its encoder count).
            env.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            # The engine core in this process, as create_engine builds it for users on CPU.
            env.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
            # Statistics on: test_recipe's prefix-cache test reads the engine's hit counters.
            self.engine = PRODUCT_CREATE_ENGINE(model, disable_log_stats=False, **settings)
        self.key = key
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            engine, self.engine, self.key = self.engine, None, None
            PRODUCT_SHUTDOWN_ENGINE(engine)


@contextlib.contextmanager
def share_engines(engines: Engines) -> Iterator[Engines]:
    """While it lasts, the package's `create_engine` calls in this process go to `engines.get`.

    Every module of `fireredasr_vllm` that imported `create_engine` (the CLI, the API,
    the decoders, `offline`) calls `engines.get` with its own settings, so a call with
    the settings of the live engine gets that engine, and `shutdown_engine` leaves it
    to `engines`. The CLI's logging variables (quiet_vllm_logs sets them for its
    process) are restored at the end.
    """
    from fireredasr_vllm import api, decoders, offline, transcribe  # noqa: F401  (loaded before patching)

    def shutdown(llm):
        if llm is not engines.engine:
            PRODUCT_SHUTDOWN_ENGINE(llm)

    with pytest.MonkeyPatch.context() as patch:
        for name, module in list(sys.modules.items()):
            if name.startswith("fireredasr_vllm."):
                if getattr(module, "create_engine", None) is PRODUCT_CREATE_ENGINE:
                    patch.setattr(module, "create_engine", engines.get)
                if getattr(module, "shutdown_engine", None) is PRODUCT_SHUTDOWN_ENGINE:
                    patch.setattr(module, "shutdown_engine", shutdown)
        for variable in ("VLLM_LOGGING_STREAM", "VLLM_LOGGING_LEVEL"):
            patch.setenv(variable, os.environ.get(variable, ""))
            if not os.environ[variable]:
                patch.delenv(variable)
        yield engines


# Clip lengths in samples at 16 kHz. Together they cover every residue of the fbank
# frame count T mod 4 (the encoder's ceil(T / 4) rounds differently for each), the
# shortest clip with one speech embedding, a length off the 10 ms frame grid, and 20 s.
PARITY_CLIP_SAMPLES = (
    spec.min_samples_for_one_embedding(),  # T = 5, N = 1
    1200,  # T = 6
    1360,  # T = 7
    1520,  # T = 8
    16000,  # 1 s, T = 98, N = 12
    31760,  # T = 197, N = 25
    48123,  # T = 299, off the frame grid
    67120,  # T = 418, N = 52
    197840,  # T = 1235, N = 154
    20 * spec.SAMPLE_RATE,  # 20 s, T = 1998, N = 250
)

NUM_LOGPROBS = 5


def llm_reduction_length(context: int) -> int:
    """Terms summed along one logit's path in the tiny fixture's Qwen2 (TINY_SHAPES), `context` positions.

    Per layer: RMSNorm, q/k/v over the width, scores over a head, softmax and context
    over the positions, o_proj, RMSNorm, gate/up over the width, down over the MLP width.
    Then the final RMSNorm, lm_head, and the log-softmax's sum over the vocabulary rows.
    """
    width, head, mlp = TINY_SHAPES.llm_hidden, TINY_SHAPES.llm_hidden // TINY_SHAPES.llm_heads, TINY_SHAPES.llm_intermediate
    layer = width + width + head + 2 * context + width + width + width + mlp
    return TINY_SHAPES.llm_layers * layer + width + width + TINY_SHAPES.llm_vocab_rows


def speech_embedding_atol(num_samples: int, expected) -> float:
    """Float32 reordering bound for the tiny fixture's speech embeddings of a clip of `num_samples`."""
    reductions = speech_encoder_reduction_length(
        TINY_SHAPES.encoder_dim, TINY_SHAPES.encoder_layers, spec.encoder_frame_count(spec.fbank_frame_count(num_samples)),
        kernel_size=33, llm_hidden=TINY_SHAPES.llm_hidden,
    )
    return float32_atol(reductions, float(np.abs(np.asarray(expected)).max()))


# The plugin's top-5 log-probabilities agree with the reference's within float32 reordering:
# vLLM's kernels (CPU attention, fused norms) and the reference's transformers code sum in
# other orders. Bounded for the longest clip (30 s: 750 encoder frames) and MAX_MODEL_LEN
# positions; the tiny model's normalised activations and logits are O(1). A wrong
# placeholder, mask or position moves log-probabilities by O(0.1) or more.
LOGPROB_ATOL = float32_atol(
    speech_encoder_reduction_length(
        TINY_SHAPES.encoder_dim, TINY_SHAPES.encoder_layers, spec.encoder_frame_count(spec.max_fbank_frames(30.0)),
        kernel_size=33, llm_hidden=TINY_SHAPES.llm_hidden,
    )
    + llm_reduction_length(MAX_MODEL_LEN)
)


def speech_embedding_count(num_samples: int) -> int:
    return spec.speech_embedding_count_for_samples(num_samples)


def as_vllm_text(decoded_text: str) -> str:
    """A full decode of generated ids, as vLLM's incremental detokenizer returns it.

    vLLM holds back the bytes of a UTF-8 character that is not finished when
    generation stops; a full decode shows them as trailing U+FFFD. The tiny
    fixture's random weights often stop in the middle of a byte-level character.
    """
    return decoded_text.rstrip("\ufffd")


def assert_top_logprobs_close(
    vllm_logprobs: dict[int, float], reference_logprobs: dict[int, float], step: int
) -> float:
    """Compare one decoding step's top-k log-probabilities; returns the largest difference.

    The k values must agree as a sorted list, and every token both sides rank in
    their top k must have the same log-probability. (The two sets may differ only
    where the k-th and (k+1)-th tokens tie within the tolerance.)
    """
    vllm_values = np.sort(np.fromiter(vllm_logprobs.values(), dtype=np.float64))[::-1]
    reference_values = np.sort(np.fromiter(reference_logprobs.values(), dtype=np.float64))[::-1]
    assert vllm_values.shape == reference_values.shape, f"step {step}: top-k sizes differ"
    differences = list(np.abs(vllm_values - reference_values))
    differences += [
        abs(vllm_logprobs[token] - reference_logprobs[token])
        for token in vllm_logprobs.keys() & reference_logprobs.keys()
    ]
    worst = float(max(differences))
    assert worst <= LOGPROB_ATOL, (
        f"step {step}: top-k log-probabilities differ by {worst:.2e} (> {LOGPROB_ATOL:g}): "
        f"vLLM {vllm_logprobs}, reference {reference_logprobs}"
    )
    return worst
