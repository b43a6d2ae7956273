"""The FireRedASR-AED reference: its decoder and beam search against independent statements of the original.

The tests here compare the reference with what the original computes, written out
independently: a teacher-forced decoder run over the whole sequence from the
release's own tensors, and the original's beam search as plain per-clip Python.
Token identity with the original code itself was checked outside the repository
(docs/parity.md).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_release_pickle
from tolerances import aed_decoder_reduction_length, float32_atol

from fireredasr_converter import aed_spec, spec
from fireredasr_converter.fixtures import TINY_AED_SHAPES, build_aed_release, synthetic_speech
from fireredasr_vllm.aed_reference import ReferenceFireRedAsrAed
from fireredasr_vllm.decoding import AED_GREEDY, AED_RECIPE, AedDecoding

# Clip lengths in samples: the shortest clip the model takes (one encoder frame) up to 2 s.
CLIP_SAMPLES = (400, 4_000, 12_345, 20_000, 32_000)


@pytest.fixture(scope="module")
def aed_release(tmp_path_factory):
    return build_aed_release(tmp_path_factory.mktemp("aed"), TINY_AED_SHAPES, seed=0)


@pytest.fixture(scope="module")
def aed_reference(aed_release):
    torch.manual_seed(0)
    return ReferenceFireRedAsrAed.from_release(aed_release.model_dir)


@pytest.fixture(scope="module")
def state(aed_release):
    return load_release_pickle(aed_release.model_dir / "model.pth.tar")["model_state_dict"]


@pytest.fixture(scope="module")
def clips():
    return [synthetic_speech(n, seed=i) for i, n in enumerate(CLIP_SAMPLES)]


# --- an independent statement of the original's decoder ----------------------------


def full_decoder_logits(state, args, encoder_out: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, float]:
    """Logits after every prefix of `tokens` (the start token first), recomputing the whole sequence at once.

    The original's formulas from the release tensors: embedding x sqrt(d) plus the
    position table, pre-LayerNorm self-attention (causal, keys holding the padding
    token masked), cross-attention, GELU MLP, final LayerNorm, tied projection.
    Returns [len(tokens), vocab] and the largest |value| of the residual stream.
    """
    d, heads = args.d_model, args.n_head
    dk = d // heads

    def norm(x, name):
        return F.layer_norm(x, (d,), state[f"{name}.weight"], state[f"{name}.bias"])

    def attention(prefix, x, memory, keep):
        q = F.linear(x, state[f"{prefix}.w_qs.weight"], state[f"{prefix}.w_qs.bias"])
        k = F.linear(memory, state[f"{prefix}.w_ks.weight"])
        v = F.linear(memory, state[f"{prefix}.w_vs.weight"], state[f"{prefix}.w_vs.bias"])
        q, k, v = (t.view(-1, heads, dk).transpose(0, 1) for t in (q, k, v))
        scores = q @ k.transpose(1, 2) / math.sqrt(dk)
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        return F.linear((weights @ v).transpose(0, 1).reshape(-1, d), state[f"{prefix}.fc.weight"], state[f"{prefix}.fc.bias"])

    ids = torch.tensor(tokens)
    length = len(tokens)
    x = state["decoder.tgt_word_emb.weight"][ids] * d**0.5 + state["decoder.positional_encoding.pe"][0, :length]
    keep = torch.tril(torch.ones(length, length, dtype=torch.bool)) & (ids != args.pad_id)[None, :]
    largest = x.abs().max().item()
    for layer in range(args.n_layers_dec):
        p = f"decoder.layer_stack.{layer}"
        x = x + attention(f"{p}.self_attn", norm(x, f"{p}.self_attn_norm"), norm(x, f"{p}.self_attn_norm"), keep)
        x = x + attention(f"{p}.cross_attn", norm(x, f"{p}.cross_attn_norm"), encoder_out, torch.ones(1, 1, dtype=torch.bool))
        h = F.linear(norm(x, f"{p}.mlp_norm"), state[f"{p}.mlp.w_1.weight"], state[f"{p}.mlp.w_1.bias"])
        x = x + F.linear(F.gelu(h), state[f"{p}.mlp.w_2.weight"], state[f"{p}.mlp.w_2.bias"])
        largest = max(largest, x.abs().max().item())
    return F.linear(norm(x, "decoder.layer_norm_out"), state["decoder.tgt_word_prj.weight"]), largest


def original_beam_search(step_scores, limit: int, decoding: AedDecoding, sos: int, eos: int) -> list[int]:
    """The original's beam search for one clip, as plain Python over float32 scalars.

    `step_scores(tokens)` gives the float32 log-softmax of logits / smoothing after
    `tokens`. Beam b starts at score 0 (b = 0) or the filler; each step every beam
    offers its top B tokens (a finished beam: EOS at no cost, then filler), the B
    best of the B*B offers continue in order; the search ends when every beam is
    finished or after `limit` steps; scores get the GNMT penalty and the best
    beam's tokens before EOS are returned.
    """
    B = decoding.beam_size
    fill = np.float32(aed_spec.BEAM_FILL_SCORE)
    beams = [([sos], np.float32(0.0) if b == 0 else fill, False) for b in range(B)]
    for _ in range(limit):
        offers = []
        for tokens, score, finished in beams:
            if finished:
                extensions = [(eos, np.float32(0.0))] + [(eos, fill)] * (B - 1)
            else:
                lp = step_scores(tokens).clone()
                if decoding.eos_penalty != 1.0:
                    lp[eos] *= decoding.eos_penalty
                values, ids = torch.topk(lp, B)
                extensions = list(zip(ids.tolist(), values.numpy()))
            offers += [(np.float32(score + value), tokens + [token]) for token, value in extensions]
        order = sorted(range(len(offers)), key=lambda i: -offers[i][0])[:B]
        beams = [(offers[i][1], offers[i][0], offers[i][1][-1] == eos) for i in order]
        if all(finished for _, _, finished in beams):
            break
    ranked = []
    for tokens, score, _ in beams:
        length = sum(token != eos for token in tokens)
        if decoding.length_penalty > 0:
            score = np.float32(score / np.float32(((np.float32(5 + length)) / np.float32(6.0)) ** np.float32(decoding.length_penalty)))
        ranked.append((score, tokens[1:length]))
    return max(ranked, key=lambda r: r[0])[1]


# --- the decoder ----------------------------------------------------------------------


def test_incremental_decoder_equals_the_whole_sequence_recomputed(aed_reference, aed_release, state, clips):
    args = aed_release.args
    encoder_out, lengths = aed_reference.encode([aed_reference.features(clips[3])])
    memory = encoder_out[0, : lengths[0]]
    # A token sequence with the padding token inside: the original masks it as a key.
    tokens = [args.sos_id, 7, 40, args.pad_id, 90, 7, 12]
    expected, largest = full_decoder_logits(state, args, memory, tokens)
    decoder = aed_reference.decoder
    step_state = decoder.start(encoder_out, lengths)
    atol = float32_atol(aed_decoder_reduction_length(args.d_model, args.n_layers_dec, len(tokens), lengths[0]), largest)
    with torch.inference_mode():
        for position, token in enumerate(tokens):
            logits, step_state = decoder.step(torch.tensor([token]), step_state)
            torch.testing.assert_close(logits[0], expected[position], atol=atol, rtol=0)
    # Without the padding mask the fourth position's keys would count: the mask matters here.
    unmasked, _ = full_decoder_logits(state, args, memory, [t if t != args.pad_id else 5 for t in tokens])
    assert not torch.allclose(unmasked[4], expected[4], atol=atol, rtol=0)


def test_weights_are_the_release_tensors(aed_reference, state):
    decoder = aed_reference.decoder
    assert torch.equal(decoder.tgt_word_emb.weight, state["decoder.tgt_word_emb.weight"])
    assert torch.equal(decoder.tgt_word_emb.weight, state["decoder.tgt_word_prj.weight"])
    assert torch.equal(decoder.positional_encoding.pe, state["decoder.positional_encoding.pe"])
    assert torch.equal(decoder.layer_stack[1].cross_attn.w_vs.bias, state["decoder.layer_stack.1.cross_attn.w_vs.bias"])
    encoder_weight = aed_reference.encoder.layer_stack[0].mhsa.linear_pos.weight
    assert torch.equal(encoder_weight, state["encoder.layer_stack.0.mhsa.linear_pos.weight"])


# --- the beam search ------------------------------------------------------------------


DECODINGS = {
    "greedy": AED_GREEDY,
    "recipe": AED_RECIPE,
    "plain_beam": AedDecoding(beam_size=3, softmax_smoothing=1.0, length_penalty=0.0, eos_penalty=1.0),
    "eos_penalty": AedDecoding(beam_size=3, softmax_smoothing=1.25, length_penalty=0.6, eos_penalty=0.95),
    "wide": AedDecoding(beam_size=4, softmax_smoothing=0.7, length_penalty=1.0, eos_penalty=0.9),
    # Here the length penalty decides between an empty and a 19-token hypothesis for the third clip.
    "length_decides": AedDecoding(beam_size=3, softmax_smoothing=1.25, length_penalty=2.0, eos_penalty=0.95),
}


@pytest.mark.parametrize("name", DECODINGS)
def test_beam_search_is_the_originals(name, aed_reference, aed_release, state, clips):
    decoding = DECODINGS[name]
    args = aed_release.args
    found = aed_reference.generate_ids(clips[:4], decoding)
    for clip, ids in zip(clips[:4], found):
        encoder_out, lengths = aed_reference.encode([aed_reference.features(clip)])
        memory = encoder_out[0, : lengths[0]]

        def step_scores(tokens):
            logits, _ = full_decoder_logits(state, args, memory, tokens)
            return torch.log_softmax(logits[-1] / decoding.softmax_smoothing, dim=-1)

        assert ids == original_beam_search(step_scores, lengths[0], decoding, args.sos_id, args.eos_id)


def test_batched_equals_one_at_a_time(aed_reference, clips):
    for decoding in (AED_RECIPE, AED_GREEDY, DECODINGS["wide"]):
        batched = aed_reference.generate_ids(clips, decoding)
        assert batched == [aed_reference.generate_ids([clip], decoding)[0] for clip in clips]
        # Order in the batch does not matter either.
        assert aed_reference.generate_ids(clips[::-1], decoding) == batched[::-1]


def test_limits_and_end_of_sequence(aed_reference, aed_release, clips):
    eos = aed_release.args.eos_id
    greedy = aed_reference.generate_ids(clips, AED_GREEDY)
    for clip, ids in zip(clips, greedy):
        frames = spec.encoder_frame_count(spec.fbank_frame_count(len(clip)))
        assert len(ids) <= frames and eos not in ids
    assert any(len(ids) == spec.encoder_frame_count(spec.fbank_frame_count(len(c))) for c, ids in zip(clips, greedy))
    # max_new_tokens replaces each clip's limit, also above it (the original's decode_max_len > 0).
    capped, longer = (
        aed_reference.generate_ids(clips, AedDecoding(beam_size=1, length_penalty=0.0, max_new_tokens=limit))
        for limit in (3, 200)
    )
    assert capped == [ids[:3] for ids in longer]
    assert len(longer[0]) > len(greedy[0]) == 1
    # A strong EOS penalty makes EOS the first choice: every hypothesis is empty.
    assert aed_reference.generate_ids(clips, AedDecoding(eos_penalty=0.01)) == [[]] * len(clips)


def test_greedy_ignores_smoothing_and_length_penalty(aed_reference, clips):
    greedy = aed_reference.generate_ids(clips, AED_GREEDY)
    assert aed_reference.generate_ids(clips, AedDecoding(beam_size=1, softmax_smoothing=3.0, length_penalty=2.0)) == greedy


# --- text -------------------------------------------------------------------------------


def test_detokenize_is_the_originals(aed_reference):
    tokens = aed_reference.tokens
    index = {token: i for i, token in enumerate(tokens)}
    ids = [index["▁THE"], index["的"], index["▁W"], index["E"], index["<sos>"], index["一"]]
    assert aed_reference.detokenize(ids) == "THE的 WE<sos>一"
    assert aed_reference.detokenize([index["▁"], index["A"]]) == "A"
    assert aed_reference.detokenize([]) == ""


def test_transcribe_returns_text_and_ids(aed_reference, clips):
    results = aed_reference.transcribe(clips[:2])
    assert [r.token_ids for r in results] == aed_reference.generate_ids(clips[:2])
    assert [r.text for r in results] == [aed_reference.detokenize(r.token_ids) for r in results]
    assert aed_reference.transcribe([]) == []


def test_refuses_clips_it_cannot_take(aed_reference):
    with pytest.raises(ValueError, match="too short"):
        aed_reference.generate_ids([np.zeros(399, dtype=np.float32)])
    with pytest.raises(ValueError, match="resample"):
        aed_reference.generate_ids([np.zeros(8000, dtype=np.float32)], sampling_rate=8000)
    with pytest.raises(ValueError, match="floating point"):
        aed_reference.generate_ids([np.zeros(8000, dtype=np.int16)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"softmax_smoothing": 0.0}, "softmax_smoothing"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"eos_penalty": 1.5}, "eos_penalty"),
        ({"eos_penalty": 0.0}, "eos_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_decoding_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AedDecoding(**kwargs)


def test_recipe_is_the_readmes():
    assert (AED_RECIPE.beam_size, AED_RECIPE.softmax_smoothing, AED_RECIPE.length_penalty, AED_RECIPE.eos_penalty) == (
        3, 1.25, 0.6, 1.0,
    )  # fmt: skip
