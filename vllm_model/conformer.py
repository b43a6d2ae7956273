"""FireRedASR's Conformer encoder and speech adapter, for batched inference.

Module and parameter names follow the released checkpoint (`encoder.*` minus the
prefix, `encoder_projector.*`), so converted weights load with a plain
`load_state_dict`. Training-only pieces (dropout) are left out.

Masking follows the first FireRedASR release: a clip of T fbank frames owns the
first `ceil(T / 4)` encoder frames. In a padded batch the frames beyond that are
masked as attention keys and zeroed inside the convolution module, so every clip
gets exactly the encoder output it gets on its own.

Device discipline, for vLLM's GPU runners: every parameter and buffer is created
on the default device and dtype the caller builds the module under (vLLM builds
it under its device context and never moves it), and clip lengths travel as
Python ints, so a forward pass neither moves tensors between devices nor waits
for the device to read a length back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fireredasr_converter import spec
from fireredasr_converter.configuration import FireRedAsrEncoderConfig, FireRedAsrLlmConfig


class RelativePositionalEncoding(nn.Module):
    """The relative sinusoidal table `pe`: [1, 2 * max_len - 1, d], row max_len - 1 is distance 0."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        # The checkpoint carries this table as a buffer; the weights' copy is what runs.
        # It is computed on the CPU in float32 (the original's arithmetic), then placed
        # like every parameter: on the default device and dtype of the caller.
        table = spec.relative_position_table(d_model, max_len)
        self.register_buffer(
            "pe", table.to(device=torch.get_default_device(), dtype=torch.get_default_dtype())
        )

    def forward(self, length: int) -> torch.Tensor:
        """Embeddings of relative positions length-1 down to -(length-1): [2*length-1, d]."""
        if length > self.max_len:
            seconds = self.max_len * spec.ENCODER_SUBSAMPLING * spec.FRAME_SHIFT_SAMPLES / spec.SAMPLE_RATE
            raise ValueError(
                f"{length} encoder frames exceed the relative position table's {self.max_len} "
                f"({seconds:.0f} s of audio); split the audio into shorter clips"
            )
        center = self.max_len - 1
        return self.pe[0, center - length + 1 : center + length]


class Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions over (time, frequency), then a linear map to d_model."""

    def __init__(self, idim: int, d_model: int, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 2),
            nn.ReLU(),
        )
        self.out = nn.Linear(channels * spec.subsampled_feature_width(idim), d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, idim] -> [B, (((T - 3) // 2 + 1) - 3) // 2 + 1, d_model]."""
        x = self.conv(features.unsqueeze(1))
        batch, channels, frames, freq = x.shape
        return self.out(x.transpose(1, 2).reshape(batch, frames, channels * freq))


class ConformerFeedForward(nn.Module):
    def __init__(self, d_model: int, eps: float):
        super().__init__()
        # Checkpoint names: net.0 (LayerNorm), net.1 and net.4 (the linears);
        # indices 3 and 5 held dropout during training.
        self.net = nn.Sequential(
            OrderedDict(
                [
                    ("0", nn.LayerNorm(d_model, eps=eps)),
                    ("1", nn.Linear(d_model, 4 * d_model)),
                    ("2", nn.SiLU()),
                    ("4", nn.Linear(4 * d_model, d_model)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """[..., T, 2T-1] scores against relative positions T-1..-(T-1) -> [..., T, T] by key.

    Query i and key j are at relative position i - j, which is column T-1-i+j of
    row i. For a contiguous tensor that is a strided view: start at column T-1
    and advance 2T-2 elements per row, so no copy or index tensor is needed.
    """
    scores = scores.contiguous()
    *lead, length, width = scores.shape
    return scores.as_strided(
        (*lead, length, length),
        (*scores.stride()[:-2], width - 1, 1),
        scores.storage_offset() + length - 1,
    )


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL self-attention with pre-LayerNorms on query, key and value inputs."""

    def __init__(self, d_model: int, n_head: int, eps: float):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.scale = self.head_dim**-0.5
        self.layer_norm_q = nn.LayerNorm(d_model, eps=eps)
        self.layer_norm_k = nn.LayerNorm(d_model, eps=eps)
        self.layer_norm_v = nn.LayerNorm(d_model, eps=eps)
        self.w_qs = nn.Linear(d_model, d_model, bias=False)
        self.w_ks = nn.Linear(d_model, d_model, bias=False)
        self.w_vs = nn.Linear(d_model, d_model, bias=False)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.head_dim))
        self.fc = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, T, d], pos_emb [2T-1, d], key_bias [B, 1, 1, T] (0 or -inf) or None."""
        batch, length, _ = x.shape
        heads, head_dim = self.n_head, self.head_dim
        # [B, T, H, Dh]; the position biases are added before the heads move forward.
        query = self.w_qs(self.layer_norm_q(x)).view(batch, length, heads, head_dim)
        key = self.w_ks(self.layer_norm_k(x)).view(batch, length, heads, head_dim).transpose(1, 2)
        value = self.w_vs(self.layer_norm_v(x)).view(batch, length, heads, head_dim).transpose(1, 2)
        position = self.linear_pos(pos_emb).view(2 * length - 1, heads, head_dim).transpose(0, 1)

        position_scores = torch.matmul(
            (query + self.pos_bias_v).transpose(1, 2), position.transpose(-2, -1)
        )
        # The relative-position term enters as an additive bias next to the key
        # padding; the fused kernel then adds the content term (q + u) k^T,
        # scales by 1/sqrt(d_k) and applies the softmax without materialising
        # the scores twice.
        bias = relative_shift(position_scores) * self.scale
        # The raw [B, H, T, 2T-1] scores are dead from here on; the key padding goes in
        # in place, so the attention's peak holds one [B, H, T, T] temporary, not three.
        del position_scores
        if key_bias is not None:
            bias += key_bias
        context = F.scaled_dot_product_attention(
            (query + self.pos_bias_u).transpose(1, 2), key, value, attn_mask=bias, scale=self.scale
        )
        # The residual is the un-normalised input.
        return x + self.fc(context.transpose(1, 2).reshape(batch, length, heads * head_dim))


class ConformerConvolution(nn.Module):
    def __init__(self, d_model: int, kernel_size: int, eps: float):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.pre_layer_norm = nn.LayerNorm(d_model, eps=eps)
        self.pointwise_conv1 = nn.Conv1d(d_model, 4 * d_model, kernel_size=1, bias=False)
        self.depthwise_conv = nn.Conv1d(
            2 * d_model,
            2 * d_model,
            kernel_size,
            padding=(kernel_size - 1) // 2,
            groups=2 * d_model,
            bias=False,
        )
        # A LayerNorm in the checkpoint, whatever its name says.
        self.batch_norm = nn.LayerNorm(2 * d_model, eps=eps)
        self.pointwise_conv2 = nn.Conv1d(2 * d_model, d_model, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, d]; padding [B, T, 1] True at frames beyond a clip's length, or None."""
        out = self.pre_layer_norm(x)
        if padding is not None:
            # Zeroed padding is what the depthwise kernel of a clip's last frames
            # sees, exactly as the zero padding of a lone clip.
            out.masked_fill_(padding, 0.0)
        # The pointwise convolutions are linears over channels; applying them
        # time-major avoids two transposes.
        out = F.glu(F.linear(out, self.pointwise_conv1.weight.squeeze(-1)), dim=-1)
        out = self.depthwise_conv(out.transpose(1, 2)).transpose(1, 2)
        out = F.silu(self.batch_norm(out))
        out = F.linear(out, self.pointwise_conv2.weight.squeeze(-1))
        if padding is not None:
            out.masked_fill_(padding, 0.0)
        return x + out


class RelPosConformerBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, kernel_size: int, eps: float):
        super().__init__()
        self.ffn1 = ConformerFeedForward(d_model, eps)
        self.mhsa = RelPositionMultiHeadAttention(d_model, n_head, eps)
        self.conv = ConformerConvolution(d_model, kernel_size, eps)
        self.ffn2 = ConformerFeedForward(d_model, eps)
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        key_bias: torch.Tensor | None,
        padding: torch.Tensor | None,
    ) -> torch.Tensor:
        # Macaron feed-forwards: two half steps around attention and convolution.
        x = x + 0.5 * self.ffn1(x)
        x = self.mhsa(x, pos_emb, key_bias)
        x = self.conv(x, padding)
        x = x + 0.5 * self.ffn2(x)
        return self.layer_norm(x)


def padding_mask(lengths: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """[B, width] bool, True at positions >= each row's length.

    Filled row by row from the Python ints: no length tensor is copied to the device
    and nothing is read back, so the host never waits for the device here.
    """
    mask = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
    for row, length in enumerate(lengths):
        mask[row, length:] = True
    return mask


class ConformerEncoder(nn.Module):
    """Conv2d subsampling (x4) + relative-position Conformer blocks."""

    def __init__(self, config: FireRedAsrEncoderConfig):
        super().__init__()
        if config.subsampling_rate != spec.ENCODER_SUBSAMPLING:
            raise ValueError(
                f"subsampling_rate {config.subsampling_rate} is not supported: the Conformer's "
                f"input layer subsamples by {spec.ENCODER_SUBSAMPLING}"
            )
        self.config = config
        eps = config.layer_norm_eps
        self.input_preprocessor = Conv2dSubsampling(
            config.idim, config.d_model, config.subsampling_channels
        )
        self.positional_encoding = RelativePositionalEncoding(
            config.d_model, config.relative_position_max_len
        )
        self.layer_stack = nn.ModuleList(
            RelPosConformerBlock(config.d_model, config.n_head, config.kernel_size, eps)
            for _ in range(config.n_layers)
        )

    def forward(
        self, features: torch.Tensor, num_frames: Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """features [B, T_max, idim] (any padding value), num_frames: B valid fbank frame counts.

        Returns hidden [B, E_max, d] and enc_lengths, B ints = ceil(num_frames / 4);
        rows beyond a clip's enc_length are padding.
        """
        if features.dim() != 3 or features.shape[-1] != self.config.idim:
            raise ValueError(
                f"features must be [batch, frames, {self.config.idim}], got {tuple(features.shape)}"
            )
        if len(num_frames) != features.shape[0]:
            raise ValueError(
                f"num_frames must hold one length per clip ({features.shape[0]}), got {len(num_frames)}"
            )
        num_frames = [int(n) for n in num_frames]
        shortest, longest = min(num_frames), max(num_frames)
        if shortest < 1 or longest > features.shape[1]:
            raise ValueError(
                f"num_frames must lie in [1, {features.shape[1]}] (the padded length), "
                f"got values from {shortest} to {longest}"
            )
        enc_lengths = [spec.encoder_frame_count(n) for n in num_frames]
        pos_emb = self.positional_encoding(spec.encoder_frame_count(longest))

        features = features[:, :longest].to(self.input_preprocessor.out.weight.dtype)
        key_bias = padding = None
        if shortest != longest:
            frame_padding = padding_mask(num_frames, longest, features.device)
            features = features.masked_fill(frame_padding.unsqueeze(-1), 0.0)
        # The trailing zero frames make a lone clip of T frames yield exactly
        # ceil(T / 4) encoder frames.
        features = F.pad(features, (0, 0, 0, spec.ENCODER_INPUT_PADDING))
        hidden = self.input_preprocessor(features)

        if shortest != longest:
            encoder_padding = padding_mask(enc_lengths, hidden.shape[1], hidden.device)
            key_bias = torch.zeros(encoder_padding.shape, dtype=hidden.dtype, device=hidden.device)
            key_bias = key_bias.masked_fill(encoder_padding, float("-inf"))[:, None, None, :]
            padding = encoder_padding.unsqueeze(-1)
        pos_emb = pos_emb.to(hidden.dtype)
        for block in self.layer_stack:
            hidden = block(hidden, pos_emb, key_bias, padding)
        return hidden, enc_lengths


class SpeechAdapter(nn.Module):
    """Concatenates `downsample_rate` consecutive encoder frames and projects them to the LLM width."""

    def __init__(self, encoder_dim: int, llm_dim: int, downsample_rate: int = 2):
        super().__init__()
        self.downsample_rate = downsample_rate
        self.linear1 = nn.Linear(encoder_dim * downsample_rate, llm_dim)
        self.linear2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """[..., F, encoder_dim] -> [..., F // rate, llm_dim]; leftover frames are dropped."""
        *lead, length, dim = frames.shape
        groups = length // self.downsample_rate
        stacked = frames[..., : groups * self.downsample_rate, :].reshape(
            *lead, groups, dim * self.downsample_rate
        )
        return self.linear2(F.relu(self.linear1(stacked)))


# A padded batch holds clips no shorter than this fraction of its longest clip, so at
# most a quarter of the frames the encoder runs (and less of its attention) is padding
# (measured against one padded batch and one clip at a time in docs/benchmarks.md).
MIN_BATCH_FILL = 0.75


def length_groups(
    lengths: Sequence[int], min_fill: float = MIN_BATCH_FILL, max_padded_frames: int | None = None
) -> list[list[int]]:
    """Indices of `lengths` in groups, longest first.

    Each group's shortest is >= min_fill x its longest, and, given
    `max_padded_frames`, its size x its longest is at most that (a clip longer than
    the cap goes alone).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    groups: list[list[int]] = []
    for index in order:
        if groups:
            longest = lengths[groups[-1][0]]
            fits = max_padded_frames is None or (len(groups[-1]) + 1) * longest <= max_padded_frames
            if fits and lengths[index] >= min_fill * longest:
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


def profiled_frame_budget(num_frames: Sequence[int], max_clip_frames: int, downsample_rate: int) -> int:
    """The padded fbank frames one encoder forward may hold so it never exceeds start-up profiling.

    vLLM profiles the encoder once at start-up with K clips of the longest accepted
    length (K x max_clip_frames padded frames, K = how many such clips fit its
    encoder budget and its request limit), and never schedules more speech
    embeddings in one call than K such clips carry. So a call carrying S embeddings
    has S // N_max <= K, and capping each forward at max(1, S // N_max) longest
    clips' worth of frames keeps every run inside what profiling measured.
    """
    per_longest_clip = spec.speech_embedding_count(max_clip_frames, downsample_rate)
    carried = sum(spec.speech_embedding_count(n, downsample_rate) for n in num_frames)
    return max(1, carried // max(1, per_longest_clip)) * max_clip_frames


class SpeechEncoder(nn.Module):
    """Conformer + adapter: fbank features -> per-clip speech embeddings for the LLM."""

    def __init__(self, config: FireRedAsrLlmConfig):
        super().__init__()
        self.downsample_rate = config.encoder_downsample_rate
        self.encoder = ConformerEncoder(config.encoder_config)
        self.encoder_projector = SpeechAdapter(
            config.encoder_config.d_model,
            config.text_config.hidden_size,
            config.encoder_downsample_rate,
        )

    def forward(self, features: torch.Tensor, num_frames: Sequence[int]) -> list[torch.Tensor]:
        """features [B, T_max, idim], num_frames: B ints -> B tensors [N_i, llm_hidden].

        N_i = spec.speech_embedding_count(num_frames[i]); each clip's rows equal
        its batch-size-1 rows.
        """
        hidden, _ = self.encoder(features, num_frames)
        counts = [spec.speech_embedding_count(int(n), self.downsample_rate) for n in num_frames]
        # Only whole frame groups of each clip reach the adapter: packing them
        # clip after clip keeps every group inside its clip and skips padding.
        used = torch.cat([rows[: count * self.downsample_rate] for rows, count in zip(hidden, counts)])
        return list(self.encoder_projector(used).split(counts))

    def encode_clips(
        self, clips: Sequence[torch.Tensor], max_clip_frames: int | None = None
    ) -> list[torch.Tensor]:
        """Clips [T_i, idim] of any lengths -> [N_i, llm_hidden] each, in the order given.

        Clips of similar length are batched together (`length_groups`) so that little
        of the encoder's work is padding; every clip still gets its batch-size-1 rows.
        With `max_clip_frames` (the longest clip the front-end accepts), no forward
        pads more frames than `profiled_frame_budget` allows.
        """
        lengths = [clip.shape[0] for clip in clips]
        budget = (
            None
            if max_clip_frames is None
            else profiled_frame_budget(lengths, max_clip_frames, self.downsample_rate)
        )
        embeddings: list[torch.Tensor | None] = [None] * len(clips)
        for group in length_groups(lengths, max_padded_frames=budget):
            features = nn.utils.rnn.pad_sequence([clips[i] for i in group], batch_first=True)
            for index, rows in zip(group, self(features, [lengths[i] for i in group])):
                embeddings[index] = rows
        return embeddings
