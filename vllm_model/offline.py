"""Offline transcription with vLLM's `LLM` engine and the plugin: the decoding dispatcher.

`transcriptions(llm, clips, Decoding(...))` is the one entry point for every
decoding mode (`decoding.py`: `Decoding`, `ORIGINAL_RECIPE`): greedy (optionally
with the original's repetition penalty, as a logits processor) through
`stream_transcriptions`, a streaming loop that keeps the engine's batch full
while handing each transcript back as soon as it is finished, and
transformers-4.x beam search (`beam_search.py`). Both build on `engine.py`
(engine settings, a clip as a request), whose names are importable from here
too (`fireredasr_vllm.offline.create_engine`). For recordings of any length,
with segments and times, use `fireredasr_vllm.FireRedAsr`.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from fireredasr_converter import spec

from .aed_beam_search import aed_batched_beam_search
from .beam_search import batched_beam_search
from .decoding import GREEDY, AedDecoding, Decoding

# The engine primitives are `engine`'s; these names are imported from here in the docs and by users.
from .engine import (  # noqa: F401
    DEFAULT_MAX_MODEL_LEN,
    aed_transcription_request,
    check_aed_decoding,
    check_penalty_processor,
    clip_token_limit,
    create_engine,
    decode,
    default_max_new_tokens,
    greedy_params,
    is_aed,
    num_samples,
    request_errors,
    shutdown_engine,
    transcription_request,
)
from .engine import Intake
from .transcript_formats import Transcript

# Requests the streaming loop keeps in the engine at once: enough for vLLM to batch
# well, few enough that the clips waiting in memory stay small (20 s is 1.3 MB).
DEFAULT_MAX_IN_FLIGHT = 64
# Beam search keeps up to beam_size requests per clip in the engine: this many clips
# at once give about as many requests as greedy's default.
DEFAULT_BEAM_CLIPS_IN_FLIGHT = 16

Key = TypeVar("Key", bound=Hashable)


def _key_and_waveform(pair) -> tuple:
    # A bare array would otherwise be unpacked along its first axis: a 1-D clip fails
    # with "too many values to unpack", and a stereo (2, N) clip would turn into a key
    # and a mono waveform.
    if isinstance(pair, np.ndarray) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(
            f"stream_transcriptions takes (key, waveform) pairs, got {type(pair).__name__}: "
            "pass enumerate(waveforms) or zip(keys, waveforms)"
        )
    return pair


def stream_transcriptions(
    llm,
    clips: Iterable[tuple[Key, np.ndarray]],
    *,
    sampling_rate: int = spec.SAMPLE_RATE,
    max_new_tokens: int | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ignore_eos: bool = False,
    prompt: str | None = None,
    repetition_penalty: float = 1.0,
) -> Iterator[tuple[Key, Transcript | Exception]]:
    """Greedy transcripts in the order they finish, while the engine stays busy.

    `clips` yields `(key, waveform)` pairs (not bare arrays; `enumerate(waveforms)`
    will do) and each result comes back as `(key, Transcript or exception)`, in the
    order the clips finish, not the order given: the key says which clip it is.
    Clips are pulled from `clips` lazily: up to `max_in_flight` requests are kept in
    the engine, and a new one is added whenever one finishes, so vLLM batches
    continuously and the caller can write each result at once. A clip the engine
    refuses (e.g. too long) comes back as its exception; the others go on.
    `max_new_tokens=None` is the original's limit, N tokens for N speech embeddings;
    `ignore_eos` makes every clip generate exactly `max_new_tokens` (benchmarks).
    `repetition_penalty` is transformers' (see `greedy_params`).
    """
    from vllm import RequestOutput

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    if repetition_penalty != 1.0:
        check_penalty_processor(llm)
    engine = llm.llm_engine

    def request(waveform):
        hf_config = engine.model_config.hf_config
        if is_aed(hf_config):
            # FireRedASR-AED: the audio as the encoder prompt, the start token alone as the decoder's.
            return aed_transcription_request(waveform, sampling_rate, hf_config.decoder_start_token_id)
        return transcription_request(waveform, sampling_rate, prompt)
    # Unique per call: the engine may serve other callers' requests too.
    id_prefix = f"fireredasr-{uuid.uuid4().hex[:8]}-"
    intake = Intake(enumerate(clips))
    in_flight: dict[str, Key] = {}
    try:
        while True:
            for number, pair in intake.take(lambda: len(in_flight) < max_in_flight):
                key, waveform = _key_and_waveform(pair)
                limit = clip_token_limit(llm, num_samples(waveform), sampling_rate, max_new_tokens)
                request_id = f"{id_prefix}{number}"
                try:
                    # Rendered as `LLM.generate` renders it; the engine then takes our request id.
                    (engine_input,) = llm.renderer.render_cmpl([request(waveform)])
                    engine.add_request(
                        request_id,
                        engine_input,
                        greedy_params(limit, ignore_eos=ignore_eos, repetition_penalty=repetition_penalty),
                    )
                except request_errors() as error:
                    yield key, error
                    continue
                in_flight[request_id] = key
            if not in_flight:
                return
            for output in engine.step():
                if isinstance(output, RequestOutput) and output.finished and output.request_id in in_flight:
                    token_ids = list(output.outputs[0].token_ids)
                    yield in_flight.pop(output.request_id), Transcript(decode(llm, token_ids), token_ids)
    finally:
        if in_flight:
            # The caller stopped early: leave the engine clean for its next use.
            engine.abort_request(list(in_flight))


def transcriptions(
    llm,
    clips: Iterable[tuple[Key, np.ndarray]],
    decoding: Decoding | AedDecoding = GREEDY,
    *,
    max_in_flight: int | None = None,
    sampling_rate: int = spec.SAMPLE_RATE,
) -> Iterator[tuple[Key, Transcript | Exception]]:
    """Transcripts of `(key, waveform)` clips with `decoding`, yielded as `(key, result)` in the order they finish.

    `result` is a `Transcript`, or the exception that refused that clip (the
    others go on). Clips are pulled lazily. `max_in_flight` bounds what is in
    the engine at once: requests for greedy decoding (default
    DEFAULT_MAX_IN_FLIGHT), clips for beam search (default
    DEFAULT_BEAM_CLIPS_IN_FLIGHT, each with up to `beam_size` requests).
    Greedy decoding (beam 1) goes through `stream_transcriptions`; beam search
    through `beam_search.batched_beam_search`, with transformers 4.x semantics;
    FireRedASR-AED's `AedDecoding` (the original's `batch_beam_search`) through
    `aed_beam_search.aed_batched_beam_search`, unless it is greedy.
    """
    check_aed_decoding(llm.llm_engine.model_config.hf_config, decoding)
    if decoding.needs_penalty_processor:
        check_penalty_processor(llm)
    clips_in_flight = DEFAULT_BEAM_CLIPS_IN_FLIGHT if max_in_flight is None else max_in_flight
    if isinstance(decoding, AedDecoding) and not decoding.is_greedy:
        yield from aed_batched_beam_search(llm, clips, decoding, max_in_flight=clips_in_flight, sampling_rate=sampling_rate)
        return
    if decoding.beam_size == 1:
        yield from stream_transcriptions(
            llm,
            clips,
            sampling_rate=sampling_rate,
            max_new_tokens=decoding.max_new_tokens,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight,
            repetition_penalty=decoding.repetition_penalty if isinstance(decoding, Decoding) else 1.0,
        )
        return
    yield from batched_beam_search(
        llm,
        clips,
        decoding,
        max_in_flight=clips_in_flight,
        sampling_rate=sampling_rate,
    )


def transcribe(llm, waveforms: Sequence[np.ndarray], sampling_rate: int = spec.SAMPLE_RATE) -> list[str]:
    """Greedy transcripts in input order, at most N new tokens per clip (the original's default)."""
    texts: list[str | None] = [None] * len(waveforms)
    for index, result in stream_transcriptions(llm, enumerate(waveforms), sampling_rate=sampling_rate):
        if isinstance(result, Exception):
            raise result
        texts[index] = result.text
    return texts
