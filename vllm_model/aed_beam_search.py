"""FireRedASR-AED's beam search (the original's `batch_beam_search`) driven on a vLLM engine.

The search's bookkeeping is the reference's (`aed_reference.batch_beam_search`),
step for step and in the same float32 arithmetic; only the decoder's step runs in
vLLM. Each step sends every unfinished beam of every running clip as one request:
the clip's audio as the encoder prompt, the beam's tokens (the start token first)
as the decoder prompt, one new token, and the top log-probabilities of the
*processed* logits (the engine must run with `logprobs_mode="processed_logprobs"`,
`engine.AED_ENGINE_SETTINGS`): with temperature = `softmax_smoothing` vLLM returns
log_softmax(logits / softmax_smoothing), the original's step scores. The sampled
token itself is not used. `aed_batched_beam_search` streams clips through it (what
`offline.transcriptions` runs for an `AedDecoding`); `aed_beam_search` decodes a list.

The EOS penalty needs EOS's score even when EOS is not among the returned top
tokens: while it might still enter the beam's top B after the penalty (its score
is at most the lowest returned one), the beam is asked again for twice as many.

Cost: vLLM caches neither encoder outputs nor decoder prefixes of encoder-decoder
requests, so every step re-encodes each beam's clip and recomputes its decoder
prefix. This is a correctness path (token-identical to the reference); greedy
decoding (`temperature=0`) runs at vLLM's full speed.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fireredasr_converter import aed_spec, spec

from .aed_reference import best_hypothesis
from .decoding import AedDecoding
from .engine import AED_ENGINE_SETTINGS  # noqa: F401  (importable from here, as before)
from .engine import Intake, check_aed_beam_engine, clip_token_limit, decode, num_samples, request_errors
from .transcript_formats import Transcript


@dataclass
class _Clip:
    key: Hashable
    waveform: np.ndarray
    limit: int
    ys: list[list[int]]  # B beams, each the start token and the tokens so far
    scores: torch.Tensor  # [B, 1] float32
    finished: torch.Tensor  # [B, 1] bool
    step: int = 0
    result: list[int] | None = None


def aed_beam_search(
    llm, waveforms: Sequence[np.ndarray], decoding: AedDecoding, sampling_rate: int = spec.SAMPLE_RATE
) -> list[list[int]]:
    """Each clip's best hypothesis (tokens before EOS), as `ReferenceFireRedAsrAed.generate_ids` gives it.

    All clips decode together; a clip the engine refuses raises its error.
    """
    ids: list[list[int]] = [[] for _ in waveforms]
    found = aed_batched_beam_search(
        llm, enumerate(waveforms), decoding, max_in_flight=max(1, len(waveforms)), sampling_rate=sampling_rate
    )
    for index, result in found:
        if isinstance(result, Exception):
            found.close()
            raise result
        ids[index] = list(result.token_ids)
    return ids


def aed_batched_beam_search(
    llm,
    clips: Iterable[tuple[Hashable, np.ndarray]],
    decoding: AedDecoding,
    *,
    max_in_flight: int = 16,
    sampling_rate: int = spec.SAMPLE_RATE,
) -> Iterator[tuple[Hashable, Transcript | Exception]]:
    """The original's beam search for many clips on one engine; yields (key, Transcript | Exception) as clips finish.

    Up to `max_in_flight` clips decode together, a step at a time; when one
    finishes, the next is pulled from `clips` and joins at the next step (each
    step sends every beam anew, so a clip can join at any step). A transcript's
    `token_ids` are the best hypothesis's tokens before EOS, as the reference's.
    A clip the engine refuses comes back as its exception; the others go on.
    """
    from vllm import SamplingParams

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    check_aed_beam_engine(llm)
    config = llm.llm_engine.model_config.hf_config
    B, sos, eos = decoding.beam_size, config.decoder_start_token_id, config.eos_token_id
    first = torch.tensor([0.0] + [aed_spec.BEAM_FILL_SCORE] * (B - 1), dtype=torch.float32)
    # The most log-probabilities one request may ask for (also enough when it is the whole vocabulary).
    most = min(config.vocab_size, llm.llm_engine.model_config.max_logprobs)
    intake = Intake(clips)
    running: list[_Clip] = []
    while True:
        for key, waveform in intake.take(lambda: len(running) < max_in_flight):
            waveform = np.asarray(waveform)
            limit = clip_token_limit(llm, num_samples(waveform), sampling_rate, decoding.max_new_tokens)
            running.append(_Clip(key, waveform, limit, [[sos] for _ in range(B)], first[:, None].clone(),
                                 torch.zeros(B, 1, dtype=torch.bool)))  # fmt: skip
        if not running:
            return
        # The distinct unfinished beams of the running clips: (clip, tokens) -> top scores.
        wanted = {}
        for index, clip in enumerate(running):
            for b in range(B):
                if not clip.finished[b, 0]:
                    wanted.setdefault((index, tuple(clip.ys[b])), None)
        width = dict.fromkeys(wanted, B)
        refused: dict[int, Exception] = {}
        while any(value is None for value in wanted.values()):
            requests = {
                key: (
                    {
                        "encoder_prompt": {
                            "prompt": "", "multi_modal_data": {"audio": (running[key[0]].waveform, sampling_rate)}
                        },
                        "decoder_prompt": {"prompt_token_ids": list(key[1])},
                    },
                    SamplingParams(
                        temperature=decoding.softmax_smoothing, max_tokens=1, logprobs=width[key], detokenize=False
                    ),
                )
                for key, value in wanted.items()
                if value is None
            }  # fmt: skip
            outputs, errors = _generate(llm, requests)
            refused.update(errors)
            for key in [key for key in wanted if key[0] in errors]:
                del wanted[key]
            for key, output in outputs.items():
                step = output.outputs[0].logprobs[0]
                wanted[key] = _top_scores(step, width[key], B, eos, decoding.eos_penalty, config.vocab_size)
                if wanted[key] is None:
                    if width[key] >= most:
                        raise ValueError(
                            f"EOS's score is not among the top {most} log-probabilities the engine returns: "
                            "start it with a larger max_logprobs"
                        )
                    width[key] = min(2 * width[key], most)
        still = []
        for index, clip in enumerate(running):
            if index in refused:
                yield clip.key, refused[index]
                continue
            _advance(clip, [wanted.get((index, tuple(ys))) for ys in clip.ys], B, eos, decoding)
            if clip.result is None:
                still.append(clip)
            else:
                yield clip.key, Transcript(decode(llm, clip.result), clip.result)
        running = still


def _generate(llm, requests: dict) -> tuple[dict, dict[int, Exception]]:
    """One step's requests, `(clip index, tokens) -> (prompt, params)`: (outputs by key, errors by clip index).

    vLLM refuses a whole `generate` call when one request is refused (it aborts the
    others), so a refused call is retried one clip at a time to find the clips at fault.
    """
    keys = list(requests)
    try:
        outputs = llm.generate([requests[k][0] for k in keys], [requests[k][1] for k in keys], use_tqdm=False)
        return dict(zip(keys, outputs)), {}
    except request_errors() as error:
        clips = sorted({index for index, _ in keys})
        if len(clips) == 1:
            return {}, {clips[0]: error}
    outputs, errors = {}, {}
    for index in clips:
        found, refused = _generate(llm, {k: v for k, v in requests.items() if k[0] == index})
        outputs.update(found)
        errors.update(refused)
    return outputs, errors


def _top_scores(logprobs: dict, width: int, B: int, eos: int, eos_penalty: float, vocab_size: int):
    """(values [B] float32, ids [B]) of the step's top B after the EOS penalty, or None if more are needed.

    `logprobs` holds the top `width` tokens and the sampled one (any rank).
    """
    ids = sorted((token for token, lp in logprobs.items() if lp.rank <= width), key=lambda t: logprobs[t].rank)
    if eos_penalty != 1.0 and eos not in ids:
        if eos in logprobs:  # sampled: its score is known
            ids.append(eos)
        elif width < vocab_size:
            # EOS scored at most the lowest of the top `width`; penalised, it could still rank in the top B.
            lowest = torch.tensor(logprobs[ids[-1]].logprob, dtype=torch.float32)
            values = torch.tensor([logprobs[token].logprob for token in ids], dtype=torch.float32)
            if lowest * eos_penalty >= torch.topk(values, B).values[-1]:
                return None
    values = torch.tensor([logprobs[token].logprob for token in ids], dtype=torch.float32)
    if eos_penalty != 1.0 and eos in ids:
        values[ids.index(eos)] *= eos_penalty
    top = torch.topk(values, B)
    return top.values, [ids[i] for i in top.indices.tolist()]


def _advance(clip: _Clip, steps: list, B: int, eos: int, decoding: AedDecoding) -> None:
    """One step of the original's search for one clip (aed_reference.batch_beam_search's arithmetic)."""
    top_scores = torch.empty(B, B, dtype=torch.float32)
    top_ys = torch.empty(B, B, dtype=torch.long)
    finished_scores = torch.tensor([0.0] + [aed_spec.BEAM_FILL_SCORE] * (B - 1), dtype=torch.float32)
    for b, found in enumerate(steps):
        if clip.finished[b, 0]:
            # A finished beam goes on with EOS at no cost; its other extensions are filler.
            top_scores[b], top_ys[b] = finished_scores, eos
        else:
            top_scores[b], top_ys[b] = found[0], torch.tensor(found[1])
    candidates = (clip.scores + top_scores).view(1, B * B)
    scores, best = torch.topk(candidates, k=B, dim=1)
    clip.scores = scores.reshape(B, 1)
    source = torch.div(best, B, rounding_mode="floor").view(-1).tolist()
    tokens = torch.gather(top_ys.view(1, B * B), 1, best).view(B).tolist()
    clip.ys = [clip.ys[s] + [t] for s, t in zip(source, tokens)]
    clip.finished = torch.tensor(tokens)[:, None] == eos
    clip.step += 1
    if bool(clip.finished.all()) or clip.step >= clip.limit:
        ys = torch.tensor(clip.ys)
        clip.result = best_hypothesis(ys, clip.scores[:, 0], eos, decoding.length_penalty)
