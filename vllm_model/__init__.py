"""vLLM plugin for converted FireRedASR-LLM and FireRedASR-AED repos, and the Python API on top of it.

Installing this project registers `register` under vLLM's `vllm.general_plugins`
entry point group, so `LLM(model=OUT)` and `vllm serve OUT` find the model class
named in a converted repo's `config.json` without any change to vLLM.

`FireRedAsr(OUT).transcribe(audio)` transcribes audio of any length (`api.py`);
its names are importable from here and loaded on first use, so vLLM's processes,
which import this package to call `register`, do not load the API's modules.
"""

from __future__ import annotations

import importlib

MODEL_CLASS_PATH = "fireredasr_vllm.model:FireRedAsrLlmForConditionalGeneration"
AED_MODEL_CLASS_PATH = "fireredasr_vllm.aed_model:FireRedAsrAedForConditionalGeneration"

# The public API: name -> the module that holds it.
_API = {
    "FireRedAsr": "api",
    "Transcription": "api",
    "TranscriptionInfo": "api",
    "TimedText": "transcript_formats",
    "Decoding": "decoding",
    "GREEDY": "decoding",
    "ORIGINAL_RECIPE": "decoding",
    "AedDecoding": "decoding",
    "AED_RECIPE": "decoding",
    "SegmenterSettings": "segmenter",
    "TranscriptionError": "errors",
    "AudioError": "errors",
    "TooLongForModel": "errors",
    "EngineError": "errors",
    "TranscriptionFailed": "errors",
}
__all__ = ["register", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the config classes with transformers and the model classes with vLLM.

    vLLM calls this in every process it starts, possibly more than once, so it
    is idempotent; a vLLM outside the tested range gets one warning line per
    process (`vllm_support`). vLLM is imported here rather than at module level:
    the reference implementation in this package must import without vLLM.
    """
    import vllm
    from vllm import ModelRegistry

    from fireredasr_converter.configuration import AED_ARCHITECTURE, ARCHITECTURE, register_with_transformers

    from .vllm_support import warn_if_untested

    warn_if_untested(vllm.__version__)
    register_with_transformers()
    # The "module:Class" form defers importing a model (and torch code) until vLLM needs it.
    for architecture, class_path in ((ARCHITECTURE, MODEL_CLASS_PATH), (AED_ARCHITECTURE, AED_MODEL_CLASS_PATH)):
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, class_path)
