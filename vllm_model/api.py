"""The Python API: one object per model, `transcribe(audio)` for audio of any length.

    from fireredasr_vllm import FireRedAsr

    asr = FireRedAsr("./out")  # a converted repo, a Hub id, or a running vllm.LLM
    segments, info = asr.transcribe("meeting.wav")
    for segment in segments:  # decoded as you iterate
        print(f"[{segment.start:.2f} -> {segment.end:.2f}] {segment.text}")

A recording of at most the model's clip limit (30 s) is decoded whole, as the
original does; a longer one is cut by a voice activity detector into segments
the model takes, silence left out (`segmenter.py`). `transcribe_many` decodes
many recordings in one continuous batch, with memory bounded whatever their
length; `fireredasr-transcribe` is a client of it. Options are small frozen
dataclasses passed whole: `Decoding` (greedy, beam search, the original's
recipe; for FireRedASR-AED `AedDecoding`, its recipe `AED_RECIPE`) and
`SegmenterSettings` (the detector). A recording that cannot be
transcribed is a `TranscriptionError` (`errors.py`) with a one-line message.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fireredasr_converter import spec
from fireredasr_converter.errors import first_line

from .audio_input import Utterance, Waveform
from .decoders import ReferenceBackend, VllmDecoder
from .decoding import AED_RECIPE, GREEDY, ORIGINAL_RECIPE, AedDecoding, Decoding
from .engine import (
    check_aed_beam_engine,
    check_aed_decoding,
    check_penalty_processor,
    create_engine,
    engine_settings,
    frames_per_token,
    is_aed,
    shutdown_engine,
)
from .errors import TranscriptionError, TranscriptionFailed, recording_error
from .recordings import SEGMENT_MODES, FileFailed, SegmentReady, decoded_recordings, in_background, segment_events
from .segmenter import SegmenterSettings
from .transcript_formats import RecordingTranscript, TimedText, join_texts

BACKENDS = ("vllm", "reference")
# Requests kept in the engine at once (continuous batching; beam search counts one per beam).
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class TranscriptionInfo:
    """What was transcribed and how.

    `duration` is the recording's length in seconds; `duration_after_vad` the
    seconds sent to the model (all of them when it was decoded whole).
    `language` is None: FireRedASR-LLM writes Mandarin and English as heard and
    does not say which it heard.
    """

    duration: float
    duration_after_vad: float
    language: str | None
    decoding: Decoding | AedDecoding
    vad: SegmenterSettings


@dataclass(frozen=True)
class Transcription:
    """A whole recording's transcript: its segments, in order, and its `TranscriptionInfo`."""

    segments: tuple[TimedText, ...]
    info: TranscriptionInfo

    @property
    def text(self) -> str:
        """The segments' texts joined as the languages are written (no space between two CJK characters)."""
        return join_texts([s.text for s in self.segments])


@dataclass(frozen=True)
class FrontEnd:
    """A converted repo's config and feature extractor: what checks a clip before it reaches a decoder."""

    config: Any
    extractor: Any

    @classmethod
    def load(cls, model: str) -> FrontEnd:
        """The repo's front end, or TranscriptionFailed saying why it is not a converted repo."""
        from transformers import AutoConfig

        from fireredasr_converter.configuration import FireRedAsrAedConfig, FireRedAsrLlmConfig, register_with_transformers
        from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor

        try:
            register_with_transformers()
            # FireRedASR-LLM or FireRedASR-AED, as the repo's model_type says.
            config = AutoConfig.from_pretrained(model)
            if not isinstance(config, (FireRedAsrLlmConfig, FireRedAsrAedConfig)):
                raise ValueError(f"its model_type {config.model_type!r} is not a FireRedASR model's")
            return cls(config, FireRedAsrFeatureExtractor.from_pretrained(model))
        except (OSError, ValueError, RecursionError) as error:
            # A repo's JSON is data from elsewhere: too deeply nested is refused like any other damage.
            reason = "a JSON file nests too deeply" if isinstance(error, RecursionError) else first_line(error) or type(error).__name__
            raise TranscriptionFailed(
                f"cannot load {model}: {reason}; pass a converted repo (`fireredasr-convert SRC OUT`)"
            ) from None

    def dtype(self, dtype: str) -> str:
        """The compute dtype for `dtype`: "auto" is the converted weights' own (vLLM's "auto" would run fp32 in half precision)."""
        return str(self.config.dtype or "float32").removeprefix("torch.") if dtype == "auto" else dtype

    @property
    def validate(self) -> Callable:
        """Raises ValueError for a clip the model cannot take. A partial, not a closure: Ray ships it to its read tasks."""
        return functools.partial(self.extractor.validate_waveform, downsample_rate=frames_per_token(self.config))

    @property
    def original_recipe(self) -> Decoding | AedDecoding:
        """The original's published decoding for this model: FireRedASR-LLM's `ORIGINAL_RECIPE` or FireRedASR-AED's `AED_RECIPE`."""
        return AED_RECIPE if is_aed(self.config) else ORIGINAL_RECIPE

    @property
    def segmenter_settings(self) -> SegmenterSettings:
        """The detector's default settings for this model: segments up to its clip limit."""
        return SegmenterSettings(max_seconds=self.extractor.max_audio_seconds)


def _is_engine(model) -> bool:
    return hasattr(model, "llm_engine") and hasattr(model, "get_tokenizer")


class FireRedAsr:
    """A converted FireRedASR-LLM or FireRedASR-AED model ready to transcribe audio of any length.

    `model` is a converted repo (a folder, or its Hugging Face Hub id), which
    starts a vLLM engine in this process with the plugin, or a running
    `vllm.LLM` of such a repo, which stays yours (settings and `close`). The
    engine is built to serve `decoding` (the default of every call: the
    original's recipe needs its repetition penalty processor registered at
    start, FireRedASR-AED's beam search `engine.AED_ENGINE_SETTINGS`); a
    FireRedASR-AED repo decodes with an `AedDecoding` (`AED_RECIPE` is its
    recipe) or greedily; `FrontEnd.load(model).original_recipe` is either
    model's recipe. `dtype` "auto" is the dtype the repo was converted to;
    `engine_overrides` go to `vllm.LLM` as they are. `backend="reference"` runs
    the plain PyTorch reference instead, one clip at a time (for checking).

    Runnable on the demo model (`make demo` converts it to `.demo/converted`,
    fp32; its held-out clips ship in the package):

    >>> from fireredasr_vllm import FireRedAsr, demo
    >>> with FireRedAsr(".demo/converted") as asr:
    ...     segments, info = asr.transcribe(demo.HELDOUT_DIR / "heldout00000-en.wav")
    ...     print(f"{info.duration:.2f} s:", [segment.text for segment in segments])
    2.59 s: ['one six five one seven two']
    """

    def __init__(
        self,
        model,
        *,
        decoding: Decoding | AedDecoding = GREEDY,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        seed: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        backend: str = "vllm",
        **engine_overrides,
    ):
        _check_decoding_type(decoding)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.decoding = decoding
        self.batch_size = batch_size
        self.llm = None
        self._owns_engine = False
        if _is_engine(model):
            if backend != "vllm" or engine_overrides or dtype != "auto" or tensor_parallel_size != 1:
                raise ValueError("a running vllm.LLM keeps its own settings: pass only decoding and batch_size with it")
            self.llm = model
            self.model = str(model.llm_engine.model_config.model)
            self.front_end = FrontEnd.load(self.model)
            self._check_model_decodes(decoding)
        else:
            if not isinstance(model, (str, os.PathLike)):
                raise TypeError(f"model must be a converted repo's folder or Hub id, or a vllm.LLM; got {type(model).__name__}")
            self.model = os.fspath(model)
            self.front_end = FrontEnd.load(self.model)
            self._check_model_decodes(decoding)
            if backend == "reference":
                if engine_overrides or tensor_parallel_size != 1:
                    raise ValueError("engine settings apply to backend='vllm' only")
                self._decoder = ReferenceBackend(self.model, dtype=self.front_end.dtype(dtype))
                return
            settings = engine_settings(
                decoding, dtype=self.front_end.dtype(dtype), tensor_parallel_size=tensor_parallel_size, seed=seed
            )
            self.llm = create_engine(self.model, **{**settings, **engine_overrides})
            self._owns_engine = True
        self._decoder = VllmDecoder(self.llm)
        self._check_engine_serves(decoding)

    # --- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """End the engine this object started (an engine you passed in stays running)."""
        if self._owns_engine and self.llm is not None:
            self._owns_engine = False
            shutdown_engine(self.llm)

    def __enter__(self) -> FireRedAsr:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transcription ------------------------------------------------------------

    def transcribe(
        self,
        audio,
        *,
        decoding: Decoding | AedDecoding | None = None,
        vad: SegmenterSettings | None = None,
        segment: str = "auto",
    ) -> tuple[Iterator[TimedText], TranscriptionInfo]:
        """One recording's segments, decoded lazily as you iterate, and its `TranscriptionInfo`.

        `audio` is a file path (WAV, FLAC, OGG, MP3; any rate and channel count)
        or `(samples, sampling_rate)` with 1-D floating-point samples in [-1, 1].
        Each segment is a `TimedText` (start and end in seconds, text, token ids).
        `decoding` defaults to the object's; `vad` to the model's
        `SegmenterSettings`; `segment` "auto" decodes a recording of at most the
        clip limit whole, "always" sends every recording through the detector.

        The audio is read and segmented here (an AudioError at once when it
        cannot be); the speech segments stay in memory until decoded. A segment
        the engine refuses raises its TranscriptionError while iterating.
        """
        decoding, vad = self._options(decoding, vad, segment)
        source = _source(audio, "the audio")
        events = list(segment_events([(0, Utterance("audio", source))], vad, segment, self.front_end.validate))
        if isinstance(events[-1], FileFailed):
            raise events[-1].error
        ready = [event for event in events if isinstance(event, SegmentReady)]
        info = TranscriptionInfo(
            duration=events[-1].num_samples / spec.SAMPLE_RATE,
            duration_after_vad=sum(e.segment.end_seconds - e.segment.start_seconds for e in ready),
            language=None,
            decoding=decoding,
            vad=vad,
        )
        return self._segments_in_order(ready, decoding), info

    def _segments_in_order(self, ready: list[SegmentReady], decoding: Decoding | AedDecoding) -> Iterator[TimedText]:
        finished: dict[int, object] = {}
        following = 0
        results = self._decoder.transcribe(((e.number, e.samples) for e in ready), decoding, batch_size=self.batch_size)
        try:
            for number, outcome in results:
                if isinstance(outcome, Exception):
                    raise recording_error(outcome)
                finished[number] = outcome
                while following in finished:
                    outcome, seg = finished.pop(following), ready[following].segment
                    yield TimedText(seg.start_seconds, seg.end_seconds, outcome.text, tuple(outcome.token_ids))
                    following += 1
        finally:
            results.close()

    def transcribe_many(
        self,
        inputs: Mapping[Hashable, Any] | Iterable,
        *,
        decoding: Decoding | AedDecoding | None = None,
        vad: SegmenterSettings | None = None,
        segment: str = "auto",
        ordered: bool = True,
        on_audio: Callable[[float], None] | None = None,
    ) -> Iterator[tuple[Hashable, Transcription | TranscriptionError]]:
        """`(key, Transcription or TranscriptionError)` for every recording, decoded in one continuous batch.

        `inputs` maps keys to audio (paths or `(samples, sampling_rate)`, as
        `transcribe` takes), or lists audio, keyed by position. Every
        recording's segments share the engine's batch; a recording that cannot
        be transcribed comes back as its error and the others go on. `ordered`
        yields in input order (a recording waits for the earlier ones), else in
        the order they finish. Files are read and segmented on a background
        thread, a few segments ahead: memory stays bounded whatever their
        length. `on_audio` hears the seconds of audio each decoded segment (with
        the silence before it) accounts for, for progress displays.
        """
        decoding, vad = self._options(decoding, vad, segment)
        items = list(inputs.items()) if isinstance(inputs, Mapping) else list(enumerate(inputs))
        # Checked before anything is decoded: a wrong type is a caller's mistake, not a recording's.
        files = [(index, Utterance(str(key), _source(audio, f"input {key!r}"))) for index, (key, audio) in enumerate(items)]
        events = in_background(segment_events(files, vad, segment, self.front_end.validate))
        uttids = {index: utterance.uttid for index, utterance in files}
        recordings = decoded_recordings(self._decoder, events, uttids, decoding, self.batch_size,
                                        on_audio or (lambda seconds: None))  # fmt: skip
        waiting: dict[int, Transcription | TranscriptionError] = {}
        following = 0
        try:
            for finished in recordings:
                result = _result(finished.transcript, decoding, vad) if finished.error is None else recording_error(finished.error)
                if not ordered:
                    yield items[finished.file][0], result
                    continue
                waiting[finished.file] = result
                while following in waiting:
                    yield items[following][0], waiting.pop(following)
                    following += 1
        finally:
            # Stopped early: the decoder's requests leave the engine, then the reading thread stops.
            recordings.close()
            events.close()

    # --- checks -------------------------------------------------------------------

    def _options(self, decoding: Decoding | AedDecoding | None, vad: SegmenterSettings | None, segment: str):
        decoding = self.decoding if decoding is None else decoding
        _check_decoding_type(decoding)
        limit = self.front_end.extractor.max_audio_seconds
        vad = self.front_end.segmenter_settings if vad is None else vad
        if not isinstance(vad, SegmenterSettings):
            raise TypeError(f"vad must be a fireredasr_vllm.SegmenterSettings, got {type(vad).__name__}")
        if vad.max_seconds > limit:
            raise ValueError(f"vad.max_seconds {vad.max_seconds:g} is over the model's clip limit of {limit:g} s")
        if segment not in SEGMENT_MODES:
            raise ValueError(f"segment must be one of {', '.join(SEGMENT_MODES)}, got {segment!r}")
        self._check_engine_serves(decoding)
        return decoding, vad

    def _check_model_decodes(self, decoding: Decoding | AedDecoding) -> None:
        """At start: a decoding the model has not (the LLM's beam search on FireRedASR-AED, an AedDecoding on
        FireRedASR-LLM) means nothing can be transcribed."""
        try:
            check_aed_decoding(self.front_end.config, decoding)
        except ValueError as error:
            raise TranscriptionFailed(str(error)) from None

    def _check_engine_serves(self, decoding: Decoding | AedDecoding) -> None:
        check_aed_decoding(self.front_end.config, decoding)
        if self.llm is None:
            return
        try:
            if decoding.needs_penalty_processor:
                check_penalty_processor(self.llm)
            if isinstance(decoding, AedDecoding) and not decoding.is_greedy:
                check_aed_beam_engine(self.llm)
        except ValueError as error:
            raise ValueError(f"{error}; FireRedAsr(model, decoding=...) with this decoding starts such an engine") from None


def _check_decoding_type(decoding) -> None:
    if not isinstance(decoding, (Decoding, AedDecoding)):
        raise TypeError(
            f"decoding must be a fireredasr_vllm.Decoding (or, for FireRedASR-AED, a fireredasr_vllm.decoding.AedDecoding), "
            f"got {type(decoding).__name__}"
        )


def _source(audio, name: str) -> str | Waveform:
    """A path or `(samples, sampling_rate)` as what `read_blocks` reads."""
    if isinstance(audio, (str, os.PathLike)):
        return os.fspath(audio)
    if isinstance(audio, tuple) and len(audio) == 2:
        samples, rate = audio
        return Waveform(samples, rate, name)
    raise TypeError(
        f"{name}: give a file path or (samples, sampling_rate), got {type(audio).__name__}"
        + (" (a bare array has no sampling rate)" if hasattr(audio, "shape") else "")
    )


def _result(transcript: RecordingTranscript, decoding: Decoding | AedDecoding, vad: SegmenterSettings) -> Transcription:
    segments = transcript.segments
    info = TranscriptionInfo(
        duration=transcript.duration,
        duration_after_vad=sum(s.end - s.start for s in segments),
        language=None,
        decoding=decoding,
        vad=vad,
    )
    return Transcription(segments, info)
