"""Conversion targets (`--target`): what an output format changes, and the plugin's format.

`OutputFormat` is the interface a target implements; `PluginFormat` is the
default target, the format of docs/format.md. The stock-vLLM export is in
`stock_vllm`; the shared pipeline (plan, streaming, LoRA merge, verification,
tokenizer, generation config, provenance) is in `pipeline` and does not live here.
"""

from __future__ import annotations

import abc
from pathlib import Path

from . import spec
from .model_card import model_card, write_model_card
from .plan import ConversionPlan
from .provenance import PLUGIN_TARGET, ConversionOptions
from .release import Release
from .repo_configs import build_config, write_preprocessor_config
from .repo_format import LANGUAGE_MODEL_PREFIX


class OutputFormat(abc.ABC):
    """What a conversion target changes; the pipeline (plan, streaming, LoRA merge,
    verification, tokenizer editing, generation config, provenance) is shared.
    """

    name: str  # the --target value
    summary: str  # one line for --dry-run
    language_model_prefix: str  # prepended to the Qwen2 tensor names
    speech_token: str  # the audio placeholder added to the tokenizer

    def check_release(self, release: Release) -> None:
        """Raise a ConversionError if this format cannot hold the release."""

    @abc.abstractmethod
    def write_files(
        self, folder: Path, release: Release, plan: ConversionPlan, options: ConversionOptions, conversion: dict
    ) -> None:
        """Write config.json, preprocessor_config.json and README.md; `conversion` is the provenance record."""


class PluginFormat(OutputFormat):
    name = PLUGIN_TARGET
    summary = "the fireredasr-vllm plugin's format (docs/format.md)"
    language_model_prefix = LANGUAGE_MODEL_PREFIX
    speech_token = spec.SPEECH_TOKEN

    def write_files(
        self, folder: Path, release: Release, plan: ConversionPlan, options: ConversionOptions, conversion: dict
    ) -> None:
        write_preprocessor_config(release, folder)
        write_model_card(model_card(release, plan, options), folder)
        build_config(release, plan, conversion).save_pretrained(folder)
