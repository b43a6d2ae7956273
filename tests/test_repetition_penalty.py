"""The Hugging Face repetition penalty as vLLM logits processors (no engine).

- The shared arithmetic equals transformers' `RepetitionPenaltyLogitsProcessor`
  given the generated tokens as `input_ids`, bit for bit.
- The V1 class follows the persistent batch through vLLM's own
  `BatchUpdateBuilder` (requests added with and without the argument, removed,
  condensed, swapped, rows reused) while output tokens grow between steps.
- The V2 class is driven as Model Runner V2 drives it: a real `RequestState`
  (on the CPU, with the CPU runner's buffers), `add_request`, the runner's
  flush, `apply_staged_writes`, `apply(logits, LogitsContext)`, then the sampled
  token written at `total_len`; slots recycled without notice, chunked prefill
  and a resumed (preempted) request.
- A request may carry tokens generated before it (`PRIOR_TOKENS_ARG`, beam
  search's continued beams): both classes penalise them with its own. A beam's
  request (`BEAM_ARG`) is penalised on log-probabilities (as transformers' beam
  search applies it), then its stop tokens are excluded.
- Bad values are refused with a message naming the argument, also through
  vLLM's frontend validators; each runner's loader accepts the right classes.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcRequestState,
    build_custom_logits_processors_params_validator,
)
from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns as v2_load

from fireredasr_vllm import repetition_penalty as rp
from fireredasr_vllm.repetition_penalty import (
    BEAM_ARG,
    HAS_V1_RUNNER,
    PRIOR_TOKENS_ARG,
    REQUEST_ARG,
    HFRepetitionPenalty,
    HFRepetitionPenaltyV2,
    apply_hf_repetition_penalty,
    beam_stops_from_params,
    penalty_from_params,
    prior_tokens_from_params,
    processor_class,
)

if HAS_V1_RUNNER:
    # vLLM 0.32 and 0.33 only: 0.34 deleted Model Runner V1 and these modules with it.
    from vllm.v1.sample.logits_processor import BatchUpdateBuilder, MoveDirectionality
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns as v1_load
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters as v1_validate

    from fireredasr_vllm.repetition_penalty import HFRepetitionPenaltyV1

needs_v1_runner = pytest.mark.skipif(not HAS_V1_RUNNER, reason="this vLLM has no V1 model runner (removed in 0.34)")
# The classes a runner of this vLLM can load (V1's only where V1 exists).
ALL_CLASSES = (HFRepetitionPenaltyV1, HFRepetitionPenaltyV2, HFRepetitionPenalty) if HAS_V1_RUNNER else (
    HFRepetitionPenaltyV2, HFRepetitionPenalty)  # fmt: skip

VOCAB = 40
CPU = torch.device("cpu")
FQCN = "fireredasr_vllm.repetition_penalty:HFRepetitionPenalty"


def params(penalty=None, prior=None, beam=None, **kwargs) -> SamplingParams:
    extra = None if penalty is None else {REQUEST_ARG: penalty}
    if prior is not None:
        extra = {**(extra or {}), PRIOR_TOKENS_ARG: prior}
    if beam is not None:
        extra = {**(extra or {}), BEAM_ARG: beam}
    return SamplingParams(temperature=0.0, extra_args=extra, **kwargs)


def hf_expected(row: torch.Tensor, generated: list[int], penalty: float | None, beam_stops=None) -> torch.Tensor:
    """transformers' processor on one row, the generated tokens as input_ids (the original's setting).

    `beam_stops` (a beam's request): on the row's log-softmax, as transformers'
    beam search applies it, then those stop tokens excluded.
    """
    if penalty is None:
        return row.clone()
    if beam_stops is not None:
        row = torch.log_softmax(row, dim=-1)
    input_ids = torch.tensor([generated], dtype=torch.long).reshape(1, len(generated))
    expected = RepetitionPenaltyLogitsProcessor(float(penalty))(input_ids, row[None].clone())[0]
    if beam_stops:
        expected[beam_stops] = -math.inf
    return expected


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    same = actual.view(torch.int32) == expected.view(torch.int32)
    assert bool(same.all()), f"differs at {same.logical_not().nonzero().tolist()[:5]}"


def random_logits(rows: int, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(rows, VOCAB, generator=gen) * 6
    logits[:, 0] = 0.0  # neither negative nor positive: divided, stays 0
    logits[:, 1] = -math.inf  # a token masked by an earlier stage stays masked
    return logits


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("penalty", [3.0, 1.1, 0.7, 2.0])
def test_arithmetic_equals_transformers(penalty):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(1)
    logits = random_logits(6, gen)
    # Histories with repeats (tokens 0 and 1 included), one empty (the first step).
    histories = [[rng.randrange(VOCAB) for _ in range(n)] for n in (12, 30, 1, 0, 7, 25)]
    histories[0] += [0, 1, histories[0][0], histories[0][0]]
    seen = torch.zeros(6, VOCAB, dtype=torch.bool)
    for row, history in enumerate(histories):
        seen[row, history] = True

    actual = apply_hf_repetition_penalty(logits, seen, penalty)

    for row, history in enumerate(histories):
        assert_bitwise_equal(actual[row], hf_expected(logits[row], history, penalty))
    assert_bitwise_equal(actual[3], logits[3])  # nothing generated yet: untouched
    # Penalised entries really changed (the test would not notice a no-op otherwise).
    changed = (actual != logits) & seen & torch.isfinite(logits) & (logits != 0)
    assert changed.sum() == (seen & torch.isfinite(logits) & (logits != 0)).sum() > 0


# --------------------------------------------------------------------------- V1 runner


class V1Batch:
    """vLLM's V1 persistent batch, as far as logits processors see it (gpu_input_batch.InputBatch)."""

    def __init__(self, processor):
        self.processor = processor
        self.builder = BatchUpdateBuilder()
        self.rows: list[str | None] = []
        self.requests: dict[str, tuple[float | None, list[int], list[int], list[int] | None]] = {}

    def add(self, req_id: str, sampling_params: SamplingParams, outputs: list[int] | None = None) -> None:
        outputs = [] if outputs is None else outputs
        prior = prior_tokens_from_params(sampling_params)
        beam_stops = beam_stops_from_params(sampling_params)
        self.requests[req_id] = (penalty_from_params(sampling_params), outputs, prior, beam_stops)
        index = self.builder.pop_removed()
        if index is None:
            index = len(self.rows)
            self.rows.append(req_id)
        else:
            self.rows[index] = req_id
        self.builder.added.append((index, sampling_params, [7, 8, 9], outputs))

    def remove(self, req_id: str) -> None:
        index = self.rows.index(req_id)
        self.rows[index] = None
        del self.requests[req_id]
        self.builder.removed_append(index)

    def condense(self) -> None:
        """Fill holes with the last requests (one-way moves), as InputBatch.condense does."""
        while True:
            while self.rows and self.rows[-1] is None:
                self.rows.pop()
            hole = self.builder.peek_removed()
            if hole is None or hole >= len(self.rows):
                break  # holes past the last request stay in `removed`
            self.builder.pop_removed()
            last = len(self.rows) - 1
            self.rows[hole] = self.rows.pop()
            self.builder.moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))

    def swap(self, i: int, j: int) -> None:
        self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        self.builder.moved.append((i, j, MoveDirectionality.SWAP))

    def step(self, gen: torch.Generator) -> None:
        """update_state, apply; then check every row against transformers on its own history."""
        self.processor.update_state(self.builder.get_and_reset(len(self.rows)))
        logits = random_logits(len(self.rows), gen)
        actual = self.processor.apply(logits.clone())
        for row, req_id in enumerate(self.rows):
            penalty, outputs, prior, beam_stops = self.requests[req_id]
            generated = prior + [t for t in outputs if t >= 0]
            expected = hf_expected(logits[row], generated, penalty, beam_stops)
            assert_bitwise_equal(actual[row], expected)
            if penalty is not None and any(t > 1 for t in generated):  # 0 and 1: logits 0, -inf
                assert not torch.equal(actual[row], logits[row])

    def generate(self, rng: random.Random) -> None:
        """Every request gets one more output token (often a repeat), in vLLM's live lists."""
        for req_id in self.rows:
            outputs = self.requests[req_id][1]
            token = rng.choice(outputs) if outputs and rng.random() < 0.5 else rng.randrange(VOCAB)
            outputs.append(token)


def v1_processor(kind):
    return kind(None, CPU, False)


@needs_v1_runner
@pytest.mark.parametrize("kind", ["HFRepetitionPenaltyV1", "HFRepetitionPenalty"])
def test_v1_batch_bookkeeping(kind):
    kind = getattr(rp, kind)
    gen = torch.Generator().manual_seed(2)
    rng = random.Random(3)
    batch = V1Batch(v1_processor(kind))

    batch.add("a", params(3.0))
    batch.add("b", params())  # no argument
    batch.add("c", params(1.1))
    batch.add("d", params(1.0))  # 1.0: the same as no argument
    batch.add("e", params(3.0), outputs=[5, 5, 9])  # resumed after preemption: tokens already
    batch.step(gen)
    for _ in range(3):  # no batch change: update_state(None), tokens keep growing
        batch.generate(rng)
        batch.step(gen)

    batch.remove("b")
    batch.add("f", params(2.0))  # takes b's row
    batch.generate(rng)
    batch.step(gen)

    batch.remove("a")
    batch.condense()  # e (last) moves down into a's row
    batch.generate(rng)
    batch.step(gen)
    assert batch.rows[0] == "e"
    batch.add("h", params(3.0, prior=[5, 21, 21, 38]))  # continues a generation: penalised from the start
    batch.add("i", params(3.0, prior=[7, 30], beam=True, stop_token_ids=[3, 30]))  # a beam: log-probabilities, stops out
    batch.add("j", params(3.0, beam=True, stop_token_ids=[9]))  # nothing to penalise yet: log-probabilities all the same
    batch.step(gen)

    batch.swap(0, 2)
    batch.generate(rng)
    batch.step(gen)

    # A row vacated by a penalised request is taken by one without the argument.
    penalised_row = batch.rows.index("c")
    batch.remove("c")
    batch.add("g", params())
    assert batch.rows[penalised_row] == "g"
    batch.generate(rng)
    batch.step(gen)

    # Async scheduling: a placeholder (-1) for a token not copied back yet is not a token,
    # and is counted once vLLM fills it in.
    f_outputs = batch.requests["f"][1]
    f_outputs.append(-1)
    batch.step(gen)
    f_outputs[-1] = 33
    batch.step(gen)

    # Removing everything penalised: apply returns the very tensor, untouched.
    for req_id in ("e", "f", "h", "i", "j"):
        batch.remove(req_id)
    batch.condense()
    batch.processor.update_state(batch.builder.get_and_reset(len(batch.rows)))
    logits = random_logits(len(batch.rows), gen)
    before = logits.clone()
    assert batch.processor.apply(logits) is logits
    assert_bitwise_equal(logits, before)


@needs_v1_runner
def test_v1_requests_without_argument_cost_nothing():
    processor = HFRepetitionPenaltyV1(None, CPU, False)
    builder = BatchUpdateBuilder()
    builder.added.append((0, params(), None, [1, 2, 3]))
    builder.added.append((1, params(1.0), None, [4, 4]))
    processor.update_state(builder.get_and_reset(2))
    assert processor.requests == {}
    logits = random_logits(2, torch.Generator().manual_seed(4))
    assert processor.apply(logits) is logits
    assert processor.is_argmax_invariant() is False


# --------------------------------------------------------------------------- Model Runner V2


@pytest.fixture
def v2_request_state(monkeypatch):
    """A real V2 RequestState on the CPU, with the buffers vLLM's CPU runner swaps in."""
    import vllm.v1.worker.cpu.buffer_utils as cpu_buffers
    import vllm.v1.worker.gpu.buffer_utils as gpu_buffers
    from vllm.v1.worker.gpu.states import RequestState

    monkeypatch.setattr(gpu_buffers, "UvaBuffer", cpu_buffers.UvaBuffer)
    return RequestState(
        max_num_reqs=4,
        max_model_len=64,
        max_num_batched_tokens=128,
        num_speculative_steps=0,
        vocab_size=VOCAB,
        device=CPU,
    )


class V2Runner:
    """What Model Runner V2 does around a custom logits processor (model_runner.py, sampler.py)."""

    def __init__(self, req_states, processor):
        self.req_states = req_states
        self.processor = processor
        self.prompts: dict[str, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.penalties: dict[str, float | None] = {}
        self.prior: dict[str, list[int]] = {}
        self.beam_stops: dict[str, list[int] | None] = {}

    def slot(self, req_id: str) -> int:
        return self.req_states.req_id_to_index[req_id]

    def add(self, req_id: str, prompt: list[int], sampling_params: SamplingParams, outputs=()) -> None:
        tokens = list(prompt) + list(outputs)
        self.req_states.add_request(req_id, len(prompt), tokens, 0, 32)
        self.prompts[req_id], self.outputs[req_id] = list(prompt), list(outputs)
        self.prior[req_id] = prior_tokens_from_params(sampling_params)
        self.beam_stops[req_id] = beam_stops_from_params(sampling_params)
        self.penalties[req_id] = penalty_from_params(sampling_params)
        self.processor.add_request(self.slot(req_id), sampling_params)
        # RequestState.apply_staged_writes (its device writes need Triton): same result.
        slot = self.slot(req_id)
        self.req_states.all_token_ids.gpu[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        self.req_states.all_token_ids.gpu[slot, len(tokens) :] = 17  # the slot's old contents
        self.req_states.total_len.gpu[slot] = len(tokens)
        for staged in (self.req_states.all_token_ids, self.req_states.total_len, self.req_states.num_computed_tokens):
            staged.clear_staged_writes()
        self.req_states.prompt_len.copy_to_uva()
        self.req_states.prefill_len.copy_to_uva()
        self.processor.apply_staged_writes()

    def remove(self, req_id: str) -> None:
        # V2 frees the slot; logits processors are not told.
        self.req_states.remove_request(req_id)

    def step(self, req_ids: list[str], gen: torch.Generator, rng: random.Random, prefilling=()) -> None:
        """One step: apply on the batch, check each row, then commit one token per finished prefill."""
        self.processor.apply_staged_writes()  # the runner calls it every step
        slots = np.array([self.slot(r) for r in req_ids], dtype=np.int32)
        idx = torch.from_numpy(slots)
        totals = self.req_states.total_len.gpu[idx]
        ctx = LogitsContext(
            expanded_idx_mapping=idx,
            idx_mapping=idx,
            idx_mapping_np=slots,
            expanded_local_pos=torch.zeros(len(req_ids), dtype=torch.int32),
            input_ids=self.req_states.all_token_ids.gpu[idx.long(), (totals - 1).long()],
            pos=(totals - 1).long(),
            seq_lens_upper_bound_np=totals.numpy().copy(),
        )
        logits = random_logits(len(req_ids), gen)
        actual = self.processor.apply(logits.clone(), ctx)
        for row, req_id in enumerate(req_ids):
            generated = self.prior[req_id] + self.outputs[req_id]
            expected = hf_expected(logits[row], generated, self.penalties[req_id], self.beam_stops[req_id])
            assert_bitwise_equal(actual[row], expected)
        # post_update: each request that finished prefilling samples one token,
        # written at total_len; total_len grows by one.
        for req_id in req_ids:
            if req_id in prefilling:
                continue
            outputs = self.outputs[req_id]
            token = rng.choice(outputs) if outputs and rng.random() < 0.5 else rng.randrange(VOCAB)
            slot = self.slot(req_id)
            total = int(self.req_states.total_len.gpu[slot])
            self.req_states.all_token_ids.gpu[slot, total] = token
            self.req_states.total_len.gpu[slot] = total + 1
            outputs.append(token)


@pytest.mark.parametrize("kind", [HFRepetitionPenaltyV2, HFRepetitionPenalty])
def test_v2_runner_bookkeeping(kind, v2_request_state):
    gen = torch.Generator().manual_seed(5)
    rng = random.Random(6)
    state = LogitsProcRequestState.from_request_state(v2_request_state)
    processor = kind(SimpleNamespace(speculative_config=None), state)
    if kind is HFRepetitionPenalty:
        assert processor.runner == "V2"
    runner = V2Runner(v2_request_state, processor)
    # Prompt tokens (the stop token among them) are never penalised.
    prompt = [3, 4, 5, 6, 7]

    runner.add("a", prompt, params(3.0))
    runner.add("b", prompt, params())
    runner.add("c", prompt, params(1.1))
    for _ in range(4):
        runner.step(["a", "b", "c"], gen, rng)
    runner.step(["c", "a"], gen, rng)  # batch order changes every step; b not scheduled

    # a finishes; its slot is reused by a request without the argument, then c's by one with it.
    slot_a = runner.slot("a")
    runner.remove("a")
    runner.add("d", prompt, params())
    assert runner.slot("d") == slot_a
    slot_c = runner.slot("c")
    runner.remove("c")
    runner.add("e", [9] * 20, params(3.0))  # long prompt: prefilled in two chunks
    assert runner.slot("e") == slot_c
    runner.step(["b", "d", "e"], gen, rng, prefilling=("e",))  # e's first chunk: nothing sampled
    for _ in range(3):
        runner.step(["e", "b", "d"], gen, rng)

    # b is preempted and comes back in another slot with its outputs in the prefill;
    # f has tokens in its prefill too, and tokens generated before it (a continued beam).
    b_outputs = runner.outputs["b"]
    runner.remove("b")
    runner.add("f", prompt, params(2.0, prior=[13, 11, 30]), outputs=[11, 11, 12])
    runner.add("b", prompt, params(), outputs=b_outputs)
    for _ in range(3):
        runner.step(["f", "e", "d", "b"], gen, rng)
    assert len(runner.outputs["e"]) == 6 and len(runner.outputs["f"]) == 6
    # A slot's next occupant does not inherit the prior tokens.
    slot_f = runner.slot("f")
    runner.remove("f")
    runner.add("g", prompt, params(3.0))
    assert runner.slot("g") == slot_f
    runner.step(["g", "e"], gen, rng)
    # Beams' requests (penalty on log-probabilities) beside ones on logits, same penalty.
    runner.remove("g")
    runner.add("h", prompt, params(3.0, prior=[21, 4], beam=True, stop_token_ids=[4, 6]))
    assert runner.slot("h") == slot_f
    for _ in range(2):
        runner.step(["e", "h", "d"], gen, rng)

    # No penalised request scheduled: apply hands back the very tensor.
    ctx_slots = np.array([runner.slot("d"), runner.slot("b")], dtype=np.int32)
    idx = torch.from_numpy(ctx_slots)
    ctx = LogitsContext(idx, idx, ctx_slots, torch.zeros(2, dtype=torch.int32), idx, idx, ctx_slots)
    logits = random_logits(2, gen)
    assert processor.apply(logits, ctx) is logits


def test_v2_add_request_reports_whether_it_acts(v2_request_state):
    processor = HFRepetitionPenaltyV2(
        SimpleNamespace(speculative_config=None), LogitsProcRequestState.from_request_state(v2_request_state)
    )
    assert processor.add_request(0, params(3.0)) is True
    assert processor.add_request(1, params()) is False
    assert processor.add_request(2, params(1.0)) is False
    # The slot's next occupant without the argument turns it off again.
    assert processor.add_request(0, params()) is False
    assert not processor.pending


def test_v2_refuses_speculative_decoding(v2_request_state):
    state = LogitsProcRequestState.from_request_state(v2_request_state)
    with pytest.raises(ValueError, match="speculative decoding"):
        HFRepetitionPenaltyV2(SimpleNamespace(speculative_config=object()), state)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("value", [0, 0.0, -3.0, math.nan, math.inf, "3.0", True, None, [3.0]])
def test_bad_values_are_refused(value):
    sampling_params = SamplingParams(extra_args={REQUEST_ARG: value})
    with pytest.raises(ValueError, match=rf"{REQUEST_ARG} must be a finite number greater than 0") as err:
        penalty_from_params(sampling_params)
    assert repr(value) in str(err.value) and "extra_args" in str(err.value)
    for kind in ALL_CLASSES:
        with pytest.raises(ValueError, match=REQUEST_ARG):
            kind.validate_params(sampling_params)


@pytest.mark.parametrize("value", [3, [1, -2], [1.0, 2], ["7"], [True], {"a": 1}])
def test_bad_prior_tokens_are_refused(value):
    sampling_params = params(3.0, prior=value)
    with pytest.raises(ValueError, match=rf"{PRIOR_TOKENS_ARG} must be a list of token ids") as err:
        prior_tokens_from_params(sampling_params)
    assert repr(value) in str(err.value)
    for kind in ALL_CLASSES:
        with pytest.raises(ValueError, match=PRIOR_TOKENS_ARG):
            kind.validate_params(sampling_params)


@pytest.mark.parametrize("value", [1, "true", 0.0])
def test_beam_must_be_a_boolean(value):
    sampling_params = params(3.0, beam=value)
    for kind in ALL_CLASSES:
        with pytest.raises(ValueError, match=rf"{BEAM_ARG} must be true or false, got {value!r}"):
            kind.validate_params(sampling_params)


def test_compounding_with_vllm_penalty_is_refused():
    with pytest.raises(ValueError, match=r"both set.*leave repetition_penalty at 1\.0"):
        penalty_from_params(params(3.0, repetition_penalty=1.2))
    assert penalty_from_params(params(1.0, repetition_penalty=1.2)) is None


def test_good_values():
    assert penalty_from_params(SamplingParams()) is None
    assert penalty_from_params(SamplingParams(extra_args={"other": 1})) is None
    assert penalty_from_params(params(1.0)) is None
    assert penalty_from_params(params(3)) == 3.0 and isinstance(penalty_from_params(params(3)), float)
    assert penalty_from_params(params(0.5)) == 0.5  # below 1 rewards repeats, as in transformers


def test_frontend_validators_refuse_bad_values_with_http_400_errors():
    """Both runners' request-admission checks load the class and turn our ValueError into VLLMValidationError."""
    bad = SamplingParams(extra_args={REQUEST_ARG: -1})
    v2_check = build_custom_logits_processors_params_validator([FQCN])
    v2_check(params(3.0))
    with pytest.raises(VLLMValidationError, match=REQUEST_ARG):
        v2_check(bad)
    if HAS_V1_RUNNER:
        v1_validate([FQCN], params(3.0))
        with pytest.raises(VLLMValidationError, match=REQUEST_ARG):
            v1_validate([FQCN], bad)


# --------------------------------------------------------------------------- picking the class


def test_v2_loader_accepts_the_processor():
    """What `--logits-processors` / `LLM(logits_processors=...)` resolve to under Model Runner V2, in every vLLM."""
    assert v2_load([FQCN]) == [HFRepetitionPenalty]
    assert v2_load([HFRepetitionPenaltyV2]) == [HFRepetitionPenaltyV2]


@needs_v1_runner
def test_each_runner_loads_the_right_classes():
    assert v1_load([FQCN]) == [HFRepetitionPenalty] == v2_load([FQCN])
    assert v1_load([HFRepetitionPenaltyV1]) == [HFRepetitionPenaltyV1]
    with pytest.raises(ValueError, match="not a subclass"):
        v2_load([HFRepetitionPenaltyV1])
    with pytest.raises(ValueError, match="not a subclass"):
        v1_load([HFRepetitionPenaltyV2])


@needs_v1_runner
def test_combined_class_dispatches_on_the_constructor_arguments():
    v1 = HFRepetitionPenalty(None, CPU, False)
    assert v1.runner == "V1" and v1.is_argmax_invariant() is False
    with pytest.raises(TypeError, match="vllm_config, device, is_pin_memory"):
        HFRepetitionPenalty(None)


@pytest.mark.skipif(HAS_V1_RUNNER, reason="this vLLM still has the V1 model runner")
def test_without_v1_runner_everything_is_v2(v2_request_state):
    """vLLM 0.34+: no V1 base class, no V1 class, every configuration runs V2."""
    assert not hasattr(rp, "HFRepetitionPenaltyV1")
    assert HFRepetitionPenalty.__bases__ == (rp.V2LogitsProcessor,)
    combined = HFRepetitionPenalty(SimpleNamespace(speculative_config=None),
                                   LogitsProcRequestState.from_request_state(v2_request_state))  # fmt: skip
    assert combined.runner == "V2"
    with pytest.raises(TypeError, match=r"\(vllm_config, req_states\) from Model Runner V2$"):
        HFRepetitionPenalty(None, CPU, False)
    assert rp.uses_v2_model_runner() is True and processor_class() is HFRepetitionPenaltyV2
    assert processor_class(SimpleNamespace()) is HFRepetitionPenaltyV2  # 0.34's VllmConfig has no use_v2_model_runner


@needs_v1_runner
def test_processor_class(monkeypatch):
    assert processor_class(SimpleNamespace(use_v2_model_runner=True)) is HFRepetitionPenaltyV2
    assert processor_class(SimpleNamespace(use_v2_model_runner=False)) is HFRepetitionPenaltyV1
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert processor_class() is HFRepetitionPenaltyV2
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert processor_class() is HFRepetitionPenaltyV1
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    from vllm.triton_utils import HAS_TRITON

    assert processor_class() is (HFRepetitionPenaltyV2 if HAS_TRITON else HFRepetitionPenaltyV1)
    assert rp.uses_v2_model_runner() is bool(HAS_TRITON)
