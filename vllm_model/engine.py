"""A vLLM engine with the plugin, and one clip's way into it and back.

The primitives both decoders (`offline`'s greedy streaming loop and
`beam_search`) build on: the engine's settings (`engine_settings`,
`create_engine`), a clip as a request (`transcription_request`,
`greedy_params`, `clip_token_limit`), generated ids as text (`decode`),
what a request can be refused with, and how the decoders keep their batch
full from a lazy input (`Intake`). Decodes nothing itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from fireredasr_converter import spec

from .decoding import AedDecoding, Decoding

# Room for the longest accepted clip (30 s: 375 speech embeddings), the prompt and
# as many generated tokens as embeddings.
DEFAULT_MAX_MODEL_LEN = 1024

# What `create_engine` adds on a CPU platform. Eager mode: the CPU backend compiles slowly.
# A share of RAM for vLLM's memory check, which otherwise wants 92% of it free. Blocks of
# 32 tokens: the default 128 is longer than most prompts (a 10 s clip is ~140 tokens), and
# prefix caching only reuses whole blocks, so beam search, whose every step re-sends each
# beam's prompt, would recompute it all (measured in docs/benchmarks.md, "The CPU
# engine"); 32 is the smallest block the CPU attention backend takes.
CPU_ENGINE_SETTINGS = {"enforce_eager": True, "gpu_memory_utilization": 0.2, "block_size": 32}

# What an engine needs for FireRedASR-AED's beam search (`aed_beam_search`): the step scores
# after the temperature (= softmax_smoothing), i.e. the original's log_softmax(logits / smoothing).
AED_ENGINE_SETTINGS = {"logprobs_mode": "processed_logprobs"}


class Intake:
    """The refill step of a continuous batch: items taken from an iterable only as room frees up.

    `take(room)` yields the next items while `room()` holds (the caller adds each
    one to its batch before asking again; one it refuses leaves the room free),
    and `done` turns true when the iterable is spent. So a caller holds no more
    than its batch of a long or endless input.
    """

    def __init__(self, items: Iterable):
        self._items = iter(items)
        self.done = False

    def take(self, room: Callable[[], bool]) -> Iterator:
        while not self.done and room():
            try:
                item = next(self._items)
            except StopIteration:
                self.done = True
                return
            yield item


def request_errors() -> tuple[type[Exception], ...]:
    """What one request can be refused with, while the engine goes on serving the others.

    The processor's ValueErrors (bad audio, a prompt without <speech>) and vLLM's
    own client errors (e.g. a prompt longer than max_model_len), which in vLLM 0.32
    and 0.33 are not ValueErrors. Imported on use: vLLM is slow to import.
    """
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


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
        # The CPU backend sizes its KV cache from this variable (GiB).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        settings.update(CPU_ENGINE_SETTINGS)
        _drop_thread_binding_warnings()
        construction = _engine_in_this_process()
    else:
        construction = nullcontext()
    settings.update(engine_kwargs)
    with construction:
        return LLM(model=str(model), **settings)


def engine_settings(decoding: Decoding | AedDecoding, **settings) -> dict:
    """`create_engine`'s arguments for an engine that serves `decoding`: the one place they are derived.

    The penalty processor only when the decoding asks for a penalty, FireRedASR-AED's
    `AED_ENGINE_SETTINGS` for an `AedDecoding`, and room for the prompt, the longest
    clip and `max_new_tokens`. `settings` (dtype, tensor_parallel_size, seed...) are
    passed through.
    """
    return {
        "penalty_processor": decoding.needs_penalty_processor,
        "max_model_len": DEFAULT_MAX_MODEL_LEN + (decoding.max_new_tokens or 0),
        **(AED_ENGINE_SETTINGS if isinstance(decoding, AedDecoding) else {}),
        **settings,
    }


def quiet_vllm_logs() -> None:
    """vLLM logs to stdout by default, where the transcripts may go; its engine
    processes inherit this. INFO is for serving; a batch job shows warnings only."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@contextmanager
def _engine_in_this_process():
    """Build the engine core in this process, unless the user chose otherwise.

    vLLM's default engine process runs its threads on every core, and this process
    (the front end: output processing, beam search) then fights them for those
    cores at every step, stalling the engine's threads at each operator (measured
    in docs/benchmarks.md, "The CPU engine"). vLLM reads the variable while building
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
    `<speech>` (stock vLLM's FireRedASR2 uses `<|AUDIO|>`); FireRedASR-AED's is
    `aed_transcription_request`.
    """
    text = spec.transcription_prompt() if prompt is None else prompt
    return {"prompt": text, "multi_modal_data": {"audio": (waveform, sampling_rate)}}


def aed_transcription_request(waveform: np.ndarray, sampling_rate: int, decoder_start_token_id: int) -> dict:
    """One clip as a FireRedASR-AED request: the audio as the encoder prompt, the start token as the decoder's."""
    return {
        "encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (waveform, sampling_rate)}},
        "decoder_prompt": {"prompt_token_ids": [decoder_start_token_id]},
    }


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


def check_penalty_processor(llm) -> None:
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


def is_aed(hf_config) -> bool:
    """Whether a converted repo's config is FireRedASR-AED's (else FireRedASR-LLM's)."""
    from fireredasr_converter.configuration import AED_MODEL_TYPE

    return hf_config.model_type == AED_MODEL_TYPE


def frames_per_token(hf_config) -> int:
    """Encoder frames behind one unit of the original's token limit: FireRedASR-LLM's adapter
    stacks `encoder_downsample_rate` frames into one speech embedding; FireRedASR-AED's limit
    is one token per encoder frame."""
    return 1 if is_aed(hf_config) else hf_config.encoder_downsample_rate


def check_aed_decoding(hf_config, decoding: Decoding | AedDecoding) -> None:
    """Refuse a decoding the repo's model does not have.

    FireRedASR-AED decodes with an `AedDecoding` (the original's beam search) or a
    greedy `Decoding`; the LLM's beam search and repetition penalty are not its. An
    `AedDecoding` is FireRedASR-AED's only.
    """
    aed = is_aed(hf_config)
    if isinstance(decoding, AedDecoding) and not aed:
        raise ValueError(
            "an AedDecoding is FireRedASR-AED's decoding and this is a FireRedASR-LLM repo: pass a "
            "fireredasr_vllm.Decoding (ORIGINAL_RECIPE is its recipe)"
        )
    if aed and isinstance(decoding, Decoding) and (decoding.beam_size != 1 or decoding.repetition_penalty != 1.0):
        raise ValueError(
            "a FireRedASR-AED repo takes a Decoding for greedy decoding only (beam size 1, no repetition penalty); "
            "its own beam recipe is fireredasr_vllm.decoding.AED_RECIPE, an AedDecoding "
            "(fireredasr-transcribe --recipe original picks it)"
        )


def check_aed_beam_engine(llm) -> None:
    """Refuse FireRedASR-AED's beam search on an engine that returns other scores than the original's."""
    mode = llm.llm_engine.model_config.logprobs_mode
    if mode != AED_ENGINE_SETTINGS["logprobs_mode"]:
        raise ValueError(
            f"the engine returns {mode}; FireRedASR-AED's beam search needs the engine started with "
            "logprobs_mode='processed_logprobs' (fireredasr_vllm.engine.AED_ENGINE_SETTINGS)"
        )


def clip_token_limit(llm, num_samples: int, sampling_rate: int, max_new_tokens: int | None) -> int:
    """New tokens a clip may generate: `max_new_tokens`, or the original's N when None."""
    if max_new_tokens is not None:
        return max_new_tokens
    return default_max_new_tokens(num_samples, frames_per_token(llm.llm_engine.model_config.hf_config), sampling_rate)


def decode(llm, token_ids: Sequence[int]) -> str:
    """Text of generated ids, decoded as the reference does (special tokens dropped)."""
    return llm.get_tokenizer().decode(list(token_ids), skip_special_tokens=True)
