"""Beam search with transformers 4.x semantics, batched across clips on one vLLM engine.

The original FireRedASR-LLM decodes with transformers 4.x (>= 4.46.3)
`generate(inputs_embeds=..., num_beams=K, repetition_penalty=p,
length_penalty=a, max_new_tokens=N, early_stopping=False)`. For one clip
(batch size 1) that is, step by step (t = tokens generated so far):

1. every running beam's next-token log-softmax (float32); the repetition
   penalty acts on those log-probabilities: a token the beam has generated
   gets `logprob * p` (`/ p` if it is >= 0). Generation started from an empty
   `input_ids`, so the prompt is never penalised;
2. candidate score = beam score + processed log-probability (float32); at the
   first step only one beam exists (the others start at -1e9);
3. the top 2K candidates over all beams, best first. Walking them in rank
   order: an `<|im_end|>` candidate ranked within the top K becomes a finished
   hypothesis with score `sum / (t + 1) ** a` (the generated length counts the
   EOS token); one ranked lower is dropped; other candidates become the next
   running beams until K are taken;
4. the finished hypotheses are a K-best list (`BeamHypotheses`): a new one
   enters while fewer than K are kept or when it beats the worst, which is
   then dropped;
5. with `early_stopping=False` the clip is done once K hypotheses are kept and
   `worst kept >= best candidate score of this step / (t + 1) ** a` (the best
   of all 2K candidates, EOS ones included);
6. after N steps the running beams are added as hypotheses with length N; the
   best hypothesis wins, and `<|im_end|>` is appended to it when it is
   shorter than N.

transformers 5 rewrote beam search (vectorised); for these settings it stops
on the best *running* beam's score instead of the best candidate's, so it can
stop a step earlier than 4.x. This module follows 4.x.

`ClipBeamSearch` is that bookkeeping for one clip, fed one step at a time
with each running beam's log-probabilities, without an engine (unit-tested
against transformers' own beam search). `batched_beam_search` drives many
clips at once on a vLLM engine with one running request per beam: the request
generates greedily (with the beam's repetition penalty, stop tokens masked),
returning its raw top log-probabilities at every step, so when the search
extends the beam with the token the request went on with (most extensions),
the request simply goes on, its KV cache reused. Any other extension starts a
new request whose prompt is the clip's prompt plus the beam's tokens: prefix
caching serves its whole KV blocks and it recomputes only the last partial
block (vLLM's own `LLM.beam_search` instead sends every beam as a new one-token
request every step). The audio's encoder output comes from the prefix cache
or vLLM's encoder cache (keyed by the audio's hash), so the speech encoder
runs once per clip, not once per beam per step (`tests/test_recipe.py` counts
both).
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from fireredasr_converter import spec

from .decoding import Decoding
from .engine import Intake, clip_token_limit, decode, num_samples, request_errors, transcription_request
from .transcript_formats import Transcript

Key = TypeVar("Key", bound=Hashable)

_FLOAT = np.float32


@dataclass
class Beam:
    """A running beam: its generated ids and its summed (penalised) log-probability, float32 as in transformers."""

    token_ids: list[int]
    score: np.float32
    seen: frozenset[int] = field(default_factory=frozenset)
    # Index of the beam it extends in the previous step's running beams.
    parent: int = 0


@dataclass(frozen=True)
class Hypothesis:
    """A finished hypothesis: generated ids without EOS, length-normalised score."""

    score: float
    token_ids: tuple[int, ...]


def penalised_logprob(logprob: float, penalty: float) -> np.float32:
    """transformers' repetition penalty on one float32 log-probability of a generated token."""
    value = _FLOAT(logprob)
    factor = _FLOAT(penalty)
    return value * factor if value < 0 else value / factor


class FinishedHypotheses:
    """The K best finished hypotheses of a clip, with transformers 4.x `BeamHypotheses` rules."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.items: list[Hypothesis] = []
        # As transformers: a sentinel above any score until the list is first filled.
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.items)

    def add(self, token_ids: Sequence[int], sum_logprobs: float, generated_len: int) -> None:
        score = float(sum_logprobs) / (generated_len**self.length_penalty)
        if len(self.items) < self.num_beams or score > self.worst_score:
            self.items.append(Hypothesis(score, tuple(token_ids)))
            if len(self.items) > self.num_beams:
                # Drop the worst (the earliest one among equal scores), as transformers does.
                ranked = sorted((h.score, i) for i, h in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        """`early_stopping=False`: no running beam is expected to beat the worst kept hypothesis."""
        if len(self.items) < self.num_beams:
            return False
        return self.worst_score >= float(best_sum_logprobs) / (cur_len**self.length_penalty)

    def best(self) -> Hypothesis:
        # transformers sorts by score (stable) and pops the last: among ties, the latest added.
        return sorted(self.items, key=lambda h: h.score)[-1]


class ClipBeamSearch:
    """transformers 4.x beam search for one clip, advanced one step at a time.

    Each step: `running()` gives the beams that need next-token
    log-probabilities, `logprobs_needed(beam)` how many of the most likely
    tokens suffice for it, and `advance(...)` takes, per running beam, a dict
    token -> raw log-probability holding at least those top tokens.
    """

    def __init__(
        self,
        *,
        num_beams: int,
        max_new_tokens: int,
        eos_token_id: int,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
    ):
        # The arguments' checks (ValueError naming the argument).
        Decoding(num_beams, repetition_penalty, length_penalty, max_new_tokens)
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        self.repetition_penalty = float(repetition_penalty)
        self.hypotheses = FinishedHypotheses(num_beams, length_penalty)
        # transformers starts K identical empty beams, all but the first at -1e9, so
        # the first step's candidates all come from one beam: start with that one.
        self.beams: list[Beam] = [Beam([], _FLOAT(0.0))]
        self.step = 0
        self.done = False

    def running(self) -> list[Beam]:
        return [] if self.done else self.beams

    def logprobs_needed(self, beam: Beam) -> int:
        """Top raw log-probabilities that contain this beam's top 2K after the penalty.

        The penalty only lowers the tokens the beam has generated, so among the
        raw top (2K + distinct generated tokens) at least 2K tokens are
        unpenalised, and every token outside it ranks below them after the penalty.
        """
        extra = len(beam.seen) if self.repetition_penalty != 1.0 else 0
        return 2 * self.num_beams + extra

    def logprobs_bound(self) -> int:
        """Top raw log-probabilities that suffice for any beam of this clip at any step (see `logprobs_needed`)."""
        longest_history = self.max_new_tokens - 1 if self.repetition_penalty != 1.0 else 0
        return 2 * self.num_beams + longest_history

    def _candidates(self, beam_index: int, beam: Beam, logprobs: dict[int, float]) -> list[tuple]:
        candidates = []
        unpenalised = 0
        for token, logprob in logprobs.items():
            if self.repetition_penalty != 1.0 and token in beam.seen:
                processed = penalised_logprob(logprob, self.repetition_penalty)
            else:
                processed = _FLOAT(logprob)
                unpenalised += 1
            total = _FLOAT(processed + beam.score)
            candidates.append((total, beam_index, token))
        if unpenalised < 2 * self.num_beams:
            raise ValueError(
                f"beam search needs the top {self.logprobs_needed(beam)} log-probabilities of a beam "
                f"but got {len(logprobs)}; start the engine with a larger max_logprobs"
            )
        return candidates

    def advance(self, logprobs_per_beam: Sequence[dict[int, float]]) -> None:
        """One step: `logprobs_per_beam[i]` holds the raw top log-probabilities of `running()[i]`."""
        if self.done:
            raise RuntimeError("this clip's beam search is finished")
        if len(logprobs_per_beam) != len(self.beams):
            raise ValueError(f"expected log-probabilities for {len(self.beams)} beams, got {len(logprobs_per_beam)}")
        K = self.num_beams
        candidates = []
        for index, (beam, logprobs) in enumerate(zip(self.beams, logprobs_per_beam)):
            candidates.extend(self._candidates(index, beam, logprobs))
        # Best first; equal scores in beam then token order (torch.topk leaves ties unspecified).
        candidates.sort(key=lambda c: (-float(c[0]), c[1], c[2]))
        candidates = candidates[: 2 * K]
        cur_len = self.step + 1  # the length the candidates' scores are computed at
        next_beams: list[Beam] = []
        for rank, (total, beam_index, token) in enumerate(candidates):
            beam = self.beams[beam_index]
            if token == self.eos_token_id:
                if rank < K:
                    self.hypotheses.add(beam.token_ids, total, cur_len)
            else:
                next_beams.append(Beam(beam.token_ids + [token], total, beam.seen | {token}, beam_index))
                if len(next_beams) == K:
                    break
        if len(next_beams) < K:
            # Fewer than 2K candidates can only come from a vocabulary smaller than 2K tokens.
            raise ValueError(f"beam search needs at least {2 * K} candidate tokens per step, got {len(candidates)}")
        self.done = self.hypotheses.is_done(candidates[0][0], cur_len)
        self.beams = next_beams
        self.step += 1
        if not self.done and self.step >= self.max_new_tokens:
            # transformers' finalize: the running beams join the hypotheses at length N.
            for beam in self.beams:
                self.hypotheses.add(beam.token_ids, beam.score, len(beam.token_ids))
            self.done = True

    def result(self) -> list[int]:
        """The best hypothesis's generated ids, with `<|im_end|>` when it is shorter than N (as transformers returns it)."""
        if not self.done:
            raise RuntimeError("this clip's beam search is not finished")
        tokens = list(self.hypotheses.best().token_ids)
        if len(tokens) < self.max_new_tokens:
            tokens.append(self.eos_token_id)
        return tokens


def _stream_params(max_tokens: int, num_logprobs: int, repetition_penalty: float, prior_tokens: list[int]):
    """A beam's request: greedy continuation with the beam's penalty, raw top log-probabilities at every step."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from .repetition_penalty import BEAM_ARG, PRIOR_TOKENS_ARG, REQUEST_ARG

    # The request's greedy choice is only a guess at the beam's best continuation
    # (the search itself uses the raw log-probabilities: vLLM's default logprobs
    # mode, the log-softmax of the unprocessed logits). A running beam never takes
    # a stop token (that candidate becomes a finished hypothesis), so the request
    # excludes them and never ends before max_tokens. With a penalty, the engine's
    # HFRepetitionPenalty penalises as the search does (log-probabilities, the
    # beam's tokens so far included) and excludes the stop tokens itself; without
    # one, min_tokens excludes them.
    extra_args, min_tokens = None, max_tokens
    if repetition_penalty != 1.0:
        extra_args = {REQUEST_ARG: repetition_penalty, PRIOR_TOKENS_ARG: prior_tokens, BEAM_ARG: True}
        min_tokens = 0
    return SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        logprobs=num_logprobs,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )


def _beam_prompt(rendered: dict, token_ids: list[int]) -> dict:
    """The clip's rendered prompt followed by a beam's tokens, with the clip's audio (already processed) attached."""
    from vllm.inputs.engine import mm_input

    return mm_input(
        prompt_token_ids=list(rendered["prompt_token_ids"]) + token_ids,
        mm_kwargs=rendered["mm_kwargs"],
        mm_hashes=rendered["mm_hashes"],
        mm_placeholders=rendered["mm_placeholders"],
        cache_salt=rendered.get("cache_salt"),
    )


@dataclass
class _Stream:
    """A running request that generates one beam's continuation greedily.

    `steps` holds what it produced and the search has not used yet, one entry
    per position: (the token it continued with, raw top log-probabilities).
    """

    request_id: str
    steps: deque[tuple[int, dict[int, float]]] = field(default_factory=deque)
    finished: bool = False

    def has_more(self) -> bool:
        return bool(self.steps) or not self.finished


@dataclass
class _ActiveClip:
    key: Hashable
    rendered: dict
    search: ClipBeamSearch
    num_logprobs: int
    # One stream per running beam of `search`, in the same order.
    streams: list[_Stream] = field(default_factory=list)


def batched_beam_search(
    llm,
    clips: Iterable[tuple[Key, np.ndarray]],
    decoding: Decoding,
    *,
    max_in_flight: int = 16,
    sampling_rate: int = spec.SAMPLE_RATE,
    prompt: str | None = None,
) -> Iterator[tuple[Key, object]]:
    """Transformers-4.x beam search for many clips at once on one engine; yields (key, Transcript | Exception) as clips finish.

    Up to `max_in_flight` clips decode together, each with one running request
    per beam; the next clip is pulled from `clips` when one finishes. A beam's
    request keeps generating greedily (with the beam's repetition penalty, so
    its guess is usually the token the search picks): when the search extends
    the beam with the token the request went on with, the request goes on
    serving that beam and its KV cache is reused; any other extension starts a
    new request whose prompt is the clip's prompt plus the beam's tokens
    (prefix caching serves all but its last partial KV block), and a request
    no beam continues is aborted. A clip advances as soon as each of its beams
    has its next log-probabilities, so clips never wait for each other. A clip
    the engine refuses comes back as its exception; the others go on.
    `decoding.max_new_tokens=None` is the original's per-clip limit N.
    """
    from vllm import RequestOutput

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    engine = llm.llm_engine
    max_logprobs = engine.model_config.max_logprobs
    eos_token_id = llm.get_tokenizer().convert_tokens_to_ids(spec.EOS_TOKEN)
    id_prefix = f"fireredasr-beam-{uuid.uuid4().hex[:8]}-"
    request_numbers = itertools.count()
    intake = Intake(enumerate(clips))
    active: dict[int, _ActiveClip] = {}
    owner: dict[str, tuple[int, _Stream]] = {}  # running request id -> (clip number, its stream)

    def start_stream(number: int, clip: _ActiveClip, beam: Beam) -> _Stream:
        """A request continuing `beam` (raises the engine's refusal)."""
        stream = _Stream(f"{id_prefix}{number}-{next(request_numbers)}")
        params = _stream_params(
            clip.search.max_new_tokens - len(beam.token_ids),
            clip.num_logprobs,
            clip.search.repetition_penalty,
            beam.token_ids,
        )
        engine.add_request(stream.request_id, _beam_prompt(clip.rendered, beam.token_ids), params)
        owner[stream.request_id] = (number, stream)
        return stream

    def abort(streams: Iterable[_Stream]) -> None:
        running = [s.request_id for s in streams if s.request_id in owner]
        if running:
            engine.abort_request(running)
            for request_id in running:
                del owner[request_id]

    def drop(number: int) -> None:
        """Forget a clip and abort its requests, including any started in a step that then failed."""
        abort([stream for owning, stream in owner.values() if owning == number])
        active.pop(number, None)

    def advance(number: int, clip: _ActiveClip) -> bool:
        """Step the clip's search while every beam has its next log-probabilities; True when it is done."""
        search = clip.search
        while all(stream.steps for stream in clip.streams):
            taken = [stream.steps.popleft() for stream in clip.streams]
            search.advance([logprobs for _, logprobs in taken])
            if search.done:
                abort(clip.streams)
                return True
            streams: list[_Stream] = []
            kept: set[int] = set()
            for beam in search.running():
                parent = clip.streams[beam.parent]
                if beam.parent not in kept and taken[beam.parent][0] == beam.token_ids[-1] and parent.has_more():
                    kept.add(beam.parent)
                    streams.append(parent)
                else:
                    streams.append(start_stream(number, clip, beam))
            abort(stream for index, stream in enumerate(clip.streams) if index not in kept)
            clip.streams = streams
        if not all(stream.has_more() for stream in clip.streams):
            # vLLM ended a request early: at max_model_len (finish reason "length").
            raise ValueError(
                f"the engine ended a beam after {search.step} new tokens, before this clip's limit of "
                f"{search.max_new_tokens}: start the engine with a larger max_model_len"
            )
        return False

    try:
        while True:
            for number, (key, waveform) in intake.take(lambda: len(active) < max_in_flight):
                try:
                    limit = clip_token_limit(llm, num_samples(waveform), sampling_rate, decoding.max_new_tokens)
                    search = ClipBeamSearch(
                        num_beams=decoding.beam_size,
                        max_new_tokens=limit,
                        eos_token_id=eos_token_id,
                        repetition_penalty=decoding.repetition_penalty,
                        length_penalty=decoding.length_penalty,
                    )
                    wanted = search.logprobs_bound()
                    # -1 (no limit) or a cap the engine was started with; ClipBeamSearch checks it sufficed.
                    num_logprobs = wanted if max_logprobs < 0 else min(wanted, max_logprobs)
                    # Rendered (audio processed, hashed, placeholders expanded) once per clip.
                    (rendered,) = llm.renderer.render_cmpl([transcription_request(waveform, sampling_rate, prompt)])
                    clip = _ActiveClip(key, rendered, search, num_logprobs)
                    active[number] = clip
                    clip.streams = [start_stream(number, clip, beam) for beam in search.running()]
                except request_errors() as error:
                    drop(number)
                    yield key, error
            if not active:
                return
            touched: set[int] = set()
            for output in engine.step():
                if not isinstance(output, RequestOutput):
                    continue
                entry = owner.get(output.request_id)
                if entry is None:
                    continue
                number, stream = entry
                completion = output.outputs[0]
                for token, logprobs in zip(completion.token_ids, completion.logprobs or ()):
                    stream.steps.append((token, {t: lp.logprob for t, lp in logprobs.items()}))
                if output.finished:
                    stream.finished = True
                    del owner[output.request_id]
                touched.add(number)
            for number in sorted(touched):
                clip = active.get(number)
                if clip is None:
                    continue
                try:
                    if not advance(number, clip):
                        continue
                except request_errors() as error:
                    drop(number)
                    yield clip.key, error
                    continue
                del active[number]
                token_ids = clip.search.result()
                yield clip.key, Transcript(decode(llm, token_ids), token_ids)
    finally:
        for number in list(active):
            drop(number)
