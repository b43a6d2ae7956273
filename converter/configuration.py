"""Hugging Face configuration classes of a converted FireRedASR repo.

FireRedASR-LLM: a composite config in the style of `Qwen2AudioConfig`: the
Conformer encoder's settings in `encoder_config`, the Qwen2 decoder's in
`text_config`, plus the adapter's downsample rate and the id of the `<speech>`
token. FireRedASR-AED: the same `encoder_config` and the Transformer decoder's
settings under Whisper's names (`FireRedAsrAedConfig`).
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

from .spec import ENCODER_SUBSAMPLING, NUM_MEL_BINS, RELATIVE_POSITION_MAX_LEN, SUBSAMPLING_CHANNELS

MODEL_TYPE = "fireredasr_llm"
ENCODER_MODEL_TYPE = "fireredasr_conformer"
# The vLLM model class the plugin registers; written into `architectures`.
ARCHITECTURE = "FireRedAsrLlmForConditionalGeneration"


def _check_integers(config_name: str, minimum: int, **values) -> None:
    """A repo's config.json is data from elsewhere: each value must be an integer in
    [minimum, 2**31), so a NaN, a string or 0 is refused where it enters, not deep inside the model."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**31:
            raise ValueError(f"{config_name}: {name} is {str(value)[:40]!r}, not an integer >= {minimum}")


class FireRedAsrEncoderConfig(PretrainedConfig):
    """The Conformer encoder (argument names as in the original's `asr_encoder.pth.tar` args)."""

    model_type = ENCODER_MODEL_TYPE
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_head",
    }

    def __init__(
        self,
        idim: int = NUM_MEL_BINS,
        n_layers: int = 16,
        n_head: int = 20,
        d_model: int = 1280,
        kernel_size: int = 33,
        subsampling_channels: int = SUBSAMPLING_CHANNELS,
        subsampling_rate: int = ENCODER_SUBSAMPLING,
        relative_position_max_len: int = RELATIVE_POSITION_MAX_LEN,
        layer_norm_eps: float = 1e-5,
        **kwargs,
    ):
        _check_integers(
            "encoder_config", 1, idim=idim, n_layers=n_layers, n_head=n_head, d_model=d_model, kernel_size=kernel_size,
            subsampling_channels=subsampling_channels, subsampling_rate=subsampling_rate,
            relative_position_max_len=relative_position_max_len,
        )  # fmt: skip
        if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, (int, float)) or not (
            math.isfinite(layer_norm_eps) and 0 < layer_norm_eps < 1
        ):
            raise ValueError(f"encoder_config: layer_norm_eps is {str(layer_norm_eps)[:40]!r}, not a number in (0, 1)")
        if d_model % n_head:
            raise ValueError(f"encoder_config: d_model {d_model} is not divisible by n_head {n_head}")
        self.idim = idim
        self.n_layers = n_layers
        self.n_head = n_head
        self.d_model = d_model
        self.kernel_size = kernel_size
        self.subsampling_channels = subsampling_channels
        self.subsampling_rate = subsampling_rate
        self.relative_position_max_len = relative_position_max_len
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)


class FireRedAsrLlmConfig(PretrainedConfig):
    """Conformer encoder + adapter + Qwen2 decoder."""

    model_type = MODEL_TYPE
    sub_configs = {"encoder_config": FireRedAsrEncoderConfig, "text_config": AutoConfig}

    def __init__(
        self,
        encoder_config: dict | FireRedAsrEncoderConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        encoder_downsample_rate: int = 2,
        speech_token_id: int = 151646,
        **kwargs,
    ):
        _check_integers("config", 1, encoder_downsample_rate=encoder_downsample_rate)
        _check_integers("config", 0, speech_token_id=speech_token_id)
        if isinstance(encoder_config, dict):
            encoder_config = FireRedAsrEncoderConfig(**encoder_config)
        elif encoder_config is None:
            encoder_config = FireRedAsrEncoderConfig()
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = CONFIG_MAPPING[text_config.pop("model_type", "qwen2")](**text_config)
        elif text_config is None:
            text_config = CONFIG_MAPPING["qwen2"]()
        vocab_size = getattr(text_config, "vocab_size", None)
        if isinstance(vocab_size, int) and speech_token_id >= vocab_size:
            raise ValueError(
                f"config: speech_token_id {speech_token_id} must lie below the text model's vocab_size {vocab_size}"
            )
        self.encoder_config = encoder_config
        self.text_config = text_config
        self.encoder_downsample_rate = encoder_downsample_rate
        self.speech_token_id = speech_token_id
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        return self.text_config


def register_with_transformers() -> None:
    """Make `AutoConfig`, `AutoFeatureExtractor` and (AED) `AutoTokenizer` resolve a converted repo (idempotent)."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    from .aed_tokenizer import FireRedAsrAedTokenizer
    from .feature_extraction import FireRedAsrFeatureExtractor

    for model_type, config_class in (
        (ENCODER_MODEL_TYPE, FireRedAsrEncoderConfig),
        (MODEL_TYPE, FireRedAsrLlmConfig),
        (AED_MODEL_TYPE, FireRedAsrAedConfig),
    ):
        AutoConfig.register(model_type, config_class, exist_ok=True)
    for config_class in (FireRedAsrLlmConfig, FireRedAsrAedConfig):
        AutoFeatureExtractor.register(config_class, FireRedAsrFeatureExtractor, exist_ok=True)
    AutoTokenizer.register(FireRedAsrAedConfig, slow_tokenizer_class=FireRedAsrAedTokenizer, exist_ok=True)


AED_MODEL_TYPE = "fireredasr_aed"
# The vLLM model class the plugin registers for FireRedASR-AED; written into `architectures`.
AED_ARCHITECTURE = "FireRedAsrAedForConditionalGeneration"


class FireRedAsrAedConfig(PretrainedConfig):
    """Conformer encoder + Transformer decoder (FireRedASR-AED).

    The decoder's settings use Whisper's names: `d_model` (shared with the
    encoder, as the original shares it), `decoder_layers`,
    `decoder_attention_heads`, `decoder_ffn_dim`, `max_target_positions` (the
    position table's length, the original's `pe_maxlen`) and `vocab_size`
    (dict.txt's length); `decoder_start_token_id` is the original's `sos_id`.
    `ctc_head`: the weights hold FireRedASR2-AED's CTC head (`ctc.ctc_lo.*`),
    which decoding does not use.
    """

    model_type = AED_MODEL_TYPE
    sub_configs = {"encoder_config": FireRedAsrEncoderConfig}

    def __init__(
        self,
        encoder_config: dict | FireRedAsrEncoderConfig | None = None,
        vocab_size: int = 7832,
        decoder_layers: int = 16,
        decoder_attention_heads: int = 20,
        decoder_ffn_dim: int = 5120,
        max_target_positions: int = RELATIVE_POSITION_MAX_LEN,
        pad_token_id: int = 2,
        bos_token_id: int = 3,
        eos_token_id: int = 4,
        decoder_start_token_id: int = 3,
        unk_token_id: int = 1,
        layer_norm_eps: float = 1e-5,
        ctc_head: bool = False,
        **kwargs,
    ):
        if isinstance(encoder_config, dict):
            encoder_config = FireRedAsrEncoderConfig(**encoder_config)
        elif encoder_config is None:
            encoder_config = FireRedAsrEncoderConfig()
        if not isinstance(ctc_head, bool):
            raise ValueError(f"config: ctc_head is {str(ctc_head)[:40]!r}, not true or false")
        _check_integers(
            "config", 1, vocab_size=vocab_size, decoder_layers=decoder_layers,
            decoder_attention_heads=decoder_attention_heads, decoder_ffn_dim=decoder_ffn_dim,
            max_target_positions=max_target_positions,
        )  # fmt: skip
        ids = dict(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id, unk_token_id=unk_token_id,
        )  # fmt: skip
        _check_integers("config", 0, **ids)
        if any(value >= vocab_size for value in ids.values()):
            raise ValueError(f"config: special token ids {ids} must lie below vocab_size {vocab_size}")
        if encoder_config.d_model % decoder_attention_heads:
            raise ValueError(
                f"config: d_model {encoder_config.d_model} is not divisible by decoder_attention_heads "
                f"{decoder_attention_heads}"
            )
        if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, (int, float)) or not (
            math.isfinite(layer_norm_eps) and 0 < layer_norm_eps < 1
        ):
            raise ValueError(f"config: layer_norm_eps is {str(layer_norm_eps)[:40]!r}, not a number in (0, 1)")
        self.encoder_config = encoder_config
        self.vocab_size = vocab_size
        self.d_model = encoder_config.d_model
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.decoder_ffn_dim = decoder_ffn_dim
        self.max_target_positions = max_target_positions
        self.unk_token_id = unk_token_id
        self.layer_norm_eps = layer_norm_eps
        self.ctc_head = ctc_head
        kwargs.pop("d_model", None)  # always the encoder's
        kwargs.setdefault("is_encoder_decoder", True)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id, **kwargs,
        )  # fmt: skip

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        return self
