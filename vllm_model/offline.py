"""Offline transcription with vLLM's `LLM` engine and the plugin.

Shared by the transcription CLI, the setup script and the serving benchmark:
engine settings that work on CPU and GPU, the one way a clip becomes a request,
the original's decoding length, and a streaming loop that keeps the engine's
batch full while handing each transcript back as soon as it is finished.

`transcriptions(llm, clips, Decoding(...))` is the one entry point for every
decoding mode (`decoding.py`: `Decoding`, `ORIGINAL_RECIPE`): greedy (optionally
with the original's repetition penalty, as a logits processor) and
transformers-4.x beam search (`beam_search.py`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from fireredasr_converter import spec

from .decoding import GREEDY, Decoding

# Room for the longest accepted clip (30 s: 375 speech embeddings), the prompt and
# as many generated tokens as embeddings.
DEFAULT_MAX_MODEL_LEN = 1024
# Requests the streaming loop keeps in the engine at once: enough for vLLM to batch
# well, few enough that the clips waiting in memory stay small (20 s is 1.3 MB).
DEFAULT_MAX_IN_FLIGHT = 64
# Beam search keeps up to beam_size requests per clip in the engine: this many clips
# at once give about as many requests as greedy's default.
DEFAULT_BEAM_CLIPS_IN_FLIGHT = 16

Key = TypeVar("Key", bound=Hashable)


def request_errors() -> tuple[type[Exception], ...]:
    """What one request can be refused with, while the engine goes on serving the others.

    The processor's ValueErrors (bad audio, a prompt without <speech>) and vLLM's
    own client errors (e.g. a prompt longer than max_model_len), which in vLLM 0.32
    and 0.33 are not ValueErrors. Imported on use: vLLM is slow to import.
    """
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


@dataclass(frozen=True)
class Transcript:
    text: str
    # Generated ids, including <|im_end|> when decoding stopped on it.
    token_ids: list[int]




def create_engine(
    model: str | Path,
    *,
    penalty_processor: bool = False,
    dtype: str = "auto",
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    **engine_kwargs,
):
    """A vLLM `LLM` for a converted repo, with settings the CPU backend needs when it is the platform.

    `penalty_processor=True` registers the HF repetition penalty's logits
    processor (engine-wide; it acts only on requests that ask for it): pass
    `decoding.needs_penalty_processor` for the decodings the engine will serve.
    Without it nothing custom is registered, so greedy decoding and beam search
    without a penalty run wherever vLLM runs (vLLM 0.34 refuses custom logits
    processors on CPUs without Triton). `max_logprobs` leaves room for beam
    search, whose requests ask for 2 * beam_size + (distinct tokens the beam
    generated) log-probabilities.
    """
    from vllm import LLM
    from vllm.platforms import current_platform

    from .repetition_penalty import HFRepetitionPenalty

    settings = {
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_logprobs": max_model_len,
    }
    if penalty_processor:
        settings["logits_processors"] = [HFRepetitionPenalty]
    if current_platform.is_cpu():
        # The CPU backend sizes its KV cache from this variable (GiB) and compiles slowly.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Its default 128-token blocks are longer than most prompts (a 10 s clip is
        # ~140 tokens), and prefix caching only reuses whole blocks: beam search,
        # whose every step re-sends each beam's prompt, then recomputed it all
        # (0 cache hits; with 32-token blocks 80% of the prompt tokens hit and beam
        # search ran 3.3x faster, greedy decoding unchanged). 32 is the smallest
        # block the CPU attention backend takes.
        settings.update(enforce_eager=True, gpu_memory_utilization=0.2, block_size=32)
        _drop_thread_binding_warnings()
        construction = _engine_in_this_process()
    else:
        construction = nullcontext()
    settings.update(engine_kwargs)
    with construction:
        return LLM(model=str(model), **settings)


@contextmanager
def _engine_in_this_process():
    """Build the engine core in this process, unless the user chose otherwise.

    vLLM's default engine process runs its threads on every core, and this process
    (the front end: output processing, beam search) then fights them for those
    cores at every step, stalling the engine's threads at each operator. Measured on
    2 cores (medium benchmark model, idle machine): greedy decoding of 64 clips
    took 41.8 s in-process against 77.0 s with an engine process, the recipe's beam
    search of 12 clips 56 s against 150 s. vLLM reads the variable while building
    the engine and then freezes its environment in the process that hosts an engine
    core, so it is set only for the construction. In-process, vLLM's CPU worker binds
    this process's threads to the cores and makes `torch.set_num_threads` a no-op here.
    """
    name = "VLLM_ENABLE_V1_MULTIPROCESSING"
    if name in os.environ:
        yield
        return
    os.environ[name] = "0"
    try:
        yield
    finally:
        del os.environ[name]


# What vLLM's CPU worker logs whenever torch.set_num_threads is called in the process
# that hosts it; in-process that is vLLM's own front end, twice per audio request.
THREAD_BINDING_WARNING = "CPU backend doesn't allow to use `torch.set_num_threads`"


class _ThreadBindingWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(THREAD_BINDING_WARNING)


def _drop_thread_binding_warnings() -> None:
    """Keep an in-process CPU engine from logging a warning nobody can act on per request.

    vLLM's front end wraps each multimodal request's processing in a torch thread
    setting, which the CPU worker (having bound the threads) skips with a warning:
    thousands of lines on a batch job's stderr, enough to fill a pipe nobody reads yet.
    """
    logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _ThreadBindingWarningFilter) for f in logger.filters):
        logger.addFilter(_ThreadBindingWarningFilter())


def shutdown_engine(llm) -> None:
    """End the engine core and its worker processes now rather than at interpreter exit."""
    llm.llm_engine.engine_core.shutdown()


def transcription_request(
    waveform: np.ndarray, sampling_rate: int = spec.SAMPLE_RATE, prompt: str | None = None
) -> dict:
    """One clip as a vLLM prompt: the original's transcription prompt with the audio attached.

    `prompt` replaces the prompt text for models whose audio placeholder is not
    `<speech>` (stock vLLM's FireRedASR2 uses `<|AUDIO|>`).
    """
    text = spec.transcription_prompt() if prompt is None else prompt
    return {"prompt": text, "multi_modal_data": {"audio": (waveform, sampling_rate)}}


def default_max_new_tokens(num_samples: int, downsample_rate: int, sampling_rate: int = spec.SAMPLE_RATE) -> int:
    """The original's decoding limit (`decode_max_len=0`): one new token per speech embedding, at least one."""
    num_samples_16k = round(num_samples * spec.SAMPLE_RATE / sampling_rate)
    return max(1, spec.speech_embedding_count_for_samples(num_samples_16k, downsample_rate))


def greedy_params(max_new_tokens: int, *, ignore_eos: bool = False, repetition_penalty: float = 1.0):
    """Greedy decoding, at most `max_new_tokens` (exactly that many with `ignore_eos`).

    Token ids only: the caller decodes them with the repo's tokenizer, as the
    reference does, so both give the same text. A `repetition_penalty` other
    than 1.0 asks the engine's `HFRepetitionPenalty` logits processor for
    transformers' penalty (vLLM's own `repetition_penalty` would also penalise
    the prompt, whose `<|im_end|>` is the stop token); the engine must have
    been started with that processor (`create_engine` does).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from .repetition_penalty import REQUEST_ARG

    return SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        ignore_eos=ignore_eos,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args={REQUEST_ARG: float(repetition_penalty)} if repetition_penalty != 1.0 else None,
    )


def _check_penalty_processor(llm) -> None:
    """Refuse a penalty the engine would silently ignore (it was started without the processor)."""
    ours = {"HFRepetitionPenalty", "HFRepetitionPenaltyV1", "HFRepetitionPenaltyV2"}
    configured = llm.llm_engine.vllm_config.model_config.logits_processors or []
    # Entries are classes or "module:Class" / "module.Class" strings.
    names = {(p if isinstance(p, str) else p.__qualname__).replace(":", ".").rsplit(".", 1)[-1] for p in configured}
    if not names & ours:
        raise ValueError(
            "a repetition penalty needs the engine started with "
            "logits_processors=[fireredasr_vllm.repetition_penalty.HFRepetitionPenalty] "
            "(fireredasr_vllm.offline.create_engine(..., penalty_processor=True) does this)"
        )


def num_samples(waveform: np.ndarray) -> int:
    """Samples per channel, read from the array's shape as vLLM's audio parser reads it.

    A 2-D clip is `(channels, samples)` or `(samples, channels)`; vLLM takes the
    longer axis as time (`vllm.multimodal.audio.normalize_audio`), so this does too:
    `len()` of a channels-first stereo clip is 2.
    """
    shape = np.shape(waveform)
    return max(shape[:2]) if len(shape) == 2 else shape[0]


def clip_token_limit(llm, num_samples: int, sampling_rate: int, max_new_tokens: int | None) -> int:
    """New tokens a clip may generate: `max_new_tokens`, or the original's N when None."""
    if max_new_tokens is not None:
        return max_new_tokens
    downsample_rate = llm.llm_engine.model_config.hf_config.encoder_downsample_rate
    return default_max_new_tokens(num_samples, downsample_rate, sampling_rate)


def decode(llm, token_ids: Sequence[int]) -> str:
    """Text of generated ids, decoded as the reference does (special tokens dropped)."""
    return llm.get_tokenizer().decode(list(token_ids), skip_special_tokens=True)


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
        _check_penalty_processor(llm)
    engine = llm.llm_engine
    # Unique per call: the engine may serve other callers' requests too.
    id_prefix = f"fireredasr-{uuid.uuid4().hex[:8]}-"
    pending = iter(enumerate(clips))
    in_flight: dict[str, Key] = {}
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < max_in_flight:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                number, pair = item
                key, waveform = _key_and_waveform(pair)
                limit = clip_token_limit(llm, num_samples(waveform), sampling_rate, max_new_tokens)
                request_id = f"{id_prefix}{number}"
                try:
                    # Rendered as `LLM.generate` renders it; the engine then takes our request id.
                    (engine_input,) = llm.renderer.render_cmpl([transcription_request(waveform, sampling_rate, prompt)])
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
    decoding: Decoding = GREEDY,
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
    through `beam_search.batched_beam_search`, with transformers 4.x semantics.
    """
    if decoding.needs_penalty_processor:
        _check_penalty_processor(llm)
    if decoding.beam_size == 1:
        yield from stream_transcriptions(
            llm,
            clips,
            sampling_rate=sampling_rate,
            max_new_tokens=decoding.max_new_tokens,
            max_in_flight=DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight,
            repetition_penalty=decoding.repetition_penalty,
        )
        return
    from .beam_search import batched_beam_search

    yield from batched_beam_search(
        llm,
        clips,
        beam_size=decoding.beam_size,
        repetition_penalty=decoding.repetition_penalty,
        length_penalty=decoding.length_penalty,
        max_new_tokens=decoding.max_new_tokens,
        max_in_flight=DEFAULT_BEAM_CLIPS_IN_FLIGHT if max_in_flight is None else max_in_flight,
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
