"""FireRedASR-LLM on vLLM: Conformer encoder + adapter + vLLM's own Qwen2.

Laid out like vLLM's `qwen2_audio.py`: processing info, dummy inputs builder and
multimodal processor first, then the model class.

The processor turns each clip into fbank + CMVN features (16 kHz mono, the
vectorised front-end of `FireRedAsrFeatureExtractor`) and replaces the prompt's
single `<speech>` token by N placeholder tokens, N = `spec.speech_embedding_count`
of the clip's frame count. The model encodes each clip at its own length (clips of
similar length are batched, padded to the longest of them, and the encoder masks
the padding) and vLLM scatters the N embeddings onto the N placeholders, so the
sequence length the scheduler planned is the one that runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import ModelConfig, SpeechToTextConfig, VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.config.speech_to_text import SpeechToTextParams
from vllm.inputs import MultiModalDataDict, MultiModalInput, PromptType, TextPrompt
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMultiModal,
    SupportsTranscription,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from fireredasr_converter import spec
from fireredasr_converter.configuration import FireRedAsrLlmConfig
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.repo_format import ENCODER_PREFIX, PROJECTOR_PREFIX

from .conformer import SpeechEncoder


# The transcription endpoint's long-upload splitting; see `speech_to_text_config`.
SPLIT_SEARCH_SECONDS = 5
SPLIT_ENERGY_WINDOW_S = 0.1
# The language a transcription request without `language` is taken to be in.
DEFAULT_LANGUAGE = "zh"
# vLLM 0.34 lets a model choose how the transcription endpoint resamples uploads
# (before, the endpoint's audio decoder resampled them itself; on GPU installs
# with torchcodec, differently from the offline path). Where the field exists the
# endpoint uses PyAV, as `get_data_parser` does for offline and chat requests, so
# an upload at any rate gives the model the same samples on every path.
UPLOAD_RESAMPLING = (
    {"audio_resample_method": "pyav"}
    if "audio_resample_method" in {field.name for field in dataclasses.fields(SpeechToTextConfig)}
    else {}
)


@functools.lru_cache(maxsize=8)
def _load_feature_extractor(model: str, revision: str | None) -> FireRedAsrFeatureExtractor:
    return FireRedAsrFeatureExtractor.from_pretrained(model, revision=revision)


def get_feature_extractor(model_config: ModelConfig) -> FireRedAsrFeatureExtractor:
    """The repo's front-end (`preprocessor_config.json`), loaded once per process."""
    return _load_feature_extractor(model_config.model, model_config.revision)


class FireRedAsrAudioFeatures(TensorSchema):
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


class FireRedAsrLlmProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> FireRedAsrLlmConfig:
        return self.ctx.get_hf_config(FireRedAsrLlmConfig)

    def get_feature_extractor(self) -> FireRedAsrFeatureExtractor:
        return get_feature_extractor(self.ctx.model_config)

    def get_data_parser(self) -> MultiModalDataParser:
        # Clips arrive at any rate and channel count; the parser resamples them to
        # 16 kHz and averages the channels. PyAV (vLLM's `audio` extra) resamples,
        # as in vLLM's own audio file loader; the default, torchaudio, comes as a
        # CUDA build from the registry and breaks CPU-only torch installs.
        return MultiModalDataParser(
            target_sr=self.get_feature_extractor().sampling_rate,
            target_channels=1,
            audio_resample_method="pyav",
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # The model was trained with one clip per prompt.
        return {"audio": 1}

    def get_max_speech_embeddings(self) -> int:
        """N of the longest clip the front-end accepts (`max_audio_seconds`)."""
        max_frames = spec.max_fbank_frames(self.get_feature_extractor().max_audio_seconds)
        return spec.speech_embedding_count(max_frames, self.get_hf_config().encoder_downsample_rate)

    def get_mm_max_tokens_per_item(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
    ) -> Mapping[str, int]:
        return {"audio": self.get_max_speech_embeddings()}

    @functools.cached_property
    def default_prompt_ids(self) -> list[int]:
        """The original's decoding prompt, used when a request brings no text."""
        return self.get_tokenizer().encode(spec.transcription_prompt(), add_special_tokens=False)


class FireRedAsrLlmDummyInputsBuilder(BaseDummyInputsBuilder[FireRedAsrLlmProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return spec.transcription_prompt() * mm_counts.get("audio", 0)

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


class FireRedAsrLlmMultiModalProcessor(BaseMultiModalProcessor[FireRedAsrLlmProcessingInfo]):
    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        num_audios = inputs.mm_data_items.get_count("audio", strict=False)
        if num_audios and not inputs.prompt:
            inputs = dataclasses.replace(inputs, prompt=list(self.info.default_prompt_ids))
        num_speech_tokens = inputs.prompt.count(self.info.get_hf_config().speech_token_id)
        if num_speech_tokens != num_audios:
            raise ValueError(
                f"the prompt has {num_speech_tokens} {spec.SPEECH_TOKEN} token(s) for "
                f"{num_audios} audio clip(s): put one {spec.SPEECH_TOKEN} where the audio goes, "
                "or send an empty prompt to use the model's transcription prompt"
            )
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(
        self,
        hf_data: Mapping[str, object],
        hf_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        extractor = self.info.get_feature_extractor()
        downsample_rate = self.info.get_hf_config().encoder_downsample_rate
        features = []
        for waveform in hf_data["audio"]:
            waveform = np.asarray(waveform)
            extractor.validate_waveform(waveform, downsample_rate)
            # Each clip keeps its own length: the model pads a batch only to its longest clip.
            features.append(extractor.compute_features(torch.from_numpy(waveform.astype(np.float32))))
        return BatchFeature({"input_features": features})

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"input_features": MultiModalFieldConfig.batched("audio")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        clips = out_mm_kwargs.get("audio", [])

        def speech_placeholders(item_idx: int) -> list[int]:
            num_frames = clips[item_idx]["input_features"].data.shape[0]
            count = spec.speech_embedding_count(num_frames, config.encoder_downsample_rate)
            return [config.speech_token_id] * count

        return [
            PromptReplacement(
                modality="audio",
                target=[config.speech_token_id],
                replacement=speech_placeholders,
            )
        ]


def speech_to_text_config(model_config: ModelConfig, min_clip_samples: int) -> SpeechToTextConfig:
    """The transcription endpoint's settings for a model whose shortest clip is `min_clip_samples` (both models).

    Uploads longer than the model's max_audio_seconds are cut by vLLM's own
    splitter (`vllm.multimodal.audio.split_audio`) into chunks of at most
    max_audio_clip_s, each transcribed as its own request. vLLM takes whole
    seconds, so a fractional max_audio_seconds is rounded down: a chunk is then
    never longer than the processor accepts.
    """
    extractor = get_feature_extractor(model_config)
    max_clip_s = math.floor(extractor.max_audio_seconds)
    # Each cut lands at the start of the quietest window (RMS energy) among the
    # windows inside the last SPLIT_SEARCH_SECONDS before the boundary: 100 ms
    # windows fit inside the pauses between words, and a few seconds of search
    # almost always hold a real pause, at the price of chunks up to that much
    # shorter than max_audio_clip_s.
    #
    # The window is also never shorter than the model's minimum clip. The cut is
    # a window's start and that window lies before the boundary, so the audio
    # after the last cut is always longer than one window: vLLM never sends a
    # tail chunk the processor would refuse as too short, however little audio
    # lies past the boundary (a 30.02 s upload gives a last chunk of more than
    # 100 ms, not 20 ms). tests/test_vllm_serve.py checks this against the
    # installed vLLM's splitter.
    window = max(round(SPLIT_ENERGY_WINDOW_S * extractor.sampling_rate), min_clip_samples)
    # vLLM's splitter needs its search region inside the clip; a model whose
    # clips are that short keeps refusing long uploads instead (no chunking).
    chunking = max_clip_s > SPLIT_SEARCH_SECONDS
    return SpeechToTextConfig(
        sample_rate=extractor.sampling_rate,
        max_audio_clip_s=max_clip_s if chunking else None,
        overlap_chunk_second=SPLIT_SEARCH_SECONDS,
        min_energy_split_window_size=window if chunking else None,
        **UPLOAD_RESAMPLING,
    )


def transcription_language(language: str | None, supported: Mapping[str, str], model_name: str) -> str:
    """A transcription request's language for vLLM's `validate_language`: the model's own when none is given.

    vLLM joins the chunks of a long upload with "" when the request's language
    is in `no_space_languages` (zh) and with a space otherwise. It picks that
    separator from `validate_language`'s answer before any chunk is decoded, and
    `post_process_output` sees one chunk's text without knowing its place, so
    no hook can choose the separator from the text itself. A request without
    `language` therefore gets the model's own language, Chinese (its
    instruction and most of its training data are Mandarin): Chinese chunks
    are not split by spaces. English uploads pass language="en" to get a
    space between chunks. The prompt does not depend on the language.
    vLLM's own check only warns for other languages; the models know these two.
    """
    if language is not None and language not in supported:
        raise ValueError(
            f"language {language!r}: {model_name} transcribes Mandarin and English; "
            "pass language 'zh' or 'en', or leave it out (Mandarin)"
        )
    return DEFAULT_LANGUAGE if language is None else language


@MULTIMODAL_REGISTRY.register_processor(
    FireRedAsrLlmMultiModalProcessor,
    info=FireRedAsrLlmProcessingInfo,
    dummy_inputs=FireRedAsrLlmDummyInputsBuilder,
)
class FireRedAsrLlmForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsTranscription):
    # The converted repo names the encoder `encoder.*` / `encoder_projector.*`;
    # here both live under the `speech_encoder` tower.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            ENCODER_PREFIX: "speech_encoder." + ENCODER_PREFIX,
            PROJECTOR_PREFIX: "speech_encoder." + PROJECTOR_PREFIX,
        }
    )

    supported_languages = {"zh": "Chinese", "en": "English"}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return spec.SPEECH_TOKEN
        raise ValueError("FireRedASR-LLM only accepts audio")

    @classmethod
    def get_speech_to_text_config(
        cls, model_config: ModelConfig, task_type: Literal["transcribe", "translate"]
    ) -> SpeechToTextConfig:
        min_clip = spec.min_samples_for_one_embedding(model_config.hf_config.encoder_downsample_rate)
        return speech_to_text_config(model_config, min_clip)

    @classmethod
    def validate_language(cls, language: str | None) -> str | None:
        return super().validate_language(transcription_language(language, cls.supported_languages, "FireRedASR-LLM"))

    @classmethod
    def post_process_output(cls, text: str) -> str:
        # vLLM joins a long upload's chunk texts with " " (or ""); a chunk's own leading
        # or trailing space (a byte-level BPE tokenizer writes one before a word) would
        # otherwise double the space at the cut.
        return text.strip()

    @classmethod
    def get_generation_prompt(cls, stt_params: SpeechToTextParams) -> PromptType:
        if stt_params.task_type != "transcribe":
            raise ValueError(
                f"FireRedASR-LLM only transcribes (got task {stt_params.task_type!r}); "
                "use /v1/audio/transcriptions"
            )
        if stt_params.request_prompt:
            raise ValueError(
                "FireRedASR-LLM transcribes with the fixed instruction it was trained with; "
                "leave `prompt` empty"
            )
        return TextPrompt(
            prompt=spec.transcription_prompt(),
            multi_modal_data={"audio": (stt_params.audio, stt_params.stt_config.sample_rate)},
        )

    @classmethod
    def get_num_audio_tokens(
        cls,
        audio_duration_s: float,
        stt_config: SpeechToTextConfig,
        model_config: ModelConfig,
    ) -> int | None:
        num_samples = round(audio_duration_s * spec.SAMPLE_RATE)
        return spec.speech_embedding_count_for_samples(
            num_samples, model_config.hf_config.encoder_downsample_rate
        )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: FireRedAsrLlmConfig = vllm_config.model_config.hf_config
        self.config = config
        # Start-up profiling runs the encoder on clips of this length; see `_encode_speech`.
        self.max_clip_frames = spec.max_fbank_frames(
            get_feature_extractor(vllm_config.model_config).max_audio_seconds
        )

        with self._mark_tower_model(vllm_config, "audio"):
            self.speech_encoder = SpeechEncoder(config)

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"],
            )

    def _parse_and_validate_audio_input(self, **kwargs: object) -> FireRedAsrAudioFeatures | None:
        input_features = kwargs.pop("input_features", None)
        if input_features is None:
            return None
        return FireRedAsrAudioFeatures(
            input_features=input_features,
            resolve_bindings={"nmb": self.config.encoder_config.idim},
        )

    def _encode_speech(self, audio_input: FireRedAsrAudioFeatures) -> tuple[torch.Tensor, ...]:
        # Batched by similar length, the padding masked: each clip gets its
        # batch-size-1 embeddings, N rows each. No forward pads more frames than
        # vLLM's start-up memory profiling ran, so a busy server cannot run out of
        # the memory profiling reserved for the encoder.
        clips = list(audio_input["input_features"])
        return tuple(self.speech_encoder.encode_clips(clips, max_clip_frames=self.max_clip_frames))

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        audio_input = self._parse_and_validate_audio_input(**kwargs)
        if audio_input is None:
            return []
        return self._encode_speech(audio_input)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
