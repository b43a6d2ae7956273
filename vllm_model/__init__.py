"""vLLM plugin for converted FireRedASR-LLM repos.

Installing this project registers `register` under vLLM's `vllm.general_plugins`
entry point group, so `LLM(model=OUT)` and `vllm serve OUT` find the model class
named in a converted repo's `config.json` without any change to vLLM.
"""

MODEL_CLASS_PATH = "fireredasr_vllm.model:FireRedAsrLlmForConditionalGeneration"


def register() -> None:
    """Register the config classes with transformers and the model class with vLLM.

    vLLM calls this in every process it starts, possibly more than once, so it
    is idempotent; a vLLM outside the tested range gets one warning line per
    process (`vllm_support`). vLLM is imported here rather than at module level:
    the reference implementation in this package must import without vLLM.
    """
    import vllm
    from vllm import ModelRegistry

    from fireredasr_converter.configuration import ARCHITECTURE, register_with_transformers

    from .vllm_support import warn_if_untested

    warn_if_untested(vllm.__version__)
    register_with_transformers()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The "module:Class" form defers importing the model (and torch code) until vLLM needs it.
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
