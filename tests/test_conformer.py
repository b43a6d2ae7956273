"""The Conformer encoder + adapter: checkpoint names, first-release lengths, masking, batch invariance."""

import copy
import math

import pytest
import torch

from fireredasr_converter import spec
from fireredasr_converter.configuration import FireRedAsrEncoderConfig, FireRedAsrLlmConfig
from tolerances import (
    BF16_UNIT_ROUNDOFF,
    FP16_UNIT_ROUNDOFF,
    float32_atol,
    half_precision_relative_norm_bound,
    half_precision_roundings,
    speech_encoder_reduction_length,
)

from fireredasr_vllm.conformer import (
    ConformerEncoder,
    RelPositionMultiHeadAttention,
    SpeechEncoder,
    length_groups,
    relative_shift,
)

ENCODER = dict(n_layers=2, n_head=4, d_model=64, kernel_size=33)
LLM_HIDDEN = 128


def encoder_atol(max_frames: int, expected: torch.Tensor) -> float:
    """Float32 reordering bound for a speech embedding (or Conformer output) of clips up to `max_frames` frames.

    Batched, padded and grouped runs sum the same terms as a lone clip in another
    order (another GEMM blocking); the masking these tests check would move values by
    O(1), far above this.
    """
    reductions = speech_encoder_reduction_length(
        ENCODER["d_model"], ENCODER["n_layers"], math.ceil(max_frames / 4), ENCODER["kernel_size"], LLM_HIDDEN
    )
    return float32_atol(reductions, expected.abs().max().item() if expected.numel() else 0.0)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values for every parameter (LayerNorm gains and biases too), the pe buffer kept."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            scale = 1.0 / math.sqrt(param.shape[-1])
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return module.eval()


@pytest.fixture(scope="module")
def speech_encoder() -> SpeechEncoder:
    config = FireRedAsrLlmConfig(
        encoder_config=ENCODER, text_config={"model_type": "qwen2", "hidden_size": LLM_HIDDEN}
    )
    return randomise(SpeechEncoder(config), seed=0)


def test_parameter_names_and_count_match_the_release_checkpoint():
    # The release's `encoder.*` holds 551 tensors for 16 layers: 34 per block, 6 in
    # the subsampling and the pe buffer. Small widths keep the model cheap.
    encoder = ConformerEncoder(FireRedAsrEncoderConfig(n_layers=16, n_head=2, d_model=8))
    state = encoder.state_dict()
    assert len(state) == 551
    assert state["positional_encoding.pe"].shape == (1, 2 * spec.RELATIVE_POSITION_MAX_LEN - 1, 8)
    block = {k.removeprefix("layer_stack.15.") for k in state if k.startswith("layer_stack.15.")}
    assert block == {
        *(f"{ffn}.net.{i}.{p}" for ffn in ("ffn1", "ffn2") for i in (0, 1, 4) for p in ("weight", "bias")),
        *(f"mhsa.{w}.weight" for w in ("w_qs", "w_ks", "w_vs", "fc", "linear_pos")),
        *(f"mhsa.layer_norm_{x}.{p}" for x in "qkv" for p in ("weight", "bias")),
        "mhsa.pos_bias_u",
        "mhsa.pos_bias_v",
        *(f"conv.{n}.{p}" for n in ("pre_layer_norm", "batch_norm") for p in ("weight", "bias")),
        *(f"conv.{n}.weight" for n in ("pointwise_conv1", "depthwise_conv", "pointwise_conv2")),
        "layer_norm.weight",
        "layer_norm.bias",
    }
    assert state["layer_stack.0.conv.pointwise_conv1.weight"].shape == (32, 8, 1)
    assert state["layer_stack.0.conv.depthwise_conv.weight"].shape == (16, 1, 33)
    assert state["input_preprocessor.out.weight"].shape == (8, 32 * 19)


def test_speech_encoder_keys_are_the_converted_names(speech_encoder):
    keys = set(speech_encoder.state_dict())
    assert {k for k in keys if not k.startswith("encoder.")} == {
        f"encoder_projector.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    }
    assert speech_encoder.state_dict()["encoder_projector.linear1.weight"].shape == (LLM_HIDDEN, 2 * 64)


@pytest.mark.parametrize(("num_frames", "expected"), [(418, 52), (197, 25), (1235, 154)])
def test_embedding_counts_from_the_facts_table(speech_encoder, num_frames, expected):
    assert spec.speech_embedding_count(num_frames) == expected
    features = torch.randn(1, num_frames, 80)
    with torch.no_grad():
        (embeddings,) = speech_encoder(features, [num_frames])
    assert embeddings.shape == (expected, LLM_HIDDEN)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 5, 8, 9, 39, 40, 41, 42])
def test_a_lone_clip_yields_exactly_ceil_t_over_4_encoder_frames(speech_encoder, num_frames):
    features = torch.randn(1, num_frames, 80)
    with torch.no_grad():
        hidden, enc_lengths = speech_encoder.encoder(features, [num_frames])
    assert enc_lengths == [math.ceil(num_frames / 4)] == [spec.encoder_frame_count(num_frames)]
    assert hidden.shape == (1, math.ceil(num_frames / 4), 64)


def test_relative_shift_puts_relative_position_i_minus_j_at_key_j():
    length = 5
    # Column c of the unshifted scores belongs to relative position length-1-c.
    relative = (length - 1 - torch.arange(2 * length - 1)).float()
    scores = relative.expand(2, 3, length, -1).clone()
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    assert torch.equal(relative_shift(scores), (i - j).float().expand(2, 3, -1, -1))


def test_attention_equals_the_explicit_transformer_xl_formula():
    """Scores ((q + u) k + (q + v) p_{i-j}) / sqrt(d_k), softmax over unpadded keys."""
    torch.manual_seed(0)
    d_model, heads, length = 16, 2, 6
    attention = randomise(RelPositionMultiHeadAttention(d_model, heads, eps=1e-5), seed=1)
    table = spec.relative_position_table(d_model, max_len=10)[0]
    x = torch.randn(2, length, d_model)
    lengths = torch.tensor([length, 4])
    key_bias = torch.zeros(2, 1, 1, length).masked_fill(
        (torch.arange(length) >= lengths[:, None])[:, None, None, :], float("-inf")
    )
    pos_emb = table[10 - length : 10 - 1 + length]  # positions length-1 .. -(length-1)
    with torch.no_grad():
        ours = attention(x, pos_emb, key_bias)

        d_k = d_model // heads
        split = lambda t: t.view(*t.shape[:-1], heads, d_k)  # noqa: E731
        q = split(attention.w_qs(attention.layer_norm_q(x)))
        k = split(attention.w_ks(attention.layer_norm_k(x)))
        v = split(attention.w_vs(attention.layer_norm_v(x)))
        expected = torch.empty_like(x)
        for b in range(2):
            context = torch.zeros(length, heads, d_k)
            for i in range(length):
                scores = torch.full((heads, length), float("-inf"))
                for j in range(int(lengths[b])):
                    p = split(attention.linear_pos(table[10 - 1 - (i - j)]))
                    scores[:, j] = (
                        ((q[b, i] + attention.pos_bias_u) * k[b, j]).sum(-1)
                        + ((q[b, i] + attention.pos_bias_v) * p).sum(-1)
                    ) / math.sqrt(d_k)
                weights = torch.softmax(scores, dim=-1)
                context[i] = torch.einsum("hj,jhd->hd", weights, v[b])
            expected[b] = x[b] + attention.fc(context.reshape(length, d_model))
    # The loops above sum in another order than the batched matmuls: LayerNorm d, projection d,
    # position projection d, content and position scores d_k each, softmax and context over
    # the length, output d.
    reductions = d_model + d_model + d_model + 2 * (d_model // heads) + 2 * length + d_model
    torch.testing.assert_close(ours, expected, rtol=0, atol=float32_atol(reductions, expected.abs().max().item()))


def test_every_clip_in_a_padded_batch_gets_its_batch_size_1_result(speech_encoder):
    # Every residue of T mod 4 and of ceil(T/4) mod 2, the shortest clips, and a
    # padding value that would leak into the result if padding were not masked.
    lengths = [1, 7, 8, 9, 10, 37, 38, 39, 40, 121, 418]
    clips = [torch.randn(n, 80, generator=torch.Generator().manual_seed(n)) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True, padding_value=3.0)
    with torch.no_grad():
        batched = speech_encoder(padded, lengths)
        alone = [speech_encoder(clip[None], [clip.shape[0]])[0] for clip in clips]
        hidden, enc_lengths = speech_encoder.encoder(padded, lengths)
        hidden_alone = [
            speech_encoder.encoder(clip[None], [clip.shape[0]])[0][0] for clip in clips
        ]
    assert [e.shape[0] for e in batched] == [spec.speech_embedding_count(n) for n in lengths]
    for got, expected in zip(batched, alone):
        torch.testing.assert_close(got, expected, rtol=0, atol=encoder_atol(max(lengths), expected))
    for row, length, expected in zip(hidden, enc_lengths, hidden_alone):
        # The Conformer's output: a shorter path than the embeddings', bounded by theirs.
        torch.testing.assert_close(row[:length], expected, rtol=0, atol=encoder_atol(max(lengths), expected))


def test_length_groups_cover_every_clip_once_and_bound_the_padding():
    lengths = [1000, 12, 760, 750, 999, 13, 10, 9, 400, 301, 300, 1000, 1]
    groups = length_groups(lengths, min_fill=0.75)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        members = [lengths[i] for i in group]
        assert members == sorted(members, reverse=True)
        assert min(members) >= 0.75 * max(members)
    # Greedy from the longest: 1000,1000,999,760,750 | 400,301,300 | 13,12,10 | 9 | 1
    assert [[lengths[i] for i in group] for group in groups] == [
        [1000, 1000, 999, 760, 750], [400, 301, 300], [13, 12, 10], [9], [1]
    ]  # fmt: skip
    assert length_groups([]) == []


def test_encode_clips_returns_batch_size_1_rows_in_the_given_order(speech_encoder):
    # Lengths spread over several groups, given out of order.
    lengths = [40, 418, 9, 121, 400, 10, 1, 37]
    clips = [torch.randn(n, 80, generator=torch.Generator().manual_seed(n)) for n in lengths]
    with torch.no_grad():
        grouped = speech_encoder.encode_clips(clips)
        alone = [speech_encoder(clip[None], [clip.shape[0]])[0] for clip in clips]
    assert len(length_groups(lengths)) > 1
    assert [e.shape[0] for e in grouped] == [spec.speech_embedding_count(n) for n in lengths]
    for got, expected in zip(grouped, alone):
        torch.testing.assert_close(got, expected, rtol=0, atol=encoder_atol(max(lengths), expected))


def test_padded_batch_beyond_the_longest_clip_changes_nothing(speech_encoder):
    clips = torch.randn(2, 50, 80)
    lengths = [50, 21]
    with torch.no_grad():
        tight = speech_encoder(clips, lengths)
        loose = speech_encoder(torch.cat([clips, torch.randn(2, 30, 80)], dim=1), lengths)
    for a, b in zip(tight, loose):
        torch.testing.assert_close(a, b, rtol=0, atol=encoder_atol(80, b))


def test_bfloat16_weights_run_and_keep_their_dtype(speech_encoder):
    clone = copy.deepcopy(speech_encoder).to(torch.bfloat16)
    features = torch.randn(2, 60, 80)
    with torch.no_grad():
        low = clone(features, [60, 33])
        full = speech_encoder(features, [60, 33])
    assert [e.dtype for e in low] == [torch.bfloat16] * 2
    # Worst case: every bf16 rounding on the path (relative 2^-8 each) adds up in one value.
    atol = half_precision_roundings(ENCODER["n_layers"]) * BF16_UNIT_ROUNDOFF
    for a, b in zip(low, full):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=atol * b.abs().max().item())


def test_clips_beyond_the_relative_position_table_are_refused():
    config = FireRedAsrEncoderConfig(**ENCODER, relative_position_max_len=8)
    encoder = randomise(ConformerEncoder(config), seed=2)
    with torch.no_grad():
        hidden, _ = encoder(torch.randn(1, 32, 80), [32])  # exactly 8 encoder frames
        assert hidden.shape[1] == 8
        with pytest.raises(ValueError, match="9 encoder frames exceed the relative position table's 8"):
            encoder(torch.randn(1, 33, 80), [33])


@pytest.mark.parametrize(
    ("features", "num_frames", "message"),
    [
        (torch.randn(2, 10, 80), [10, 0], r"num_frames must lie in \[1, 10\]"),
        (torch.randn(2, 10, 80), [11, 3], r"num_frames must lie in \[1, 10\]"),
        (torch.randn(2, 10, 40), [10, 3], r"features must be \[batch, frames, 80\]"),
        (torch.randn(2, 10, 80), [10], "one length per clip"),
    ],
)
def test_malformed_inputs_are_refused(speech_encoder, features, num_frames, message):
    with pytest.raises(ValueError, match=message):
        speech_encoder(features, num_frames)


def test_every_tensor_is_created_on_the_callers_device_and_dtype():
    """vLLM builds the towers under its device and dtype and never moves them afterwards."""
    config = FireRedAsrLlmConfig(
        encoder_config=ENCODER, text_config={"model_type": "qwen2", "hidden_size": LLM_HIDDEN}
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            tower = SpeechEncoder(config)
    finally:
        torch.set_default_dtype(previous)
    placed = {name: (t.device.type, t.dtype) for name, t in [*tower.named_parameters(), *tower.named_buffers()]}
    assert "encoder.positional_encoding.pe" in placed
    assert {name for name, where in placed.items() if where != ("meta", torch.bfloat16)} == set()


def test_a_forward_never_reads_a_value_back_from_the_device(speech_encoder):
    """On the meta device any host sync (`.item()`, `.tolist()`, boolean indexing) raises.

    A forward over meta tensors therefore proves the encoder only launches work:
    vLLM's asynchronous scheduling keeps going while a GPU encodes.
    """
    meta_encoder = copy.deepcopy(speech_encoder).to("meta")
    lengths = [418, 121, 9, 400]
    clips = [torch.empty(n, 80, device="meta") for n in lengths]
    embeddings = meta_encoder.encode_clips(clips, max_clip_frames=418)
    assert [tuple(e.shape) for e in embeddings] == [(spec.speech_embedding_count(n), LLM_HIDDEN) for n in lengths]
    assert {e.device.type for e in embeddings} == {"meta"}


def test_length_groups_respect_a_padded_frame_cap():
    lengths = [1000, 990, 980, 970, 960, 500, 490, 10]
    groups = length_groups(lengths, max_padded_frames=2000)
    assert [[lengths[i] for i in group] for group in groups] == [
        [1000, 990], [980, 970], [960], [500, 490], [10]
    ]  # fmt: skip
    # A clip longer than the cap still runs, alone.
    assert length_groups([3000, 2990], max_padded_frames=2000) == [[0], [1]]


def test_no_forward_pads_more_frames_than_start_up_profiling_ran(speech_encoder):
    """vLLM profiles with K clips of the longest length and never schedules more embeddings than those carry."""
    max_frames = 398  # the longest accepted clip in this test: N = 50
    per_clip = spec.speech_embedding_count(max_frames)
    rng = torch.Generator().manual_seed(3)
    for profiled_clips in (1, 2, 3):
        # Worst cases for padding: clips just over 3/4 of the longest fill a group.
        lengths = [int(n) for n in torch.randint(max_frames * 3 // 4, max_frames + 1, (12,), generator=rng)]
        while sum(spec.speech_embedding_count(n) for n in lengths) > profiled_clips * per_clip:
            lengths.pop()
        clips = [torch.randn(n, 80, generator=torch.Generator().manual_seed(n)) for n in lengths]
        padded_frames = []
        original_forward = speech_encoder.forward

        def recording_forward(features, num_frames):
            padded_frames.append(features.shape[0] * features.shape[1])
            return original_forward(features, num_frames)

        speech_encoder.forward = recording_forward
        try:
            with torch.no_grad():
                capped = speech_encoder.encode_clips(clips, max_clip_frames=max_frames)
        finally:
            del speech_encoder.forward
        assert max(padded_frames) <= profiled_clips * max_frames
        with torch.no_grad():
            uncapped = speech_encoder.encode_clips(clips)
        for got, expected in zip(capped, uncapped):
            torch.testing.assert_close(got, expected, rtol=0, atol=encoder_atol(max_frames, expected))
    # The profiling batch itself (K clips of the longest length) is one forward.
    assert length_groups([max_frames] * 3, max_padded_frames=3 * max_frames) == [[0, 1, 2]]


@pytest.mark.parametrize(("dtype", "unit_roundoff"), [(torch.bfloat16, BF16_UNIT_ROUNDOFF), (torch.float16, FP16_UNIT_ROUNDOFF)])
def test_half_precision_runs_over_the_shortest_and_the_longest_clip(speech_encoder, dtype, unit_roundoff):
    """bf16 (GPUs >= sm80) and fp16 (vLLM's fallback below sm80) stay finite and near fp32.

    Near: within the probabilistic rounding bound for the roundings on the path
    (bf16 0.19, fp16 0.023; measured on one CPU: bf16 ~5e-3, fp16 ~6e-4).

    The batch pads the shortest clip with one embedding (5 frames) to 30 s, so the
    masked rows and the -inf key padding are exercised at their extreme.
    """
    lengths = [spec.max_fbank_frames(30.0), spec.fbank_frame_count(spec.min_samples_for_one_embedding())]
    clips = [torch.randn(n, 80, generator=torch.Generator().manual_seed(n)) for n in lengths]
    features = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    low_precision = copy.deepcopy(speech_encoder).to(dtype)
    # The Conformer's output as the forward below computes it (one low-precision pass, not two).
    encoder_outputs = []
    low_precision.encoder.register_forward_hook(lambda module, args, output: encoder_outputs.append(output))
    with torch.no_grad():
        low = low_precision(features, lengths)
        full = speech_encoder(features, lengths)
    ((hidden, _),) = encoder_outputs
    assert torch.isfinite(hidden).all()  # padded rows included
    assert [e.shape[0] for e in low] == [spec.speech_embedding_count(n) for n in lengths] == [375, 1]
    for got, expected in zip(low, full):
        assert got.dtype == dtype
        assert torch.isfinite(got).all()
        relative_error = (got.float() - expected).norm() / expected.norm()
        tolerance = half_precision_relative_norm_bound(unit_roundoff, half_precision_roundings(ENCODER["n_layers"]))
        assert relative_error < tolerance, f"{dtype}: relative error {relative_error:.2e}"
