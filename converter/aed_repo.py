"""The small files of a converted FireRedASR-AED repo, the plan of its tensors, and its checks.

`plan_aed_tensors` lists the tensors (the release's names, the tied output
projection stored once as the embedding); `write_aed_files` writes `config.json`
(`FireRedAsrAedConfig` with the provenance record), `preprocessor_config.json`,
`generation_config.json` (the README's decoding recipe), the tokenizer
(`dict.txt`, `train_bpe1000.model`, `tokenizer_config.json`) and the model card;
`check_aed_tokenizer` reloads the written tokenizer and compares it with the
release's dict. Streaming, verification of the shards and moving into place are
`pipeline`'s.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoTokenizer, GenerationConfig

from . import __version__, aed_spec, spec
from .aed_release import AedRelease
from .aed_tokenizer import FireRedAsrAedTokenizer
from .configuration import AED_ARCHITECTURE, FireRedAsrAedConfig, register_with_transformers
from .errors import ConversionError
from .feature_extraction import FireRedAsrFeatureExtractor
from .model_card import _CARD_TEMPLATE, CARD_NAME
from .plan import CheckpointTensor, ConversionPlan, PlannedTensor, format_size
from .provenance import CONVERTER, PROVENANCE_KEY, ConversionOptions, command_line
from .repo_format import DTYPE_NAMES

AED_MODEL_REPO = "FireRedTeam/FireRedASR-AED-L"
# The recipe's settings in generation_config.json, under this key (transformers' own beam
# search scores differently: no softmax smoothing, no EOS penalty, another length penalty).
RECIPE_KEY = "fireredasr_aed_recipe"


def plan_aed_tensors(release: AedRelease) -> list[PlannedTensor]:
    """encoder.*, decoder.*, then ctc.* (FireRedASR2-AED), the release's names and order; the output
    projection is the embedding."""
    tensors = {**release.encoder_tensors, **release.decoder_tensors, **release.ctc_tensors}
    return [
        PlannedTensor(name, tuple(tensor.shape), CheckpointTensor(release.model_checkpoint, tensor))
        for name, tensor in tensors.items()
    ]


def describe_aed(release: AedRelease, plan: ConversionPlan) -> list[str]:
    """The plan as `--dry-run` prints it."""
    config, encoder = release.config, release.config.encoder_config
    lines = [
        f"release: {release.model_dir} ({release.layout})",
        f"encoder: {encoder.n_layers} layers, d_model {encoder.d_model}, {encoder.n_head} heads, "
        f"kernel {encoder.kernel_size}",
        f"decoder: {config.decoder_layers} layers, {config.vocab_size} tokens (dict.txt), output projection tied "
        f"to the embedding (stored once)",
        f"tokenizer: dict.txt and {aed_spec.SPM_FILE} copied, {FireRedAsrAedTokenizer.__name__}",
        f"output: {DTYPE_NAMES[plan.dtype]}, {len(plan.tensors)} tensors, {format_size(plan.total_size)} "
        f"in {len(plan.shards)} shard(s)",
    ]
    return lines


def check_aed_tokenizer_files(release: AedRelease) -> FireRedAsrAedTokenizer:
    """The release's tokenizer, or a ConversionError naming the file that cannot be one."""
    try:
        return FireRedAsrAedTokenizer(str(release.dict_path), str(release.spm_path))
    except ValueError as error:
        raise ConversionError(f"{error}: download the release again") from None


def aed_provenance(release: AedRelease, options: ConversionOptions, hashes: dict[Path, str]) -> dict:
    return {
        "converter": CONVERTER,
        "converter_version": __version__,
        "release_layout": "aed2" if release.ctc_tensors else "aed",
        "options": {"target": options.target, "dtype": options.dtype, "max_shard_size": options.max_shard_size},
        "inputs": {
            path.name: {"size": path.stat().st_size, "sha256": hashes[path]} for path in release.input_files
        },
    }


def write_aed_files(
    folder: Path, release: AedRelease, plan: ConversionPlan, options: ConversionOptions, conversion: dict
) -> None:
    config = release.config.to_dict()
    for key in ("model_type", "transformers_version"):
        config.pop(key, None)
    config.update({"architectures": [AED_ARCHITECTURE], "dtype": DTYPE_NAMES[plan.dtype], PROVENANCE_KEY: conversion})
    FireRedAsrAedConfig(**config).save_pretrained(folder)
    mean, istd, count = spec.cmvn_from_stats(release.cmvn_stats)
    FireRedAsrFeatureExtractor(
        cmvn_mean=mean.tolist(), cmvn_istd=istd.tolist(), cmvn_frame_count=count,
        max_audio_seconds=release.max_audio_seconds,
    ).save_pretrained(folder)  # fmt: skip
    ids = release.config
    generation = GenerationConfig(
        decoder_start_token_id=ids.decoder_start_token_id,
        bos_token_id=ids.bos_token_id,
        eos_token_id=ids.eos_token_id,
        pad_token_id=ids.pad_token_id,
        do_sample=False,
        num_beams=aed_spec.RECIPE_BEAM_SIZE,
    )
    setattr(generation, RECIPE_KEY, {
        "beam_size": aed_spec.RECIPE_BEAM_SIZE,
        "softmax_smoothing": aed_spec.RECIPE_SOFTMAX_SMOOTHING,
        "length_penalty": aed_spec.RECIPE_LENGTH_PENALTY,
        "eos_penalty": aed_spec.RECIPE_EOS_PENALTY,
    })  # fmt: skip
    generation.save_pretrained(folder)
    check_aed_tokenizer_files(release).save_pretrained(folder)
    aed_model_card(release, plan, options).save(folder / CARD_NAME)


def check_aed_tokenizer(folder: Path, release: AedRelease) -> None:
    """The written tokenizer loads through AutoTokenizer and maps every id of the release's dict as the dict does."""
    register_with_transformers()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not isinstance(tokenizer, FireRedAsrAedTokenizer) or tokenizer.tokens != release.tokens:
        raise ConversionError(f"the tokenizer written to {folder} does not reproduce {release.dict_path}: report this")


def aed_model_card(release: AedRelease, plan: ConversionPlan, options: ConversionOptions) -> ModelCard:
    config = release.config
    data = ModelCardData(
        license="apache-2.0",
        pipeline_tag="automatic-speech-recognition",
        base_model=[AED_MODEL_REPO],
        language=["zh", "en"],
        tags=["fireredasr", "fireredasr-aed", "speech-recognition"],
    )
    body = f"""
# FireRedASR-AED, converted

FireRedASR-AED (Conformer encoder, Transformer decoder with cross-attention, output
projection tied to the token embedding) converted from the original release
([{AED_MODEL_REPO}](https://huggingface.co/{AED_MODEL_REPO})) by fireredasr-vllm {__version__}.

## How this repo was made

`{command_line(options)}`:

- {len(plan.tensors)} tensors in {DTYPE_NAMES[plan.dtype]}, the original's names (`encoder.*`, `decoder.*`);
  `decoder.tgt_word_prj.weight` is `decoder.tgt_word_emb.weight` and stored once;
- {config.decoder_layers} decoder layers, {config.vocab_size} output tokens; special ids: start {config.decoder_start_token_id},
  end {config.eos_token_id}, padding {config.pad_token_id}, unknown {config.unk_token_id};
- the tokenizer is the release's `dict.txt` and `{aed_spec.SPM_FILE}` with `FireRedAsrAedTokenizer`
  (the original's ChineseCharEnglishSpmTokenizer), loaded with `AutoTokenizer` once `fireredasr-vllm` is installed;
- `preprocessor_config.json`: 80-bin Kaldi fbank and the release's CMVN statistics; clips of at most
  {release.max_audio_seconds:g} s;
- `generation_config.json` holds the original README's decoding recipe under `{RECIPE_KEY}`: beam
  {aed_spec.RECIPE_BEAM_SIZE}, softmax smoothing {aed_spec.RECIPE_SOFTMAX_SMOOTHING}, length penalty
  {aed_spec.RECIPE_LENGTH_PENALTY}, EOS penalty {aed_spec.RECIPE_EOS_PENALTY}.
"""
    return ModelCard.from_template(data, template_str=_CARD_TEMPLATE, body=body)
