"""The reference FireRedASR-AED: the original's computation in plain PyTorch.

The readable statement of what the AED model computes, and the oracle its
serving is tested against:

    waveform -> fbank + CMVN -> Conformer encoder (shared with the LLM variant)
    -> Transformer decoder (self-attention over the tokens so far, cross-attention
       over the encoder output, GELU MLP; output projection tied to the embedding)
    -> the original's batch beam search -> token ids -> text (dict.txt)

Decoding is the original's `batch_beam_search` step for step, in the same float32
arithmetic (log-softmax of logits / softmax_smoothing, EOS log-probability times
eos_penalty, top-B per beam, finished beams extended by EOS at no cost, top-B of
the B*B candidates per clip, GNMT length penalty at the end); greedy decoding is
the same search with one beam. One difference of scope: in the original a padded
batch decodes every clip for up to the *longest* clip's encoder length, so a clip's
result can depend on its batch; here each clip stops at its own length (what the
original gives it alone), so batched results equal one-at-a-time results.

Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fireredasr_converter import aed_spec, spec
from fireredasr_converter.aed_release import CTC_PREFIX, DECODER_PREFIX, discover_aed_release
from fireredasr_converter.aed_tokenizer import FireRedAsrAedTokenizer
from fireredasr_converter.configuration import FireRedAsrAedConfig, register_with_transformers
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.repo_format import ENCODER_PREFIX

from .conformer import ConformerEncoder
from .decoding import AED_RECIPE, AedDecoding
from .reference import load_converted_weights

AudioClip = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class AedTranscription:
    text: str
    # The hypothesis's tokens before EOS, as the original's `yseq`.
    token_ids: list[int]


class DecoderAttention(nn.Module):
    """The original's decoder attention: biased query, value and output projections, unbiased key."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.temperature = self.head_dim**0.5
        self.w_qs = nn.Linear(d_model, d_model)
        self.w_ks = nn.Linear(d_model, d_model, bias=False)
        self.w_vs = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[R, T, d] -> [R, H, T, d_k]."""
        return x.view(x.shape[0], -1, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """query [R, 1, d] (not yet projected); key, value [R, H, T, d_k] (projected); keep [R, 1, 1, T] bool."""
        scores = torch.matmul(self.heads(self.w_qs(query)), key.transpose(2, 3)) / self.temperature
        masked = ~keep
        weights = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1).masked_fill(masked, 0.0)
        context = torch.matmul(weights, value).transpose(1, 2).reshape(query.shape[0], -1, self.n_head * self.head_dim)
        return self.fc(context)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.gelu(self.w_1(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_ff: int, eps: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = DecoderAttention(d_model, n_head)
        self.cross_attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.cross_attn = DecoderAttention(d_model, n_head)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = PositionwiseFeedForward(d_model, d_ff)


@dataclass
class DecoderState:
    """Per decoded row (clip x beam): the self-attention keys and values so far, the cross-attention ones, masks."""

    self_keys: list[torch.Tensor]  # per layer [R, H, t, d_k]
    self_values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]  # per layer [R, H, T_enc, d_k]
    cross_values: list[torch.Tensor]
    cross_keep: torch.Tensor  # [R, 1, 1, T_enc] bool: encoder frames of the row's clip
    self_keep: torch.Tensor  # [R, 1, 1, t] bool: positions whose token is not the padding token

    def select(self, rows: torch.Tensor) -> DecoderState:
        return DecoderState(
            [k[rows] for k in self.self_keys],
            [v[rows] for v in self.self_values],
            [k[rows] for k in self.cross_keys],
            [v[rows] for v in self.cross_values],
            self.cross_keep[rows],
            self.self_keep[rows],
        )


class TransformerDecoder(nn.Module):
    """The original's decoder, run one token at a time. Parameter names are the checkpoint's `decoder.*`."""

    def __init__(self, config: FireRedAsrAedConfig):
        super().__init__()
        d = config.d_model
        self.config = config
        self.scale = aed_spec.embedding_scale(d)
        self.tgt_word_emb = nn.Embedding(config.vocab_size, d)
        self.positional_encoding = nn.Module()
        self.positional_encoding.register_buffer("pe", torch.zeros(1, config.max_target_positions, d))
        self.layer_stack = nn.ModuleList(
            DecoderLayer(d, config.decoder_attention_heads, config.decoder_ffn_dim, config.layer_norm_eps)
            for _ in range(config.decoder_layers)
        )
        self.layer_norm_out = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def start(self, encoder_out: torch.Tensor, enc_lengths: Sequence[int]) -> DecoderState:
        """The state before the first token: cross-attention keys and values of each row's encoder output."""
        keep = torch.arange(encoder_out.shape[1], device=encoder_out.device)[None, :] < torch.tensor(
            list(enc_lengths), device=encoder_out.device
        )[:, None]
        cross_keys = [layer.cross_attn.heads(layer.cross_attn.w_ks(encoder_out)) for layer in self.layer_stack]
        cross_values = [layer.cross_attn.heads(layer.cross_attn.w_vs(encoder_out)) for layer in self.layer_stack]
        rows, heads = encoder_out.shape[0], self.config.decoder_attention_heads
        empty = encoder_out.new_zeros(rows, heads, 0, self.config.d_model // heads)
        no_positions = torch.zeros(rows, 1, 1, 0, dtype=torch.bool, device=encoder_out.device)
        return DecoderState(
            [empty] * len(self.layer_stack), [empty] * len(self.layer_stack), cross_keys, cross_values,
            keep[:, None, None, :], no_positions,
        )  # fmt: skip

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """The next token's logits [R, vocab] for the last tokens [R] at position t = the tokens seen so far."""
        position = state.self_keep.shape[-1]
        x = self.tgt_word_emb(tokens[:, None]) * self.scale + self.positional_encoding.pe[:, position : position + 1]
        # The original masks key positions that hold the padding token (its target mask).
        self_keep = torch.cat([state.self_keep, (tokens != self.config.pad_token_id)[:, None, None, None]], dim=-1)
        self_keys, self_values = [], []
        for index, layer in enumerate(self.layer_stack):
            normed = layer.self_attn_norm(x)
            keys = torch.cat([state.self_keys[index], layer.self_attn.heads(layer.self_attn.w_ks(normed))], dim=2)
            values = torch.cat([state.self_values[index], layer.self_attn.heads(layer.self_attn.w_vs(normed))], dim=2)
            self_keys.append(keys)
            self_values.append(values)
            x = x + layer.self_attn(normed, keys, values, self_keep)
            x = x + layer.cross_attn(
                layer.cross_attn_norm(x), state.cross_keys[index], state.cross_values[index], state.cross_keep
            )
            x = x + layer.mlp(layer.mlp_norm(x))
        hidden = self.layer_norm_out(x[:, 0])
        logits = F.linear(hidden, self.tgt_word_emb.weight)
        return logits, DecoderState(
            self_keys, self_values, state.cross_keys, state.cross_values, state.cross_keep, self_keep
        )


def batch_beam_search(
    decoder: TransformerDecoder, encoder_out: torch.Tensor, enc_lengths: Sequence[int], decoding: AedDecoding
) -> list[list[int]]:
    """The original's batch beam search for N clips, each stopping at its own limit; returns each clip's best tokens."""
    config = decoder.config
    B, N = decoding.beam_size, encoder_out.shape[0]
    device = encoder_out.device
    sos, eos = config.decoder_start_token_id, config.eos_token_id
    limits = [decoding.max_new_tokens or length for length in enc_lengths]
    fill = torch.tensor(aed_spec.BEAM_FILL_SCORE, dtype=torch.float32)

    rows = torch.arange(N, device=device).repeat_interleave(B)
    state = decoder.start(encoder_out[rows], [enc_lengths[i] for i in rows.tolist()])
    clips = list(range(N))  # the clips still decoding, in row order (B rows each)
    ys = torch.full((N * B, 1), sos, dtype=torch.long, device=device)
    # Only the first beam of each clip exists at the start.
    scores = torch.tensor([0.0] + [fill.item()] * (B - 1), dtype=torch.float32, device=device).repeat(N)[:, None]
    finished = torch.zeros(N * B, 1, dtype=torch.bool, device=device)
    finished_scores = torch.tensor([0.0] + [fill.item()] * (B - 1), dtype=torch.float32, device=device)
    results: dict[int, list[int]] = {}
    step = 0
    while clips:
        logits, state = decoder.step(ys[:, -1], state)
        t_scores = torch.log_softmax(logits.float() / decoding.softmax_smoothing, dim=-1)
        if decoding.eos_penalty != 1.0:
            t_scores[:, eos] *= decoding.eos_penalty
        top_scores, top_ys = torch.topk(t_scores, k=B, dim=1)
        # A finished beam goes on with EOS at no cost; its other extensions are filler.
        top_scores = torch.where(finished, finished_scores, top_scores)
        top_ys = torch.where(finished, torch.full_like(top_ys, eos), top_ys)

        A = len(clips)
        candidates = (scores + top_scores).view(A, B * B)
        scores, best = torch.topk(candidates, k=B, dim=1)
        scores = scores.reshape(A * B, 1)
        source = (torch.div(best, B, rounding_mode="floor") + B * torch.arange(A, device=device)[:, None]).view(-1)
        tokens = torch.gather(top_ys.view(A, B * B), 1, best).view(A * B, 1)
        ys = torch.cat([ys[source], tokens], dim=1)
        state = state.select(source)
        finished = tokens == eos
        step += 1

        keep = []
        for slot, clip in enumerate(clips):
            clip_rows = slice(slot * B, (slot + 1) * B)
            if bool(finished[clip_rows].all()) or step >= limits[clip]:
                results[clip] = best_hypothesis(ys[clip_rows], scores[clip_rows, 0], eos, decoding.length_penalty)
            else:
                keep.append(slot)
        if len(keep) < len(clips):
            kept_rows = torch.tensor([slot * B + b for slot in keep for b in range(B)], dtype=torch.long, device=device)
            clips = [clips[slot] for slot in keep]
            ys, scores, finished = ys[kept_rows], scores[kept_rows], finished[kept_rows]
            state = state.select(kept_rows)
    return [results[clip] for clip in range(N)]


def best_hypothesis(ys: torch.Tensor, scores: torch.Tensor, eos: int, length_penalty: float) -> list[int]:
    """The original's final ranking of one clip's B beams: GNMT penalty on scores, top 1, tokens before EOS."""
    # The length counts every token that is not EOS, the start token included.
    lengths = torch.sum(torch.ne(ys, eos), dim=-1).int()
    if length_penalty > 0.0:
        scores = scores / torch.pow((5 + lengths.float()) / (5.0 + 1), length_penalty)
    best = int(torch.topk(scores[None], k=1, dim=1).indices[0, 0])
    return ys[best, 1 : int(lengths[best])].tolist()


class ReferenceFireRedAsrAed:
    """A FireRedASR-AED model in plain PyTorch: features, encoder, decoder, beam search and dict.txt."""

    def __init__(
        self,
        config: FireRedAsrAedConfig,
        encoder: ConformerEncoder,
        decoder: TransformerDecoder,
        feature_extractor: FireRedAsrFeatureExtractor,
        tokens: Sequence[str],
    ):
        if len(tokens) != config.vocab_size:
            raise ValueError(f"{len(tokens)} tokens for a vocabulary of {config.vocab_size}")
        self.config = config
        self.encoder = encoder.eval().requires_grad_(False)
        self.decoder = decoder.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.tokens = tuple(tokens)

    @classmethod
    def from_release(
        cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> ReferenceFireRedAsrAed:
        """Load an original FireRedASR-AED release folder (model.pth.tar, cmvn.ark, dict.txt), read safely."""
        release = discover_aed_release(Path(model_dir))
        config = release.config
        encoder = ConformerEncoder(config.encoder_config)
        encoder.load_state_dict({k.removeprefix(ENCODER_PREFIX): v for k, v in release.encoder_tensors.items()})
        decoder = TransformerDecoder(config)
        decoder.load_state_dict({k.removeprefix(DECODER_PREFIX): v for k, v in release.decoder_tensors.items()})
        mean, istd, count = spec.cmvn_from_stats(release.cmvn_stats)
        feature_extractor = FireRedAsrFeatureExtractor(
            cmvn_mean=mean.tolist(), cmvn_istd=istd.tolist(), cmvn_frame_count=count,
            max_audio_seconds=release.max_audio_seconds,
        )  # fmt: skip
        encoder.to(device=device, dtype=dtype)
        decoder.to(device=device, dtype=dtype)
        return cls(config, encoder, decoder, feature_extractor, release.tokens)

    @classmethod
    def from_pretrained(
        cls, repo: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> ReferenceFireRedAsrAed:
        """Load a converted FireRedASR-AED repo (`fireredasr-convert`, docs/format.md)."""
        repo = Path(repo)
        register_with_transformers()
        config = FireRedAsrAedConfig.from_pretrained(repo)
        weights = load_converted_weights(repo)
        # FireRedASR2-AED's CTC head (word timestamps) plays no part in decoding.
        unexpected = sorted(k for k in weights if not k.startswith((ENCODER_PREFIX, DECODER_PREFIX, CTC_PREFIX)))
        if unexpected:
            raise ValueError(f"{repo}: unexpected tensors {unexpected[:5]}; the repo is not a converted FireRedASR-AED")
        encoder = ConformerEncoder(config.encoder_config)
        encoder.load_state_dict({k.removeprefix(ENCODER_PREFIX): v for k, v in weights.items() if k.startswith(ENCODER_PREFIX)})
        decoder = TransformerDecoder(config)
        decoder.load_state_dict({k.removeprefix(DECODER_PREFIX): v for k, v in weights.items() if k.startswith(DECODER_PREFIX)})
        tokenizer = FireRedAsrAedTokenizer.from_pretrained(repo)
        encoder.to(device=device, dtype=dtype)
        decoder.to(device=device, dtype=dtype)
        return cls(config, encoder, decoder, FireRedAsrFeatureExtractor.from_pretrained(repo), tokenizer.tokens)

    @property
    def device(self) -> torch.device:
        return self.decoder.tgt_word_emb.weight.device

    def features(self, waveform: AudioClip, sampling_rate: int = spec.SAMPLE_RATE) -> torch.Tensor:
        """fbank + CMVN of one clip: [T, 80] float32; refuses clips the model cannot transcribe."""
        if sampling_rate != self.feature_extractor.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz; resample it to {self.feature_extractor.sampling_rate} Hz first"
            )
        samples = torch.as_tensor(waveform)
        if not samples.is_floating_point():
            raise ValueError(
                f"audio must be floating point in [-1, 1], got {samples.dtype}; divide integer PCM by "
                f"{spec.SAMPLE_SCALE:g}"
            )
        # The decoder needs one encoder frame: no adapter stacks frames here.
        self.feature_extractor.validate_waveform(samples, downsample_rate=1)
        return self.feature_extractor.compute_features(samples.to(device="cpu", dtype=torch.float32))

    @torch.inference_mode()
    def encode(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Clips' features [T_i, 80] -> the padded encoder output [N, E_max, d] and each clip's E_i = ceil(T_i / 4)."""
        padded = nn.utils.rnn.pad_sequence(list(features), batch_first=True).to(self.device)
        return self.encoder(padded, [f.shape[0] for f in features])

    @torch.inference_mode()
    def generate_ids(
        self,
        waveforms: Sequence[AudioClip],
        decoding: AedDecoding = AED_RECIPE,
        sampling_rate: int = spec.SAMPLE_RATE,
    ) -> list[list[int]]:
        """Decode clips as one batch; each clip's tokens before EOS (the original's `yseq`)."""
        if not waveforms:
            return []
        features = [self.features(waveform, sampling_rate) for waveform in waveforms]
        encoder_out, enc_lengths = self.encode(features)
        return batch_beam_search(self.decoder, encoder_out, enc_lengths, decoding)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The original's detokenize: tokens joined, SentencePiece's word marker as a space, ends stripped."""
        return "".join(self.tokens[i] for i in token_ids).replace(aed_spec.SPM_SPACE, " ").strip()

    def transcribe(
        self,
        waveforms: Sequence[AudioClip],
        decoding: AedDecoding = AED_RECIPE,
        sampling_rate: int = spec.SAMPLE_RATE,
    ) -> list[AedTranscription]:
        """Transcribe 16 kHz mono clips in [-1, 1] as one batch (the README's recipe by default)."""
        return [
            AedTranscription(text=self.detokenize(ids), token_ids=ids)
            for ids in self.generate_ids(waveforms, decoding, sampling_rate)
        ]
