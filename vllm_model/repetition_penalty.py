"""FireRedASR-LLM's repetition penalty, as vLLM logits processors.

The original recipe decodes with Hugging Face
`generate(inputs_embeds=..., repetition_penalty=3.0)`. Called with embeddings
only, `generate` starts from an empty `input_ids`, so the penalty covers the
tokens the request has generated and nothing else: for every distinct token
generated so far, a negative logit is multiplied by the penalty and any other
logit divided by it (greedy decoding applies this to the raw logits). vLLM's
own `SamplingParams.repetition_penalty` also counts every prompt token, and our
prompt holds the stop token `<|im_end|>` and the instruction 请转写音频为文字, so it
penalises the end of the transcript and common characters from the first step.
This module gives the original's behaviour, per request:

- `apply_hf_repetition_penalty`: the arithmetic, used by every class here;
- `HFRepetitionPenaltyV1`: for vLLM's V1 model runner (0.32 and 0.33: the CPU
  backend, and GPUs with `VLLM_USE_V2_MODEL_RUNNER=0`); defined only where
  vLLM still has that runner (`HAS_V1_RUNNER`), since 0.34 deleted it;
- `HFRepetitionPenaltyV2`: for Model Runner V2 (the default on GPUs with Triton
  from 0.32, the only runner from 0.34);
- `HFRepetitionPenalty`: one class that any runner of any supported vLLM loads
  (it passes the loaders' checks and hands every call to the matching class
  above); the one to name when the runner is not known in advance;
- `processor_class`: the class for a given configuration.

Enabling it (engine-wide; it only acts on requests that ask for it)::

    LLM(model=REPO, logits_processors=[HFRepetitionPenalty])
    vllm serve REPO --logits-processors fireredasr_vllm.repetition_penalty:HFRepetitionPenalty

Asking for it (per request, the key `REQUEST_ARG`)::

    SamplingParams(temperature=0, extra_args={"repetition_penalty_hf": 3.0})
    {"vllm_xargs": {"repetition_penalty_hf": 3.0}}     # OpenAI JSON requests
    -F 'vllm_xargs={"repetition_penalty_hf": 3.0}'    # /v1/audio/transcriptions

A request that continues a generation (its prompt ends with tokens generated
earlier, as beam search's new beams do) names those tokens with
`PRIOR_TOKENS_ARG`, and they are penalised as if it had generated them::

    SamplingParams(extra_args={"repetition_penalty_hf": 3.0,
                               "repetition_penalty_hf_prior_tokens": [101, 2048]})

With `BEAM_ARG` true the request extends a beam (`beam_search.py`): the penalty
acts on the row's log-probabilities, as transformers applies it inside beam
search, and the stop tokens are excluded.
A request without the key, or with 1.0, is not touched. Never register these
classes under vLLM's `vllm.logits_processors` entry point: those load for every
model served on the machine. Neither runner supports custom logits processors
together with speculative decoding here (V1 refuses it itself, V2 is refused in
`HFRepetitionPenaltyV2`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
except ImportError:
    # vLLM 0.34 deleted Model Runner V1 and its logits-processor package: V2 is the
    # only runner, and only the V2 classes below exist.
    V1LogitsProcessor = None

# Whether this vLLM still has Model Runner V1 (0.32 and 0.33 do; 0.34 removed it).
HAS_V1_RUNNER = V1LogitsProcessor is not None

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# The key of `SamplingParams.extra_args` (`vllm_xargs` in OpenAI requests).
REQUEST_ARG = "repetition_penalty_hf"
# Optional, with REQUEST_ARG: token ids generated before this request, which the
# penalty covers as if the request had generated them (a generation continued
# in a new request whose prompt ends with them, as beam search's forks are).
PRIOR_TOKENS_ARG = "repetition_penalty_hf_prior_tokens"
# Optional, with REQUEST_ARG: true when the request extends a beam of
# transformers' beam search. The penalty then acts on the row's log-probabilities
# (the log-softmax of its logits, handed on to sampling), as transformers applies
# it inside beam search, and the request's stop tokens are excluded afterwards
# (a beam's stop candidate becomes a finished hypothesis, never a longer beam),
# so greedy sampling picks the beam's best continuation. Excluding them here
# rather than with `min_tokens` matters: vLLM masks `min_tokens`' stop tokens
# before custom processors, and the log-softmax would then renormalise without
# the stop token's probability, which reorders penalised tokens.
BEAM_ARG = "repetition_penalty_hf_beam"

# The original recipe's value (FireRedASR examples/inference_fireredasr_llm.sh).
RECIPE_PENALTY = 3.0


def apply_hf_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty on rows of logits; returns a new tensor.

    `logits` [rows, vocab]; `seen` [rows, vocab] bool, True where the row's
    request has generated that token; `penalty` a Python float. A seen token's
    logit becomes `logit * penalty` when negative and `logit / penalty`
    otherwise; every other logit is returned unchanged. The penalty stays a
    Python scalar, as in transformers, so each device rounds exactly as
    transformers' `RepetitionPenaltyLogitsProcessor` does there.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def penalty_from_params(params: SamplingParams) -> float | None:
    """The request's penalty from `extra_args`, or None when it asks for none (absent or 1.0).

    Raises ValueError, naming the argument and the fix, for a value that is not
    a finite number above 0, and for a request that also sets vLLM's own
    `repetition_penalty` (the two would compound).
    """
    extra = params.extra_args
    if not extra or REQUEST_ARG not in extra:
        return None
    value = extra[REQUEST_ARG]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{REQUEST_ARG} must be a finite number greater than 0 ({RECIPE_PENALTY} is "
            f"FireRedASR-LLM's recipe, 1.0 turns it off), got {value!r}. Pass a number, e.g. "
            f'SamplingParams(extra_args={{"{REQUEST_ARG}": {RECIPE_PENALTY}}}) or '
            f'"vllm_xargs": {{"{REQUEST_ARG}": {RECIPE_PENALTY}}}.'
        )
    penalty = float(value)
    if penalty == 1.0:
        return None
    if params.repetition_penalty != 1.0:
        raise ValueError(
            f"{REQUEST_ARG}={penalty} and repetition_penalty={params.repetition_penalty} "
            f"are both set; they would compound. Keep {REQUEST_ARG} (generated tokens only, "
            "as FireRedASR-LLM's original decoding) and leave repetition_penalty at 1.0, "
            "or drop it and use vLLM's repetition_penalty (which also counts the prompt)."
        )
    return penalty


def prior_tokens_from_params(params: SamplingParams) -> list[int]:
    """The request's `PRIOR_TOKENS_ARG` (empty when absent); ValueError naming the fix for anything but a list of token ids."""
    value = (params.extra_args or {}).get(PRIOR_TOKENS_ARG, [])
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in value
    ):
        raise ValueError(
            f"{PRIOR_TOKENS_ARG} must be a list of token ids (integers >= 0) generated before this "
            f"request, got {value!r}"
        )
    return list(value)


def beam_stops_from_params(params: SamplingParams) -> list[int] | None:
    """The stop tokens a beam request (`BEAM_ARG` true) excludes; None for other requests.

    ValueError for a `BEAM_ARG` other than true or false.
    """
    value = (params.extra_args or {}).get(BEAM_ARG, False)
    if not isinstance(value, bool):
        raise ValueError(f"{BEAM_ARG} must be true or false, got {value!r}")
    return sorted(params.all_stop_token_ids) if value else None


def _penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float, beam_stops: list[list[int]] | None) -> torch.Tensor:
    """The penalty on the rows' logits; for beam requests on their log-probabilities, then each row's stop tokens excluded."""
    if beam_stops is None:
        return apply_hf_repetition_penalty(logits, seen, penalty)
    values = apply_hf_repetition_penalty(torch.log_softmax(logits, dim=-1), seen, penalty)
    rows = [row for row, stops in enumerate(beam_stops) for token in stops if token < values.shape[-1]]
    cols = [token for stops in beam_stops for token in stops if token < values.shape[-1]]
    if rows:
        device = values.device
        values[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = -math.inf
    return values


def _refuse_speculative_decoding(vllm_config: Any) -> None:
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError(
            f"The {REQUEST_ARG} logits processor does not support speculative decoding; "
            "start vLLM without a speculative config or without this logits processor."
        )


class _History:
    """One V1 request: its penalty and the distinct tokens it has generated."""

    __slots__ = ("penalty", "beam_stops", "output_ids", "prior", "seen", "counted")

    def __init__(self, penalty: float, output_ids: list[int], prior: list[int], beam_stops: list[int] | None):
        self.penalty = penalty
        self.beam_stops = beam_stops
        # vLLM's live list of the request's output tokens: it grows in place.
        self.output_ids = output_ids
        self.prior = prior
        self.seen: set[int] = set(prior)
        self.counted = 0

    def refresh(self) -> set[int]:
        """Take in the tokens appended since the last call; returns the distinct tokens."""
        ids = self.output_ids
        if len(ids) < self.counted:
            # vLLM dropped tokens (a failed KV load): count the list again.
            self.seen = set(self.prior)
            self.counted = 0
        for token in ids[self.counted :]:
            if token < 0:
                # Async scheduling's placeholder for a token not copied back yet;
                # vLLM fills it in before the next sampling step.
                break
            self.seen.add(token)
            self.counted += 1
        return self.seen


if HAS_V1_RUNNER:
    # Defined only where vLLM still has the V1 runner, whose base class it needs.

    class HFRepetitionPenaltyV1(V1LogitsProcessor):
        """The penalty for vLLM's V1 model runner.

        Per-request state lives in a dict keyed by the request's row in the
        persistent batch, kept in step with vLLM's `BatchUpdate`s (removed, then
        added, then moved). Each entry holds a reference to vLLM's running list of
        the request's output tokens, so `apply` sees the tokens generated up to this
        step; the distinct ones are collected incrementally.
        """

        @classmethod
        def validate_params(cls, sampling_params: SamplingParams) -> None:
            penalty_from_params(sampling_params)
            prior_tokens_from_params(sampling_params)
            beam_stops_from_params(sampling_params)

        def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
            self.device = device
            self.requests: dict[int, _History] = {}

        def is_argmax_invariant(self) -> bool:
            # Lowering a generated token's logit can change the greedy choice.
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.requests.pop(index, None)
            for index, params, _prompt_ids, output_ids in batch_update.added:
                penalty = penalty_from_params(params)
                if penalty is None:
                    # The row may have held another request.
                    self.requests.pop(index, None)
                else:
                    self.requests[index] = _History(
                        penalty, output_ids, prior_tokens_from_params(params), beam_stops_from_params(params)
                    )
            for source, target, direction in batch_update.moved:
                moving = self.requests.pop(source, None)
                displaced = self.requests.pop(target, None)
                if moving is not None:
                    self.requests[target] = moving
                if direction == MoveDirectionality.SWAP and displaced is not None:
                    self.requests[source] = displaced

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.requests:
                return logits
            vocab, device = logits.shape[-1], logits.device
            by_setting: dict[tuple[float, bool], list[tuple[int, _History]]] = {}
            for index, history in self.requests.items():
                tokens = history.refresh()
                # A row with nothing to penalise is left alone, unless it extends a beam.
                beam = history.beam_stops is not None
                if tokens or beam:
                    by_setting.setdefault((history.penalty, beam), []).append((index, history))
            for (penalty, beam), group in by_setting.items():
                rows: list[int] = []
                cols: list[int] = []
                for local, (_, history) in enumerate(group):
                    valid = [t for t in history.seen if t < vocab]
                    rows.extend([local] * len(valid))
                    cols.extend(valid)
                seen = torch.zeros(len(group), vocab, dtype=torch.bool, device=device)
                row_index = torch.tensor(rows, dtype=torch.long, device=device)
                token_index = torch.tensor(cols, dtype=torch.long, device=device)
                seen[row_index, token_index] = True
                batch_rows = torch.tensor([index for index, _ in group], dtype=torch.long, device=device)
                beam_stops = [history.beam_stops for _, history in group] if beam else None
                logits[batch_rows] = _penalised(logits[batch_rows], seen, penalty, beam_stops)
            return logits


class HFRepetitionPenaltyV2(V2LogitsProcessor):
    """The penalty for vLLM's Model Runner V2.

    V2 keys requests by slot (recycled, and `add_request` is the only notice
    of a new occupant) and exposes the committed tokens of every slot on the
    device: `all_token_ids[slot, prompt_len:total_len]` are the generated ones.
    This class keeps a device bool mask `seen[slot, token]`:

    - `add_request` records the slot's penalty on the host (1.0: none);
    - `apply_staged_writes` clears the mask row of each new occupant and marks
      the output tokens it arrives with (`prompt_len:prefill_len`, non-empty
      when a preempted request resumes);
    - `apply` first marks the token committed at `total_len - 1` for each
      penalised request of the step (V2 writes each sampled token there after
      sampling, one per step without speculative decoding; marking is
      idempotent, and a position inside the prompt is skipped), then applies
      the penalty to those requests' rows. No host-device synchronisation.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        penalty_from_params(sampling_params)
        prior_tokens_from_params(sampling_params)
        beam_stops_from_params(sampling_params)

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        _refuse_speculative_decoding(vllm_config)
        self.req_states = req_states
        self.vocab_size = req_states.vocab_size
        self.penalty = np.ones(req_states.max_num_reqs, dtype=np.float64)
        self.beam = np.zeros(req_states.max_num_reqs, dtype=bool)
        # slot -> stop tokens, for slots whose request extends a beam.
        self.beam_stops: dict[int, list[int]] = {}
        # Allocated up front, so that vLLM's memory profiling sees it: 1 byte per
        # slot and vocabulary entry (a quarter of vLLM's own penalty counts).
        self.seen = torch.zeros(req_states.max_num_reqs, self.vocab_size, dtype=torch.bool, device=req_states.device)
        # Slots whose new occupant's mask row apply_staged_writes has still to fill,
        # with the occupant's prior tokens.
        self.pending: dict[int, list[int]] = {}

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        penalty = penalty_from_params(sampling_params)
        if penalty is None:
            self.penalty[req_idx] = 1.0
            self.pending.pop(req_idx, None)
            return False
        self.penalty[req_idx] = penalty
        beam_stops = beam_stops_from_params(sampling_params)
        self.beam[req_idx] = beam_stops is not None
        self.beam_stops[req_idx] = beam_stops or []
        self.pending[req_idx] = prior_tokens_from_params(sampling_params)
        return True

    def apply_staged_writes(self) -> None:
        if not self.pending:
            return
        tokens_by_slot = self.req_states.all_token_ids.gpu
        for slot, prior in self.pending.items():
            self.seen[slot].zero_()
            prior = [token for token in prior if token < self.vocab_size]
            if prior:
                self.seen[slot, torch.tensor(prior, dtype=torch.long, device=self.seen.device)] = True
            start = int(self.req_states.prompt_len.np[slot])
            end = int(self.req_states.prefill_len.np[slot])
            if end > start:
                tokens = tokens_by_slot[slot, start:end].long()
                tokens = tokens[(tokens >= 0) & (tokens < self.vocab_size)]
                self.seen[slot, tokens] = True
        self.pending.clear()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        slots_np = ctx.idx_mapping_np
        penalties = self.penalty[slots_np]
        rows_np = np.flatnonzero(penalties != 1.0)
        if rows_np.size == 0:
            return logits
        if logits.shape[0] != slots_np.shape[0]:
            raise RuntimeError(
                f"The {REQUEST_ARG} logits processor expects one logits row per request "
                f"(got {logits.shape[0]} rows for {slots_np.shape[0]} requests)."
            )
        device = logits.device
        rows = torch.from_numpy(rows_np).to(device, non_blocking=True)
        slots = ctx.idx_mapping.to(device)[rows].long()
        self._mark_last_committed(slots)
        vocab = logits.shape[-1]
        row_slots_np = slots_np[rows_np]
        row_settings = np.stack([penalties[rows_np], self.beam[row_slots_np]], axis=1)
        distinct = np.unique(row_settings, axis=0)
        for penalty, beam in distinct:
            chosen = np.flatnonzero((row_settings == (penalty, beam)).all(axis=1))
            if len(distinct) == 1:
                group_rows, group_slots = rows, slots
            else:
                members = torch.from_numpy(chosen).to(device, non_blocking=True)
                group_rows, group_slots = rows[members], slots[members]
            seen = self._fit(self.seen[group_slots], vocab)
            beam_stops = [self.beam_stops[int(slot)] for slot in row_slots_np[chosen]] if beam else None
            logits[group_rows] = _penalised(logits[group_rows], seen, float(penalty), beam_stops)
        return logits

    def _mark_last_committed(self, slots: torch.Tensor) -> None:
        states = self.req_states
        total = states.total_len.gpu[slots].long()
        prompt = states.prompt_len.gpu[slots].long()
        last = states.all_token_ids.gpu[slots, (total - 1).clamp(min=0)].long()
        generated = (total > prompt) & (last >= 0) & (last < self.vocab_size)
        last = last.clamp(0, self.vocab_size - 1)
        self.seen[slots, last] = self.seen[slots, last] | generated

    @staticmethod
    def _fit(seen: torch.Tensor, vocab: int) -> torch.Tensor:
        """The mask cut or padded to the logits' width."""
        width = seen.shape[-1]
        if width == vocab:
            return seen
        if width > vocab:
            return seen[:, :vocab]
        return torch.nn.functional.pad(seen, (0, vocab - width), value=False)


# Both runners' base classes where both runners exist, so either loader accepts it.
_RUNNER_BASES = (V1LogitsProcessor, V2LogitsProcessor) if HAS_V1_RUNNER else (V2LogitsProcessor,)


class HFRepetitionPenalty(*_RUNNER_BASES):
    """The penalty for whichever model runner loads it.

    Where vLLM has both runners (0.32, 0.33) it subclasses both base classes,
    so both loaders accept it; from 0.34 on, only V2's. The V1 runner
    constructs it as `(vllm_config, device, is_pin_memory)` and V2 as
    `(vllm_config, req_states)`; the constructor builds the matching class and
    every call goes to it.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        penalty_from_params(sampling_params)
        prior_tokens_from_params(sampling_params)
        beam_stops_from_params(sampling_params)

    def __init__(self, vllm_config: VllmConfig, *args: Any) -> None:
        if len(args) == 2 and HAS_V1_RUNNER:
            self._impl: HFRepetitionPenaltyV1 | HFRepetitionPenaltyV2 = HFRepetitionPenaltyV1(vllm_config, *args)
        elif len(args) == 1:
            self._impl = HFRepetitionPenaltyV2(vllm_config, *args)
        else:
            expected = "(vllm_config, device, is_pin_memory) from vLLM's V1 model runner or " if HAS_V1_RUNNER else ""
            raise TypeError(f"HFRepetitionPenalty takes {expected}(vllm_config, req_states) from Model Runner V2")

    @property
    def runner(self) -> str:
        """"V1" or "V2": the runner that constructed this instance."""
        return "V2" if isinstance(self._impl, HFRepetitionPenaltyV2) else "V1"

    # V1 runner
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._impl.update_state(batch_update)  # type: ignore[union-attr]

    # Model Runner V2
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        return self._impl.add_request(req_idx, sampling_params)  # type: ignore[union-attr]

    def apply_staged_writes(self) -> None:
        self._impl.apply_staged_writes()  # type: ignore[union-attr]

    # Both
    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:  # type: ignore[override]
        if ctx is None:
            return self._impl.apply(logits)  # type: ignore[call-arg]
        return self._impl.apply(logits, ctx)  # type: ignore[call-arg]


def uses_v2_model_runner(vllm_config: VllmConfig | None = None) -> bool:
    """Whether vLLM runs (or, without a config, will most likely run) Model Runner V2.

    Always True from vLLM 0.34 on (V1 is gone). Before that, with a config this
    is vLLM's own decision (`VllmConfig.use_v2_model_runner`); without one,
    `VLLM_USE_V2_MODEL_RUNNER` when set, else whether vLLM has a working Triton
    (V2's requirement; False on the CPU backend). That guess cannot see the
    configuration-dependent fallbacks to V1 (some speculative decoding methods,
    pipeline parallelism with external_launcher, micro-batching), which is what
    `HFRepetitionPenalty` is for.
    """
    if not HAS_V1_RUNNER:
        return True
    if vllm_config is not None:
        return bool(vllm_config.use_v2_model_runner)
    import vllm.envs as envs
    from vllm.triton_utils import HAS_TRITON

    if envs.VLLM_USE_V2_MODEL_RUNNER is not None:
        return envs.VLLM_USE_V2_MODEL_RUNNER

    return bool(HAS_TRITON)


def processor_class(vllm_config: VllmConfig | None = None) -> type[HFRepetitionPenaltyV1 | HFRepetitionPenaltyV2]:
    """The runner-specific class for `vllm_config` (see `uses_v2_model_runner`)."""
    return HFRepetitionPenaltyV2 if uses_v2_model_runner(vllm_config) else HFRepetitionPenaltyV1
