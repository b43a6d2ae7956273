"""Tolerances for comparing two computations of the same numbers, derived from the arithmetic.

Two float32 evaluations of a sum of n terms that add them in another order (another SIMD
width, blocking or thread count: another CPU, see `make test-portable`) differ by at most
about n * eps * sum(|terms|): each order's error is at most (n - 1) * u * sum(|terms|),
u = eps / 2 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 4.2).
A network's output carries the rounding of every reduction on its path; to first order
those errors add (the layers here are normalised: gains about 1), so n below is the sum of
the reduction lengths along the path and `scale` the size of the values summed.
Never tune these numbers to a machine: count the arithmetic.
"""

from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23
F64_EPS = float(np.finfo(np.float64).eps)  # 2**-52
# Unit roundoff (half an ulp) of the half-precision formats: each rounding to them
# changes a value by at most this relative amount.
BF16_UNIT_ROUNDOFF = 2.0**-8
FP16_UNIT_ROUNDOFF = 2.0**-11


def float32_atol(reduction_length: int, scale: float = 1.0) -> float:
    """How far two float32 evaluations of the same reductions (summed length n, terms of size `scale`) may drift apart."""
    return reduction_length * F32_EPS * max(float(scale), 1.0)


def conformer_reduction_length(d_model: int, encoder_frames: int, kernel_size: int) -> int:
    """Terms summed along one output's path through one Conformer block (`fireredasr_vllm.conformer`).

    Macaron FFNs twice (LayerNorm d, d -> 4d, 4d -> d), attention (LayerNorms and
    projections d, relative positions d, content and position scores d_k each
    (counted as d), softmax over the T keys and the context over T, output d), the
    convolution module (LayerNorm d, pointwise d, depthwise kernel, pointwise d) and
    the final LayerNorm d.
    """
    ffn = d_model + d_model + 4 * d_model
    attention = d_model + d_model + d_model + 2 * d_model + 2 * encoder_frames + d_model
    convolution = d_model + d_model + kernel_size + d_model
    return 2 * ffn + attention + convolution + d_model


def speech_encoder_reduction_length(
    d_model: int, n_layers: int, encoder_frames: int, kernel_size: int, llm_hidden: int, channels: int = 32
) -> int:
    """Terms summed along one speech embedding's path: subsampling, the Conformer blocks, the projector.

    Subsampling: 3x3 conv over 1 channel, 3x3 conv over `channels`, linear over
    channels * 19 frequency bins; projector: linear over 2 stacked frames, linear over
    the LLM width.
    """
    subsampling = 9 + 9 * channels + channels * 19
    blocks = n_layers * conformer_reduction_length(d_model, encoder_frames, kernel_size)
    return subsampling + blocks + 2 * d_model + llm_hidden


# Half-precision roundings along one speech embedding's path (`fireredasr_vllm.conformer`):
# every op's output and every weight is rounded once. Per Conformer block: the FFNs 2 x
# (LayerNorm, linear, SiLU, linear, residual) = 10, attention (3 LayerNorms, 3 projections,
# position projection, score sum, scaling, softmax, context, output, residual) = 13, the
# convolution module (LayerNorm, pointwise, GLU, depthwise, BatchNorm, SiLU, pointwise,
# residual) = 8, final LayerNorm 1, and 7 weight matrices: 39. Subsampling (input, 2 convs,
# 2 ReLUs, linear, 3 weights) 9; projector (2 linears, ReLU, 2 weights) 5.
def half_precision_roundings(n_layers: int) -> int:
    return 9 + 39 * n_layers + 5


def half_precision_relative_norm_bound(unit_roundoff: float, roundings: int) -> float:
    """Relative norm error after `roundings` sequential roundings of unit roundoff u: 5 * sqrt(n) * u.

    Rounding errors behave as independent zero-mean variables, so they grow as sqrt(n) u,
    and exceed lambda * sqrt(n) u with probability below 2 exp(-lambda^2 / 2) per value
    (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019); lambda = 5: below 1e-5.
    """
    return 5.0 * roundings**0.5 * unit_roundoff


def fbank_atol(waveform: np.ndarray, log_mel: np.ndarray) -> np.ndarray:
    """Per-value bound on |ours - kaldi-native-fbank| for the log-mel fbank of a 16 kHz waveform in [-1, 1].

    Both compute in float32 in different orders. Relative to the windowed frame's norm,
    the FFT's input and output carry at most eta = 55 eps: the 512-point FFT about
    5 eps per radix-2 stage (9 stages; Higham sec. 24.1), the frame-mean removal 400 u
    of which pre-emphasis keeps 3 %, pre-emphasis and window 3 eps. A band energy
    E = sum_k w_k |X_k|^2 (w_k <= 1) then moves by at most 2 eta sqrt(P E) (Cauchy-Schwarz;
    P the frame's spectral power), plus its own sum of W terms; log turns that into
    dE / E. Both sides err: twice that, plus the log's last-bit rounding. Bands far below
    the frame's power are the uncertain ones, and get the larger bound.
    """
    from fireredasr_converter.feature_extraction import KALDI_FBANK_OPTIONS, _mel_banks

    length, shift, fft_size = 400, 160, 512
    samples = np.asarray(waveform, dtype=np.float64) * 32768.0
    starts = np.arange(log_mel.shape[0]) * shift
    frames = np.stack([samples[s : s + length] for s in starts])
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    n = np.arange(length)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1))) ** 0.85
    windowed = (frames - KALDI_FBANK_OPTIONS["preemphasis_coefficient"] * previous) * window
    power = fft_size * (windowed**2).sum(axis=1, keepdims=True)  # Parseval: all bins, both sides
    band_width = int((_mel_banks(None).numpy() > 0).sum(axis=0).max())
    energies = np.exp(log_mel.astype(np.float64))
    eta = (9 * 5 + 6 + 3) * F32_EPS
    relative = 2 * eta * np.sqrt(power / energies) + (band_width + 2) * F32_EPS
    return 2 * relative + 2 * F32_EPS * np.abs(log_mel)


def aed_decoder_reduction_length(d_model: int, n_layers: int, tokens: int, encoder_frames: int) -> int:
    """Terms summed along one logit's path through FireRedASR-AED's decoder (`fireredasr_vllm.aed_reference`).

    Per layer: self-attention (LayerNorm d, projections d, scores d_k (counted as d),
    softmax and context over the tokens, output d), cross-attention (the same over
    the encoder frames), the MLP (LayerNorm d, d -> 4d, 4d -> d); then the final
    LayerNorm d and the tied projection d.
    """
    self_attention = d_model + d_model + d_model + 2 * tokens + d_model
    cross_attention = d_model + d_model + d_model + 2 * encoder_frames + d_model
    mlp = d_model + d_model + 4 * d_model
    return n_layers * (self_attention + cross_attention + mlp) + 2 * d_model
