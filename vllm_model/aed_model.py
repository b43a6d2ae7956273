"""FireRedASR-AED on vLLM: the shared Conformer encoder + a Transformer decoder with vLLM attention.

Laid out like vLLM's own encoder-decoder speech model (`whisper.py`): processing
info, dummy inputs builder and multimodal processor first, then the decoder and
the model class.

A request is one clip. The processor turns it into fbank + CMVN features (the
front-end of `FireRedAsrFeatureExtractor`, as for FireRedASR-LLM) and makes the
encoder prompt E placeholder tokens long, E = ceil(T / 4) the clip's encoder
frame count, so vLLM sizes each request's cross-attention KV cache to its own
clip (no padding to a fixed length, as Whisper pads to 30 s). The decoder prompt
is the start token alone (`decoder_start_token_id`, the original's `sos_id`),
which vLLM prepends to an empty decoder prompt; the model takes no text.

The decoder is the original's (`aed_reference.TransformerDecoder`, the readable
statement): token embedding x sqrt(d_model) plus the sinusoidal position table,
pre-LayerNorm self-attention (vLLM's paged KV cache), cross-attention over the
clip's encoder output (vLLM's cross-attention cache, filled at the first step),
GELU MLP, final LayerNorm, output projection tied to the embedding. One
difference from the original is left: the original masks, as attention keys,
positions whose token is the padding id, which a trained model never emits
(docs/parity.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchFeature
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, ModelConfig, SpeechToTextConfig, VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.config.speech_to_text import SpeechToTextParams
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.inputs import ExplicitEncoderDecoderPrompt, MultiModalDataDict, PromptType, TextPrompt, TokensPrompt
from vllm.model_executor.layers.attention import Attention, CrossAttention
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsTranscription
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.utils.tensor_schema import TensorSchema, TensorShape
from vllm.v1.attention.backend import AttentionType

from fireredasr_converter import aed_spec, spec
from fireredasr_converter.aed_release import CTC_PREFIX
from fireredasr_converter.configuration import FireRedAsrAedConfig
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor

from .conformer import ConformerEncoder, length_groups
from .model import get_feature_extractor, speech_to_text_config, transcription_language


def encoder_frames(num_samples: int) -> int:
    """E of a clip of `num_samples` 16 kHz samples: its encoder frames, the decoder's cross-attention length."""
    return spec.encoder_frame_count(spec.fbank_frame_count(num_samples))


class FireRedAsrAedAudioFeatures(TensorSchema):
    """Dimensions:
    - b: Number of clips
    - t: Fbank frames of a clip (each clip keeps its own length)
    - nmb: Number of mel bins
    """

    type: Literal["audio_features"] = "audio_features"
    input_features: Annotated[
        torch.Tensor | list[torch.Tensor],
        TensorShape("b", "t", "nmb", dynamic_dims={"t"}),
    ]


class FireRedAsrAedProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> FireRedAsrAedConfig:
        return self.ctx.get_hf_config(FireRedAsrAedConfig)

    def get_feature_extractor(self) -> FireRedAsrFeatureExtractor:
        return get_feature_extractor(self.ctx.model_config)

    def get_default_tok_params(self):
        # The model takes no text: nothing may add special tokens to the (empty) prompt.
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)

    def get_data_parser(self) -> MultiModalDataParser:
        # As FireRedASR-LLM's (model.py): any rate and channel count, resampled by PyAV.
        return MultiModalDataParser(
            target_sr=self.get_feature_extractor().sampling_rate,
            target_channels=1,
            audio_resample_method="pyav",
        )

    @property
    def skip_prompt_length_check(self) -> bool:
        # The encoder prompt is as long as the clip's encoder output; the processor
        # refuses clips longer than max_audio_seconds itself.
        return True

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": 1}

    def get_max_encoder_frames(self) -> int:
        """E of the longest clip the front-end accepts (`max_audio_seconds`)."""
        return encoder_frames(self.get_feature_extractor().max_samples)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"audio": self.get_max_encoder_frames()}

    @property
    def placeholder_token_id(self) -> int:
        """The encoder prompt's token: never embedded (the encoder reads features), only counted."""
        return self.get_hf_config().pad_token_id


class FireRedAsrAedDummyInputsBuilder(BaseDummyInputsBuilder[FireRedAsrAedProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> MultiModalDataDict:
        # The longest accepted clip, so memory profiling runs the encoder at its worst case.
        return {
            "audio": self._get_dummy_audios(
                length=self.info.get_feature_extractor().max_samples,
                num_audios=mm_counts.get("audio", 0),
                overrides=mm_options.get("audio"),
            )
        }


class FireRedAsrAedMultiModalProcessor(EncDecMultiModalProcessor[FireRedAsrAedProcessingInfo]):
    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext):
        if inputs.prompt:
            raise ValueError(
                "FireRedASR-AED takes no text prompt: send the audio with an empty prompt "
                "(the decoder starts from its start token)"
            )
        if inputs.mm_data_items.get_count("audio", strict=False) != 1:
            raise ValueError("FireRedASR-AED transcribes one audio clip per request")
        return super().apply(inputs, timing_ctx)

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        # One placeholder, replaced by E of them in _get_prompt_updates.
        return [self.info.placeholder_token_id]

    def create_decoder_prompt(self, prompt: str | list[int], mm_items: MultiModalDataItems) -> list[int]:
        # Empty: vLLM prepends decoder_start_token_id, the original's only prefix.
        return []

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        extractor = self.info.get_feature_extractor()
        features = []
        for waveform in hf_data.get("audio", []):
            waveform = np.asarray(waveform)
            # The decoder needs one encoder frame: no adapter stacks frames here.
            extractor.validate_waveform(waveform, downsample_rate=1)
            features.append(extractor.compute_features(torch.from_numpy(waveform.astype(np.float32))))
        return BatchFeature({"input_features": features})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"input_features": MultiModalFieldConfig.batched("audio")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        placeholder = self.info.placeholder_token_id
        clips = out_mm_kwargs.get("audio", [])

        def encoder_placeholders(item_idx: int) -> list[int]:
            num_frames = clips[item_idx]["input_features"].data.shape[0]
            return [placeholder] * spec.encoder_frame_count(num_frames)

        return [PromptReplacement(modality="audio", target=[placeholder], replacement=encoder_placeholders)]


# --- the decoder --------------------------------------------------------------------------


def _split_heads(num_heads: int) -> int:
    """Heads on this tensor-parallel rank; every rank holds whole heads."""
    tp_size = get_tensor_model_parallel_world_size()
    if num_heads % tp_size:
        raise ValueError(
            f"FireRedASR-AED's decoder has {num_heads} attention heads, which {tp_size} tensor-parallel ranks "
            "cannot share evenly: pick a tensor_parallel_size that divides it"
        )
    return num_heads // tp_size


class _AedAttention(nn.Module):
    """What both decoder attentions share: the heads split over the tensor-parallel ranks, the
    output projection `fc` and vLLM's attention layer (`attention`, of `attn_type`)."""

    def __init__(
        self, config: FireRedAsrAedConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
        prefix: str, attention: type[nn.Module], attn_type: str,
    ):  # fmt: skip
        super().__init__()
        d, heads = config.d_model, config.decoder_attention_heads
        self.head_dim = d // heads
        self.num_heads = _split_heads(heads)
        self.size = self.num_heads * self.head_dim
        self.fc = RowParallelLinear(d, d, bias=True, quant_config=quant_config, prefix=f"{prefix}.fc")
        self.attn = attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn", attn_type=attn_type,
        )  # fmt: skip


class AedSelfAttention(_AedAttention):
    """The original's `w_qs`/`w_ks`/`w_vs` (key without bias) fused as `qkv_proj`, causal, paged KV cache."""

    def __init__(
        self, config: FireRedAsrAedConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
        prefix: str,
    ):  # fmt: skip
        super().__init__(config, cache_config, quant_config, prefix, Attention, AttentionType.DECODER)
        d, heads = config.d_model, config.decoder_attention_heads
        self.qkv_proj = QKVParallelLinear(
            d, self.head_dim, heads, heads, bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv_proj"
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.size, self.size, self.size], dim=-1)
        output, _ = self.fc(self.attn(q, k, v))
        return output


class AedCrossAttention(_AedAttention):
    """Queries from the decoder, keys and values from the clip's encoder output (computed once, then cached)."""

    def __init__(
        self, config: FireRedAsrAedConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
        prefix: str,
    ):  # fmt: skip
        super().__init__(config, cache_config, quant_config, prefix, CrossAttention, AttentionType.ENCODER_DECODER)
        d = config.d_model
        self.q_proj = ColumnParallelLinear(d, d, bias=True, quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.kv_proj = MergedColumnParallelLinear(
            d, [d, d], bias=True, quant_config=quant_config, prefix=f"{prefix}.kv_proj"
        )

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        q, _ = self.q_proj(hidden_states)
        # The encoder output comes with a request's first step only; later steps read the cache.
        if encoder_hidden_states is not None:
            kv, _ = self.kv_proj(encoder_hidden_states)
            k, v = kv.split([self.size, self.size], dim=-1)
        else:
            k = v = None
        output, _ = self.fc(self.attn(q, k, v))
        return output


class AedFeedForward(nn.Module):
    def __init__(self, config: FireRedAsrAedConfig, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        d, d_ff = config.d_model, config.decoder_ffn_dim
        self.w_1 = ColumnParallelLinear(d, d_ff, bias=True, quant_config=quant_config, prefix=f"{prefix}.w_1")
        self.w_2 = RowParallelLinear(d_ff, d, bias=True, quant_config=quant_config, prefix=f"{prefix}.w_2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.w_1(x)
        # The exact (erf) GELU, as the original's F.gelu.
        output, _ = self.w_2(F.gelu(hidden))
        return output


class AedDecoderLayer(nn.Module):
    def __init__(self, config: FireRedAsrAedConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.self_attn_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = AedSelfAttention(config, cache_config, quant_config, f"{prefix}.self_attn")
        self.cross_attn_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn = AedCrossAttention(config, cache_config, quant_config, f"{prefix}.cross_attn")
        self.mlp_norm = nn.LayerNorm(d, eps=eps)
        self.mlp = AedFeedForward(config, quant_config, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_norm(x))
        x = x + self.cross_attn(self.cross_attn_norm(x), encoder_hidden_states)
        return x + self.mlp(self.mlp_norm(x))


# Checkpoint projection -> (fused parameter, shard). The original's keys have no bias:
# `load_weights` loads zeros into their shard of the fused bias.
STACKED_PROJECTIONS = (
    (".self_attn.w_qs.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.w_ks.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.w_vs.", ".self_attn.qkv_proj.", "v"),
    (".cross_attn.w_qs.", ".cross_attn.q_proj.", None),
    (".cross_attn.w_ks.", ".cross_attn.kv_proj.", 0),
    (".cross_attn.w_vs.", ".cross_attn.kv_proj.", 1),
)
UNBIASED_PROJECTIONS = (".self_attn.w_ks.weight", ".cross_attn.w_ks.weight")


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1})
class FireRedAsrAedDecoder(nn.Module):
    """The original's decoder over vLLM attention. Names are the checkpoint's `decoder.*` except the fused projections."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: FireRedAsrAedConfig = vllm_config.model_config.hf_config
        self.config = config
        self.scale = aed_spec.embedding_scale(config.d_model)
        self.tgt_word_emb = VocabParallelEmbedding(
            config.vocab_size, config.d_model, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.tgt_word_emb",
        )  # fmt: skip
        # The checkpoint's own table (`decoder.positional_encoding.pe`) is what runs.
        self.positional_encoding = nn.Module()
        self.positional_encoding.register_buffer("pe", torch.zeros(1, config.max_target_positions, config.d_model))
        self.layer_stack = nn.ModuleList(
            AedDecoderLayer(config, vllm_config, f"{prefix}.layer_stack.{index}")
            for index in range(config.decoder_layers)
        )
        self.layer_norm_out = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.tgt_word_emb(input_ids) * self.scale + self.positional_encoding.pe[0, positions]
        for layer in self.layer_stack:
            x = layer(x, encoder_hidden_states)
        return self.layer_norm_out(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        params.update(self.named_buffers())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(UNBIASED_PROJECTIONS):
                # The fused bias's shard for the unbiased key projection stays zero.
                bias = name.removesuffix("weight") + "bias"
                self._load(params, bias, torch.zeros(tensor.shape[0], dtype=tensor.dtype), loaded)
            self._load(params, name, tensor, loaded)
        return loaded

    def _load(self, params: dict, name: str, tensor: torch.Tensor, loaded: set[str]) -> None:
        for checkpoint_part, fused_part, shard in STACKED_PROJECTIONS:
            if checkpoint_part in name:
                name = name.replace(checkpoint_part, fused_part)
                param = params[name]
                if shard is None:
                    param.weight_loader(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard)
                loaded.add(name)
                return
        param = params[name]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(name)


# --- the model ----------------------------------------------------------------------------


def encode_clips(encoder: ConformerEncoder, clips: Sequence[torch.Tensor], max_clip_frames: int) -> list[torch.Tensor]:
    """Clips' features [T_i, idim] -> each clip's encoder output [E_i, d], in the order given.

    Clips of similar length are batched (`conformer.length_groups`), the padding
    masked, so each clip gets its batch-size-1 output. vLLM profiles the encoder
    at start-up with K clips of the longest accepted length and never schedules
    more encoder frames in one call than K such clips hold, so capping each
    forward at max(1, frames carried // E_max) longest clips' worth of padded
    frames keeps every run inside what profiling measured.
    """
    lengths = [clip.shape[0] for clip in clips]
    longest = spec.encoder_frame_count(max_clip_frames)
    carried = sum(spec.encoder_frame_count(n) for n in lengths)
    budget = max(1, carried // longest) * max_clip_frames
    outputs: list[torch.Tensor | None] = [None] * len(clips)
    for group in length_groups(lengths, max_padded_frames=budget):
        features = nn.utils.rnn.pad_sequence([clips[i] for i in group], batch_first=True)
        hidden, enc_lengths = encoder(features, [lengths[i] for i in group])
        for index, rows, length in zip(group, hidden, enc_lengths):
            outputs[index] = rows[:length]
    return outputs


@MULTIMODAL_REGISTRY.register_processor(
    FireRedAsrAedMultiModalProcessor,
    info=FireRedAsrAedProcessingInfo,
    dummy_inputs=FireRedAsrAedDummyInputsBuilder,
)
class FireRedAsrAedForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsTranscription):
    supports_transcription_only = True
    supported_languages = {"zh": "Chinese", "en": "English"}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return None
        raise ValueError("FireRedASR-AED only accepts audio")

    @classmethod
    def get_speech_to_text_config(
        cls, model_config: ModelConfig, task_type: Literal["transcribe", "translate"]
    ) -> SpeechToTextConfig:
        # Cut as FireRedASR-LLM's uploads; the shortest clip here is one encoder frame's worth (25 ms).
        return speech_to_text_config(model_config, spec.min_samples_for_one_embedding(1))

    @classmethod
    def validate_language(cls, language: str | None) -> str | None:
        # As FireRedASR-LLM's: Chinese chunks are joined without spaces (model.transcription_language).
        return super().validate_language(transcription_language(language, cls.supported_languages, "FireRedASR-AED"))

    @classmethod
    def post_process_output(cls, text: str) -> str:
        return text.strip()

    @classmethod
    def get_generation_prompt(cls, stt_params: SpeechToTextParams) -> PromptType:
        if stt_params.task_type != "transcribe":
            raise ValueError(
                f"FireRedASR-AED only transcribes (got task {stt_params.task_type!r}); use /v1/audio/transcriptions"
            )
        if stt_params.request_prompt:
            raise ValueError("FireRedASR-AED takes no text prompt; leave `prompt` empty")
        return ExplicitEncoderDecoderPrompt(
            encoder_prompt=TextPrompt(
                prompt="", multi_modal_data={"audio": (stt_params.audio, stt_params.stt_config.sample_rate)}
            ),
            decoder_prompt=TokensPrompt(prompt_token_ids=[]),
        )

    @classmethod
    def get_num_audio_tokens(
        cls, audio_duration_s: float, stt_config: SpeechToTextConfig, model_config: ModelConfig
    ) -> int | None:
        return encoder_frames(round(audio_duration_s * spec.SAMPLE_RATE))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: FireRedAsrAedConfig = vllm_config.model_config.hf_config
        self.config = config
        # Start-up profiling runs the encoder on clips of this length; see `encode_clips`.
        self.max_clip_frames = spec.max_fbank_frames(get_feature_extractor(vllm_config.model_config).max_audio_seconds)

        with self._mark_tower_model(vllm_config, "audio"):
            self.encoder = ConformerEncoder(config.encoder_config)

        with self._mark_language_model(vllm_config):
            self.decoder = FireRedAsrAedDecoder(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "decoder"))
            self.proj_out = ParallelLMHead(
                config.vocab_size, config.d_model, quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "proj_out"),
            ).tie_weights(self.decoder.tgt_word_emb)  # fmt: skip
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def _parse_and_validate_audio_input(self, **kwargs: object) -> FireRedAsrAedAudioFeatures | None:
        input_features = kwargs.pop("input_features", None)
        if input_features is None:
            return None
        return FireRedAsrAedAudioFeatures(
            input_features=input_features, resolve_bindings={"nmb": self.config.encoder_config.idim}
        )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Each clip's encoder output [E_i, d]: the keys and values of its cross-attention."""
        audio_input = self._parse_and_validate_audio_input(**kwargs)
        if audio_input is None:
            return []
        return tuple(encode_clips(self.encoder, list(audio_input["input_features"]), self.max_clip_frames))

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The decoder's tokens only: the encoder reads features, never tokens.
        return self.decoder.tgt_word_emb(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        encoder_outputs: list[torch.Tensor] | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        encoder_hidden_states = torch.cat(encoder_outputs, dim=0) if encoder_outputs else None
        return self.decoder(input_ids, positions, encoder_hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.proj_out, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # FireRedASR2-AED's CTC head (word timestamps in the original) plays no part in decoding.
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=[CTC_PREFIX]).load_weights(weights)
