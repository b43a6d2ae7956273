"""What a process serving a `--target stock-vllm` export with stock vLLM needs on a machine without torchvision.

Stock vLLM serves that export with its built-in FireRedASR2 model and no
plugin; this module holds the one serve-time compatibility shim for it. It is
not part of the plugin (nothing here is registered with vLLM) and not part of
the converter (the export itself needs no shim).

Run as a module it is vLLM's OpenAI-compatible server with the shim applied in
the server process and in the engine process vLLM spawns (which imports this
module again as `__mp_main__`); it takes vLLM's server arguments:

    python -m fireredasr_vllm.stock_serving --model ./out-stock --max-model-len 1024 --enforce-eager
"""

from __future__ import annotations


def enable_stock_processor_without_torchvision() -> None:
    """Let stock vLLM load `FireRedASR2Processor` where torchvision is not installed.

    transformers 5.19 resolves a processor's string-named feature extractor by
    searching its auto registries, the video-processor one before the
    feature-extractor one; without torchvision that registry is a placeholder
    class whose attribute access raises, so the lookup fails before reaching
    the feature extractor vLLM registered. This installs an empty video
    registry, which is what it holds without torchvision. No-op when
    torchvision is installed (regular vLLM installs).

    Needed in every process that loads the processor: with vLLM's spawned
    engine processes, call it at the top level of the main script (outside the
    `if __name__ == "__main__":` block), which they re-run on start.
    """
    from collections import OrderedDict

    from transformers import processing_utils
    from transformers.models.auto.auto_factory import _LazyAutoMapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    # processing_utils holds its own reference to the transformers module it searches.
    processing_utils.transformers_module.VIDEO_PROCESSOR_MAPPING = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())


def serve() -> None:
    """vLLM's OpenAI-compatible server (what `python -m vllm.entrypoints.openai.api_server` runs), arguments from argv."""
    from vllm.entrypoints.launchers.api_server.entry import main

    main()


# vLLM's CPU platform spawns the engine process, which runs this module's top level
# again (as __mp_main__) but not serve(): the shim goes here to reach both processes.
if __name__ in ("__main__", "__mp_main__"):
    enable_stock_processor_without_torchvision()
if __name__ == "__main__":
    serve()
