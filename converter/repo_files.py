"""The converted repo's small files: config, preprocessor and generation configs, model card, provenance.

`OutputFormat` is what a conversion target (`--target`) changes; `PluginFormat`
is the default target, the format of docs/format.md.
"""

from __future__ import annotations

import abc
import hashlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from transformers import GenerationConfig

from . import __version__, spec
from .configuration import ARCHITECTURE, FireRedAsrLlmConfig
from .feature_extraction import FireRedAsrFeatureExtractor
from .plan import DEFAULT_MAX_SHARD_SIZE, ConversionPlan, parse_size
from .repo_format import DTYPE_NAMES, LANGUAGE_MODEL_PREFIX
from .release import Release

CONVERTER = "fireredasr-convert"
PROVENANCE_KEY = "fireredasr_conversion"
BASE_LLM_REPO = "Qwen/Qwen2-7B-Instruct"  # the card's first base_model
HASH_BLOCK_BYTES = 16 << 20
PLUGIN_TARGET = "plugin"


@dataclass(frozen=True)
class ConversionOptions:
    """What the user chose; recorded in the provenance and the model card."""

    dtype: str
    max_shard_size: int
    lora_alpha: float | None
    llm_dir_given: bool
    target: str = PLUGIN_TARGET


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
        write_model_card(release, plan, options, folder)
        build_config(release, plan, conversion).save_pretrained(folder)


class InputHasher:
    """sha256 of the input files, computed on a background thread while the tensors stream.

    hashlib and file reads release the GIL, so hashing overlaps the conversion
    instead of adding a second pass over ~17 GB. `cancel()` stops it early.
    """

    def __init__(self, files: list[Path]):
        self._files = files
        self._stop = threading.Event()
        self._result: Future = Future()
        self._thread = threading.Thread(target=self._run, name="fireredasr-hash-inputs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            hashes = {}
            buffer = bytearray(HASH_BLOCK_BYTES)
            view = memoryview(buffer)
            for path in self._files:
                digest = hashlib.sha256()
                with open(path, "rb", buffering=0) as f:
                    while not self._stop.is_set() and (count := f.readinto(buffer)):
                        digest.update(view[:count])
                hashes[path] = digest.hexdigest()
            self._result.set_result(hashes)
        except BaseException as error:  # handed to the caller of result()
            self._result.set_exception(error)

    def result(self) -> dict[Path, str]:
        return self._result.result()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


def _input_name(release: Release, path: Path) -> str:
    """A file's name relative to the release (or Qwen2) folder: no absolute paths in the output."""
    if path.parent == release.model_dir:
        return path.name
    return f"{release.llm.path.name}/{path.name}"


def provenance(release: Release, plan: ConversionPlan, options: ConversionOptions, hashes: dict[Path, str]) -> dict:
    lora = release.lora
    return {
        "converter": CONVERTER,
        "converter_version": __version__,
        "release_layout": release.layout,
        "options": {
            "target": options.target,
            "dtype": options.dtype,
            "max_shard_size": options.max_shard_size,
            "lora_alpha": options.lora_alpha,
            "llm_dir_given": options.llm_dir_given,
        },
        "encoder_source": release.encoder_source.path.name,
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "merged_weights": len(lora.pairs)},
        "inputs": {
            _input_name(release, path): {"size": path.stat().st_size, "sha256": hashes[path]}
            for path in release.input_files
        },
    }


def text_config(release: Release) -> dict:
    """The Qwen2 config of the source folder with the original's special token ids."""
    ids = release.llm.tokenizer.special_token_ids
    return {
        **release.llm.config,
        "pad_token_id": ids[spec.PAD_TOKEN],
        "bos_token_id": ids[spec.BOS_TOKEN],
        "eos_token_id": ids[spec.EOS_TOKEN],
    }


def build_config(release: Release, plan: ConversionPlan, conversion: dict) -> FireRedAsrLlmConfig:
    return FireRedAsrLlmConfig(
        architectures=[ARCHITECTURE],
        encoder_config=release.encoder_config.to_dict(),
        text_config=text_config(release),
        encoder_downsample_rate=release.encoder_downsample_rate,
        speech_token_id=release.llm.tokenizer.speech_token_id,
        dtype=DTYPE_NAMES[plan.dtype],
        **{PROVENANCE_KEY: conversion},
    )


def write_preprocessor_config(release: Release, folder: Path) -> None:
    mean, istd, count = spec.cmvn_from_stats(release.cmvn_stats)
    FireRedAsrFeatureExtractor(
        cmvn_mean=mean.tolist(),
        cmvn_istd=istd.tolist(),
        cmvn_frame_count=count,
        max_audio_seconds=release.max_audio_seconds,
    ).save_pretrained(folder)


def write_generation_config(release: Release, folder: Path) -> None:
    ids = release.llm.tokenizer.special_token_ids
    GenerationConfig(
        bos_token_id=ids[spec.BOS_TOKEN],
        eos_token_id=ids[spec.EOS_TOKEN],
        pad_token_id=ids[spec.PAD_TOKEN],
        do_sample=False,
        num_beams=1,
    ).save_pretrained(folder)


# Character error rates (%) published by FireRedTeam; LibriSpeech figures are WER.
PUBLISHED_RESULTS = {
    "v1": (
        "FireRedASR-LLM-L",
        "FireRedTeam/FireRedASR-LLM-L",
        {
            "AISHELL-1 test": 0.76,
            "AISHELL-2 test": 2.15,
            "WenetSpeech test_net": 4.60,
            "WenetSpeech test_meeting": 4.67,
            "KeSpeech test": 3.56,
            "LibriSpeech test-clean (WER)": 1.73,
            "LibriSpeech test-other (WER)": 3.67,
        },
    ),
    "v2": (
        "FireRedASR2-LLM",
        "FireRedTeam/FireRedASR2-LLM",
        {
            "AISHELL-1 test": 0.64,
            "AISHELL-2 test": 2.15,
            "WenetSpeech test_net": 4.44,
            "WenetSpeech test_meeting": 4.32,
            "KeSpeech test": 3.08,
        },
    ),
}


def command_line(options: ConversionOptions) -> str:
    """The options as a command line (defaults left out)."""
    words = [CONVERTER, "SRC", "OUT"]
    if options.llm_dir_given:
        words += ["--llm-dir", "QWEN2_DIR"]
    if options.dtype != "bf16":
        words += ["--dtype", options.dtype]
    if options.lora_alpha is not None:
        words += ["--lora-alpha", f"{options.lora_alpha:g}"]
    if options.max_shard_size != parse_size(DEFAULT_MAX_SHARD_SIZE):
        words += ["--max-shard-size", str(options.max_shard_size)]
    if options.target != PLUGIN_TARGET:
        words += ["--target", options.target]
    return " ".join(words)


def card_front_matter(model_repo: str) -> str:
    """The card's YAML metadata, the same for every target."""
    return f"""---
license: apache-2.0
pipeline_tag: automatic-speech-recognition
library_name: vllm
base_model:
- {BASE_LLM_REPO}
- {model_repo}
language:
- zh
- en
tags:
- fireredasr
- vllm
- speech-recognition
---
"""


def card_published_results(release: Release) -> str:
    model_name, _, results = PUBLISHED_RESULTS[release.layout]
    rows = "\n".join(f"| {name} | {value:.2f} |" for name, value in results.items())
    return f"""## Published results

Error rates (%) reported by FireRedTeam for the original model (CER unless marked WER):

| test set | {model_name} |
|---|---|
{rows}
"""


def card_provenance(release: Release, plan: ConversionPlan, options: ConversionOptions, speech_token: str) -> str:
    """How the repo was made: the command and the facts every target shares, as bullets.

    The last bullet has no closing punctuation: a target may add bullets of its own.
    """
    lora = release.lora
    merge = (
        f"LoRA (rank {lora.rank}, alpha {lora.alpha:g}) merged into Qwen2 as W + (alpha/r)·B·A in fp32, cast once"
        if lora is not None
        else "no LoRA in the release: Qwen2 weights as released"
    )
    return f"""`{command_line(options)}` (fireredasr-vllm {__version__}) from the original {release.layout} release:

- encoder weights from `{release.encoder_source.path.name}`; adapter downsample rate {release.encoder_downsample_rate};
- {merge};
- every tensor in {DTYPE_NAMES[plan.dtype]}, {len(plan.shards)} shard(s), {plan.total_size:,} bytes;
- `{speech_token}` is token {release.llm.tokenizer.speech_token_id}; the embedding was not resized"""


def card_offline_example(prompt: str) -> str:
    """Offline transcription with vLLM's `LLM`; `prompt` as the card shows it (newlines escaped)."""
    return f"""```python
from vllm import LLM, SamplingParams

llm = LLM(model="path/to/this/repo")
prompt = "{prompt}"
outputs = llm.generate(
    {{"prompt": prompt, "multi_modal_data": {{"audio": (waveform, 16000)}}}},  # float32 mono, 16 kHz
    SamplingParams(temperature=0.0, max_tokens=256),
)
print(outputs[0].outputs[0].text)
```"""


def model_card(release: Release, plan: ConversionPlan, options: ConversionOptions) -> str:
    model_name, model_repo, _ = PUBLISHED_RESULTS[release.layout]
    prompt = spec.transcription_prompt().replace("\n", "\\n")
    return f"""{card_front_matter(model_repo)}
# {model_name}, converted for vLLM

[{model_name}]({f"https://huggingface.co/{model_repo}"}) (Conformer encoder + adapter + Qwen2-7B-Instruct)
in one self-contained folder: safetensors weights in {DTYPE_NAMES[plan.dtype]}, a composite `config.json`,
the Qwen2 tokenizer with the `<speech>` token, the fbank + CMVN front-end settings in
`preprocessor_config.json`, and greedy generation defaults.

{card_published_results(release)}
## How this repo was made

{card_provenance(release, plan, options, spec.SPEECH_TOKEN)}.

`config.json` → `{PROVENANCE_KEY}` records the options and the size and sha256 of every input file.

## Serving with vLLM

Install the `fireredasr-vllm` package next to vLLM: its plugin entry point registers the
model class, so vLLM needs no other setup.

{card_offline_example(prompt)}

As an OpenAI-compatible server:

```bash
vllm serve path/to/this/repo
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://localhost:8000/v1", api_key="EMPTY")
with open("speech.wav", "rb") as audio:
    print(client.audio.transcriptions.create(model="path/to/this/repo", file=audio).text)
```

In chat completions, each audio part of a user message becomes one `<speech>` in the
original's prompt (`{prompt}`); the instruction is fixed, so text
parts and system messages are not used. Clips at any sampling rate and channel count are
resampled to 16 kHz mono; each may be at most {release.max_audio_seconds:g} s long.
"""


def write_model_card(release: Release, plan: ConversionPlan, options: ConversionOptions, folder: Path) -> None:
    (folder / "README.md").write_text(model_card(release, plan, options), encoding="utf-8")
