"""The original's decoding recipe (beam 3, repetition penalty 3.0, length penalty 1.0) reproduced in vLLM.

Two parts:
- the beam bookkeeping (`fireredasr_vllm.beam_search`) without an engine: its
  rules one by one, and whole searches against transformers' own beam search
  and the reference's transformers-4.x beam search on a tiny random Qwen2;
- the plugin against the reference on the shipped demo model (fp32), which
  stops on `<|im_end|>` by itself, so some clips end on EOS before N and the
  finished-hypothesis and length-penalty rules are exercised: greedy + penalty
  and the recipe, token for token, batched and one clip at a time.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tolerances import F32_EPS
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from fireredasr_converter import spec
from fireredasr_vllm.beam_search import ClipBeamSearch, FinishedHypotheses, penalised_logprob
from fireredasr_vllm.decoding import GREEDY, ORIGINAL_RECIPE, Decoding
from fireredasr_vllm.offline import (
    Transcript,
    check_penalty_processor,
    transcriptions,
)
from fireredasr_vllm.reference import ReferenceFireRedAsrLlm

# --- the bookkeeping, no engine -------------------------------------------------


def test_decoding_recipe_and_validation():
    assert ORIGINAL_RECIPE == Decoding(beam_size=3, repetition_penalty=3.0, length_penalty=1.0, max_new_tokens=None)
    assert Decoding.original() == ORIGINAL_RECIPE
    assert GREEDY == Decoding(1, 1.0, 1.0, None)
    for bad in ({"beam_size": 0}, {"repetition_penalty": 0.0}, {"repetition_penalty": float("nan")}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Decoding(**bad)
    # The beam search bookkeeping takes the same checks.
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number above 0"):
        ClipBeamSearch(num_beams=3, max_new_tokens=5, eos_token_id=2, repetition_penalty=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        ClipBeamSearch(num_beams=3, max_new_tokens=0, eos_token_id=2)


def test_penalty_is_transformers_arithmetic_on_float32_logprobs():
    scores = torch.log_softmax(torch.randn(1, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    scores[0, 7] = 0.0  # a certain token: divided, not multiplied
    generated = torch.tensor([[3, 7, 3, 11]])
    expected = RepetitionPenaltyLogitsProcessor(penalty=3.0)(generated, scores.clone())
    for token in (3, 7, 11):
        assert penalised_logprob(scores[0, token].item(), 3.0) == expected[0, token].item()


def test_finished_hypotheses_keep_the_k_best_with_length_penalty():
    hyps = FinishedHypotheses(num_beams=2, length_penalty=1.0)
    hyps.add([1, 2], -3.0, 3)  # -1.0
    assert hyps.worst_score == -1.0
    hyps.add([4], -4.0, 2)  # -2.0: still fewer than K, kept
    assert len(hyps) == 2 and hyps.worst_score == -2.0
    hyps.add([5, 6, 7], -10.0, 4)  # -2.5: worse than the worst, not kept
    assert len(hyps) == 2 and sorted(h.score for h in hyps.items) == [-2.0, -1.0]
    hyps.add([8], -3.0, 2)  # -1.5 replaces -2.0
    assert sorted(h.score for h in hyps.items) == [-1.5, -1.0] and hyps.worst_score == -1.5
    assert hyps.best().token_ids == (1, 2)
    # length_penalty is the exponent of the generated length (EOS included by the caller).
    shorter = FinishedHypotheses(num_beams=1, length_penalty=2.0)
    shorter.add([1], -8.0, 2)
    assert shorter.best().score == -2.0


def test_is_done_uses_the_worst_kept_and_the_best_candidate_at_the_current_length():
    hyps = FinishedHypotheses(num_beams=2, length_penalty=1.0)
    hyps.add([1], -1.0, 2)
    assert not hyps.is_done(-100.0, 3)  # fewer than K hypotheses: never done
    hyps.add([2], -2.0, 2)  # worst -1.0
    assert hyps.is_done(-3.0, 3)  # -1.0 >= -1.0
    assert not hyps.is_done(-2.9, 3)  # -1.0 < -0.967


def scripted(steps, **kwargs) -> ClipBeamSearch:
    search = ClipBeamSearch(eos_token_id=0, **kwargs)
    for step in steps:
        if search.done:
            break
        search.advance(step)
    return search


def filler(*taken: int) -> dict[int, float]:
    # Unlikely tokens so every beam offers at least 2K candidates.
    return {t: -20.0 - t for t in range(90, 99) if t not in taken}


def test_eos_outside_the_top_k_candidates_is_dropped():
    # Step 0: EOS ranks third of 2K = 4 candidates: transformers drops it.
    step0 = [{5: -1.0, 6: -1.2, 0: -1.5, 7: -5.0, **filler()}]
    search = scripted([step0], num_beams=2, max_new_tokens=5)
    assert len(search.hypotheses) == 0
    assert [b.token_ids for b in search.beams] == [[5], [6]]


def test_search_goes_on_while_the_best_candidate_could_beat_the_worst_hypothesis():
    """4.x compares with the step's best candidate (an EOS one included); transformers 5 with the best running beam.

    After step 1 both hypotheses are kept (-0.55, -0.7) and the best running
    beam (-5.0 / 2) cannot beat them, but the best candidate (-1.1 / 2) could:
    4.x takes one more step, transformers 5 would stop here.
    """
    step0 = [{5: -1.0, 6: -1.2, 0: -3.0, 7: -5.0, **filler()}]
    step1 = [{0: -0.1, 8: -4.0, 9: -4.5, **filler()}, {0: -0.2, 8: -4.0, 9: -4.6, **filler()}]
    search = scripted([step0, step1], num_beams=2, max_new_tokens=10)
    # Float32 log-probabilities (each rounded, u = eps / 2), one float32 add, one division: < 2 eps.
    assert sorted(h.score for h in search.hypotheses.items) == pytest.approx([-0.7, -0.55], rel=2 * F32_EPS, abs=0)
    assert not search.done
    step2 = [{0: -0.01, 8: -3.0, **filler()}, {0: -0.01, 9: -3.0, **filler()}]
    search.advance(step2)
    assert search.done and search.step == 3
    assert search.result() == [5, 0]


def test_max_new_tokens_adds_the_running_beams_at_length_n():
    step0 = [{5: -1.0, 6: -1.2, 7: -5.0, **filler()}]
    step1 = [{8: -1.0, 0: -6.0, **filler()}, {9: -0.5, **filler()}]
    search = scripted([step0, step1], num_beams=2, max_new_tokens=2)
    assert search.done
    # [5, 8] = -2.0 / 2 beats [6, 9] = -1.7 / 2? No: -1.0 < -0.85, so [6, 9] wins; no EOS at length N.
    assert search.result() == [6, 9]


def test_repetition_penalty_lowers_the_beams_own_tokens():
    step0 = [{5: -1.0, 6: -2.0, **filler()}]
    # Beam [5] would repeat 5 (-0.5 * 3 = -1.5 after the penalty): 8 (-1.2) wins; beam [6] may take 5.
    step1 = [{5: -0.5, 8: -1.2, **filler()}, {5: -0.1, 8: -3.0, **filler()}]
    search = scripted([step0, step1], num_beams=2, max_new_tokens=2, repetition_penalty=3.0)
    assert search.result() == [6, 5]
    assert [b.token_ids for b in search.beams] == [[6, 5], [5, 8]]


def test_a_beam_short_of_candidates_is_refused():
    search = ClipBeamSearch(num_beams=3, max_new_tokens=4, eos_token_id=0, repetition_penalty=3.0)
    with pytest.raises(ValueError, match="max_logprobs"):
        search.advance([{1: -1.0, 2: -2.0}])


# Whole searches on a tiny random Qwen2 whose output layer is scaled so that <|im_end|>
# (here id 2) ends some hypotheses before N.
TINY_VOCAB, TINY_EOS, TINY_PAD = 48, 2, 0


def tiny_language_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[TINY_EOS] *= 1.0 + (seed % 4) * 0.5
    return model


def drive_with_full_recompute(model, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
    """ClipBeamSearch fed each running beam's top log-probabilities, as the engine feeds it."""
    search = ClipBeamSearch(
        num_beams=3, max_new_tokens=max_new_tokens, eos_token_id=TINY_EOS, repetition_penalty=3.0, length_penalty=1.0
    )
    embedding = model.get_input_embeddings()
    while not search.done:
        per_beam = []
        for beam in search.running():
            tokens = embedding(torch.tensor(beam.token_ids, dtype=torch.long))
            logprobs = torch.log_softmax(model(inputs_embeds=torch.cat([embeds, tokens])[None]).logits[0, -1].float(), -1)
            values, ids = logprobs.topk(search.logprobs_needed(beam))
            per_beam.append(dict(zip(ids.tolist(), values.tolist())))
        search.advance(per_beam)
    return search.result()


@torch.inference_mode()
def test_bookkeeping_matches_transformers_beam_search_on_a_tiny_model():
    """Against transformers' `generate` (installed: 5.x) and the reference's 4.x loop.

    These cases (and 16 more) were also run through transformers 4.46.3's
    own `generate` outside this repo (see docs/parity.md): identical ids.
    """
    reference = object.__new__(ReferenceFireRedAsrLlm)
    ended_on_eos, reached_n, changed_by_penalty = 0, 0, 0
    for seed in range(24):
        model = tiny_language_model(seed)
        embeds = torch.randn(5 + seed % 7, 32, generator=torch.Generator().manual_seed(1000 + seed))
        max_new_tokens = 4 + seed % 9
        expected = model.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            num_beams=3,
            do_sample=False,
            repetition_penalty=3.0,
            length_penalty=1.0,
            eos_token_id=TINY_EOS,
            pad_token_id=TINY_PAD,
        )[0].tolist()
        assert drive_with_full_recompute(model, embeds, max_new_tokens) == expected, seed
        without_penalty = model.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            num_beams=3,
            do_sample=False,
            eos_token_id=TINY_EOS,
            pad_token_id=TINY_PAD,
        )[0].tolist()
        changed_by_penalty += without_penalty != expected
        reference.language_model, reference.device, reference.eos_token_id = model, torch.device("cpu"), TINY_EOS
        assert reference._beam_search_4x(embeds, max_new_tokens, 3, 3.0, 1.0) == expected, seed
        if expected[-1] == TINY_EOS and len(expected) < max_new_tokens:
            ended_on_eos += 1
        elif len(expected) == max_new_tokens:
            reached_n += 1
    # Both endings are exercised, and the penalty decides some results.
    assert ended_on_eos >= 6 and reached_n >= 6 and changed_by_penalty >= 3


def test_a_penalty_needs_the_processor_in_the_engine():
    def engine_with(processors):
        config = SimpleNamespace(model_config=SimpleNamespace(logits_processors=processors))
        return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config))

    with pytest.raises(ValueError, match="logits_processors"):
        check_penalty_processor(engine_with(None))
    from fireredasr_vllm.repetition_penalty import HFRepetitionPenalty

    check_penalty_processor(engine_with([HFRepetitionPenalty]))
    check_penalty_processor(engine_with(["fireredasr_vllm.repetition_penalty:HFRepetitionPenalty"]))


# --- the plugin against the reference on the demo model ----------------------------


@pytest.fixture(scope="module")
def recipe_clips() -> dict[str, np.ndarray]:
    """12 held-out clips of different lengths, cuts short enough that N ends decoding, and clips said twice.

    A clip said twice makes the model repeat its digits, where the repetition
    penalty changes what beam search picks.
    """
    from fireredasr_vllm import demo
    from fireredasr_vllm.audio_input import load_audio

    clips = {uttid: load_audio(str(path)) for uttid, path, _ in demo.heldout_clips()[:12]}
    first = next(iter(clips.values()))
    for samples in (spec.min_samples_for_one_embedding(), 1520, 4000, 9000):
        clips[f"cut{samples}"] = first[:samples].copy()
    for uttid in list(clips)[:3]:
        clips[f"{uttid}-twice"] = np.concatenate([clips[uttid], clips[uttid]])
    assert len({len(clip) for clip in clips.values()}) >= 10
    return clips


@pytest.fixture(scope="module")
def llm(recipe_llm):
    """The suite's demo engine with the penalty processor, built by `create_engine` in this process."""
    return recipe_llm


@pytest.mark.vllm
def test_cpu_engine_core_runs_in_this_process(llm):
    from vllm.v1.engine.core_client import InprocClient

    assert isinstance(llm.llm_engine.engine_core, InprocClient)
    # Set only while the engine was built: engines the user starts later are not affected.
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ


@pytest.mark.vllm
def test_in_process_engine_does_not_log_a_warning_per_request(llm, recipe_clips):
    # vLLM's front end sets torch's thread count around each audio request; the CPU
    # worker that bound the threads in this process warns on every such call.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    worker_logger = logging.getLogger("vllm.v1.worker.cpu_worker")
    worker_logger.addHandler(handler)
    try:
        clips = list(recipe_clips.items())[:3]
        results = dict(transcriptions(llm, clips, GREEDY))
    finally:
        worker_logger.removeHandler(handler)
    assert all(isinstance(r, Transcript) for r in results.values())
    assert not [r.getMessage() for r in records if "set_num_threads" in r.getMessage()]


def token_ids(results) -> dict[str, list[int]]:
    results = dict(results)
    failed = {key: r for key, r in results.items() if not isinstance(r, Transcript)}
    assert not failed
    return {key: r.token_ids for key, r in results.items()}


@pytest.fixture(scope="module")
def reference_recipe(demo_reference, recipe_clips):
    return {
        key: demo_reference.generate_ids(clip, num_beams=3, repetition_penalty=3.0, length_penalty=1.0)
        for key, clip in recipe_clips.items()
    }


@pytest.fixture(scope="module")
def vllm_recipe(llm, recipe_clips):
    return token_ids(transcriptions(llm, recipe_clips.items(), ORIGINAL_RECIPE))


def limits(recipe_clips) -> dict[str, int]:
    return {key: max(1, spec.speech_embedding_count_for_samples(len(clip))) for key, clip in recipe_clips.items()}


@pytest.mark.vllm
def test_greedy_with_penalty_matches_reference(llm, demo_reference, recipe_clips):
    got = token_ids(transcriptions(llm, recipe_clips.items(), Decoding(repetition_penalty=3.0)))
    expected = {key: demo_reference.generate_ids(clip, repetition_penalty=3.0) for key, clip in recipe_clips.items()}
    assert got == expected
    # Plain greedy differs somewhere: the penalty really acts.
    plain = token_ids(transcriptions(llm, recipe_clips.items(), GREEDY))
    assert plain != got
    assert plain == {key: demo_reference.generate_ids(clip) for key, clip in recipe_clips.items()}


@pytest.mark.vllm
def test_recipe_matches_reference(vllm_recipe, reference_recipe, recipe_clips, demo_reference):
    assert vllm_recipe == reference_recipe
    n = limits(recipe_clips)
    eos = demo_reference.eos_token_id
    on_eos = [k for k, ids in reference_recipe.items() if ids[-1] == eos and len(ids) < n[k]]
    at_n = [k for k, ids in reference_recipe.items() if len(ids) == n[k]]
    # Both endings occur: hypotheses finished on <|im_end|> before N, and N reached.
    assert len(on_eos) >= 5 and at_n


@pytest.mark.vllm
def test_beam_without_penalty_matches_reference(llm, demo_reference, recipe_clips, vllm_recipe):
    decoding = Decoding(beam_size=3, length_penalty=1.0)
    got = token_ids(transcriptions(llm, recipe_clips.items(), decoding))
    assert got == {key: demo_reference.generate_ids(clip, num_beams=3) for key, clip in recipe_clips.items()}
    # Here the recipe gives the same ids: inside beam search transformers penalises
    # log-probabilities, and a confident token's (about -0.001) barely moves when
    # tripled. The tiny random model's test above is where the penalty changes results.


@pytest.mark.vllm
def test_recipe_batched_equals_one_clip_at_a_time(llm, vllm_recipe, recipe_clips):
    one_at_a_time = {}
    for key, clip in recipe_clips.items():
        one_at_a_time.update(token_ids(transcriptions(llm, [(key, clip)], ORIGINAL_RECIPE)))
    assert one_at_a_time == vllm_recipe
    # And with at most two clips in flight: clips join as others finish.
    assert token_ids(transcriptions(llm, recipe_clips.items(), ORIGINAL_RECIPE, max_in_flight=2)) == vllm_recipe


def _count_speech_encodings(model):
    # Wraps the model's multimodal entry point once; counts the clips it encodes.
    if not hasattr(model, "_recipe_test_encoded"):
        original = model.embed_multimodal

        def counting(**kwargs):
            embeddings = original(**kwargs)
            model._recipe_test_encoded += len(embeddings)
            return embeddings

        model._recipe_test_encoded = 0
        model.embed_multimodal = counting
    return model._recipe_test_encoded


@pytest.mark.vllm
def test_speech_is_encoded_once_per_clip_in_beam_search(llm, recipe_clips, vllm_recipe):
    # Fresh clips (the engine caches encoder outputs by the audio's hash).
    rng = np.random.default_rng(0)
    clips = {f"noisy{i}": (clip + rng.normal(0, 1e-3, clip.shape)).astype(np.float32) for i, clip in enumerate(list(recipe_clips.values())[:6])}
    before = sum(llm.apply_model(_count_speech_encodings))
    results = token_ids(transcriptions(llm, clips.items(), ORIGINAL_RECIPE))
    after = sum(llm.apply_model(_count_speech_encodings))
    steps = sum(len(ids) for ids in results.values())
    assert steps > 3 * len(clips)  # many requests per clip ...
    assert after - before == len(clips)  # ... one encoding each


@pytest.mark.vllm
def test_a_refused_clip_is_reported_and_the_others_go_on(llm, recipe_clips, vllm_recipe):
    key = next(iter(recipe_clips))
    stream = [("too short", np.zeros(100, dtype=np.float32)), (key, recipe_clips[key])]
    results = dict(transcriptions(llm, stream, ORIGINAL_RECIPE))
    assert isinstance(results["too short"], ValueError)
    assert results[key].token_ids == vllm_recipe[key]



@pytest.mark.vllm
def test_beams_keep_their_requests_running(llm, recipe_clips, vllm_recipe, monkeypatch):
    # A beam extended with the token its request went on with keeps that request (and its
    # KV cache); only the other extensions start new requests. With a request per running
    # beam per step (vLLM's own beam search design) there would be one per beam-step.
    started, beam_steps = [], []
    add_request, advance = llm.llm_engine.add_request, ClipBeamSearch.advance

    def counting_requests(request_id, *args, **kwargs):
        started.append(request_id)
        return add_request(request_id, *args, **kwargs)

    def counting_beams(search, logprobs_per_beam):
        beam_steps.append(len(logprobs_per_beam))
        return advance(search, logprobs_per_beam)

    monkeypatch.setattr(llm.llm_engine, "add_request", counting_requests)
    monkeypatch.setattr(ClipBeamSearch, "advance", counting_beams)
    assert token_ids(transcriptions(llm, recipe_clips.items(), ORIGINAL_RECIPE)) == vllm_recipe
    # Measured: 160 requests for 418 beam-steps (0.38); 0.42-0.44 when the requests'
    # guesses ignore the log-probability form of the penalty or the stop tokens' probability.
    assert len(started) <= 0.40 * sum(beam_steps)


@pytest.mark.vllm
def test_beam_requests_reuse_the_prompt_from_the_prefix_cache(llm, vllm_recipe):
    # A beam extended with another token than its request's is a new request; unless its
    # prompt's KV blocks come from the prefix cache it is recomputed whole (as with the CPU
    # backend's default 128-token blocks: no hits at all, beam search 3.3x slower).
    counters = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}
    assert counters["vllm:prefix_cache_hits"] >= 0.3 * counters["vllm:prefix_cache_queries"] > 0
