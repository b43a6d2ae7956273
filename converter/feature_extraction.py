"""The FireRedASR front-end: 80-bin Kaldi fbank + CMVN, vectorised in PyTorch.

The original computes features with kaldi-native-fbank one frame at a time on
16-bit integer-scale samples; this module computes the same features for all
frames at once (framing by striding, one batched FFT, one mel matmul).
`FireRedAsrFeatureExtractor` is a Hugging Face feature extractor, so a converted
repo's `preprocessor_config.json` loads with `from_pretrained`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor

from .spec import (
    FRAME_LENGTH_SAMPLES,
    FRAME_SHIFT_SAMPLES,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    SAMPLE_SCALE,
    check_max_audio_seconds,
    fbank_frame_count,
    min_samples_for_one_embedding,
)

# The options the original sets or inherits from kaldi-native-fbank's defaults.
# They are written into preprocessor_config.json so the front-end is documented
# where the model is; the implementation below supports exactly these.
KALDI_FBANK_OPTIONS = {
    "sample_frequency": SAMPLE_RATE,
    "frame_length_ms": 1000.0 * FRAME_LENGTH_SAMPLES / SAMPLE_RATE,
    "frame_shift_ms": 1000.0 * FRAME_SHIFT_SAMPLES / SAMPLE_RATE,
    "num_mel_bins": NUM_MEL_BINS,
    "dither": 0.0,
    "snip_edges": True,
    "remove_dc_offset": True,
    "preemphasis_coefficient": 0.97,
    "window_type": "povey",
    "round_to_power_of_two": True,
    "low_freq": 20.0,
    "high_freq": 0.0,
    "use_energy": False,
    "use_log_fbank": True,
    "use_power": True,
    "sample_scale": SAMPLE_SCALE,
}

_FFT_SIZE = 1 << (FRAME_LENGTH_SAMPLES - 1).bit_length()  # 512: next power of two
_LOG_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi floors mel energies at FLT_EPSILON


def _is_finite_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _mel_scale(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(freq / 700.0)


@functools.lru_cache(maxsize=8)
def _povey_window(device: torch.device) -> torch.Tensor:
    n = np.arange(FRAME_LENGTH_SAMPLES, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (FRAME_LENGTH_SAMPLES - 1))
    return torch.from_numpy(hann**0.85).to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=8)
def _mel_banks(device: torch.device) -> torch.Tensor:
    """Kaldi's triangular mel filters as a [fft_size/2 + 1, num_mel_bins] matrix."""
    opts = KALDI_FBANK_OPTIONS
    nyquist = 0.5 * SAMPLE_RATE
    high_freq = opts["high_freq"] if opts["high_freq"] > 0 else nyquist + opts["high_freq"]
    mel_low, mel_high = _mel_scale(np.float64(opts["low_freq"])), _mel_scale(np.float64(high_freq))
    mel_delta = (mel_high - mel_low) / (NUM_MEL_BINS + 1)
    left = mel_low + mel_delta * np.arange(NUM_MEL_BINS, dtype=np.float64)
    center, right = left + mel_delta, left + 2.0 * mel_delta
    # Kaldi spreads the filters over the fft_size/2 bins below Nyquist; the Nyquist bin gets no weight.
    bin_mel = _mel_scale(np.arange(_FFT_SIZE // 2, dtype=np.float64) * SAMPLE_RATE / _FFT_SIZE)[:, None]
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    weights = np.where(bin_mel <= center, rising, falling)
    weights = np.where((bin_mel > left) & (bin_mel < right), weights, 0.0)
    weights = np.concatenate([weights, np.zeros((1, NUM_MEL_BINS))], axis=0)
    return torch.from_numpy(weights).to(device=device, dtype=torch.float32)


def kaldi_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """80-bin log-mel fbank of a 16 kHz mono waveform in [-1, 1]: [frames, 80] float32.

    Matches kaldi-native-fbank with the original's options on 16-bit integer-scale samples.
    """
    samples = waveform.to(torch.float32).reshape(-1) * SAMPLE_SCALE
    num_frames = fbank_frame_count(samples.numel())
    if num_frames == 0:
        return samples.new_zeros((0, NUM_MEL_BINS))
    frames = samples.as_strided((num_frames, FRAME_LENGTH_SAMPLES), (FRAME_SHIFT_SAMPLES, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    # Kaldi's pre-emphasis uses the first sample itself as its predecessor.
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - KALDI_FBANK_OPTIONS["preemphasis_coefficient"] * previous) * _povey_window(frames.device)
    spectrum = torch.fft.rfft(frames, n=_FFT_SIZE)
    power = spectrum.real.square() + spectrum.imag.square()
    mel_energies = power @ _mel_banks(frames.device)
    return mel_energies.clamp_min(_LOG_FLOOR).log()


class FireRedAsrFeatureExtractor(SequenceFeatureExtractor):
    """Kaldi fbank + CMVN for FireRedASR-LLM; `input_features` [B, T_max, 80], `feature_lengths` [B]."""

    model_input_names = ["input_features", "feature_lengths"]

    def __init__(
        self,
        cmvn_mean: Sequence[float] | None = None,
        cmvn_istd: Sequence[float] | None = None,
        cmvn_frame_count: float | None = None,
        max_audio_seconds: float = 30.0,
        feature_size: int = NUM_MEL_BINS,
        sampling_rate: int = SAMPLE_RATE,
        padding_value: float = 0.0,
        fbank_options: dict | None = None,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs
        )
        if feature_size != NUM_MEL_BINS or sampling_rate != SAMPLE_RATE:
            raise ValueError(
                f"FireRedASR features are {NUM_MEL_BINS}-bin fbank at {SAMPLE_RATE} Hz; "
                f"got feature_size={feature_size}, sampling_rate={sampling_rate}"
            )
        if fbank_options is not None and fbank_options != KALDI_FBANK_OPTIONS:
            changed = sorted(k for k in set(fbank_options) | set(KALDI_FBANK_OPTIONS)
                             if fbank_options.get(k) != KALDI_FBANK_OPTIONS.get(k))
            raise ValueError(f"unsupported fbank options {changed}: only the original's options are implemented")
        if (cmvn_mean is None) != (cmvn_istd is None):
            raise ValueError("cmvn_mean and cmvn_istd must be given together")
        # A repo's preprocessor_config.json is data from elsewhere: every number is checked here,
        # where it enters, so NaN or text never reaches the features or the memory bound.
        for name, values in (("cmvn_mean", cmvn_mean), ("cmvn_istd", cmvn_istd)):
            if values is None:
                continue
            if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != feature_size:
                raise ValueError(f"{name} must hold {feature_size} numbers")
            if not all(_is_finite_number(v) for v in values):
                raise ValueError(f"{name} holds a value that is not a finite number")
        if cmvn_istd is not None and not all(v > 0 for v in cmvn_istd):
            raise ValueError("cmvn_istd holds a value that is not positive")
        if cmvn_frame_count is not None and not (_is_finite_number(cmvn_frame_count) and cmvn_frame_count >= 1):
            raise ValueError(f"cmvn_frame_count {str(cmvn_frame_count)[:40]!r} is not a finite count >= 1")
        self.cmvn_mean = None if cmvn_mean is None else [float(v) for v in cmvn_mean]
        self.cmvn_istd = None if cmvn_istd is None else [float(v) for v in cmvn_istd]
        self.cmvn_frame_count = None if cmvn_frame_count is None else float(cmvn_frame_count)
        try:
            self.max_audio_seconds = check_max_audio_seconds(max_audio_seconds)
        except ValueError as error:
            raise ValueError(f"max_audio_seconds: {error}") from None
        self.fbank_options = dict(KALDI_FBANK_OPTIONS)

    @property
    def max_samples(self) -> int:
        return int(round(self.max_audio_seconds * self.sampling_rate))

    def validate_waveform(self, waveform: np.ndarray | torch.Tensor, downsample_rate: int = 2) -> None:
        """Raise a ValueError naming the problem if the clip cannot be transcribed."""
        shape = tuple(waveform.shape)
        if len(shape) != 1:
            raise ValueError(f"audio must be a mono 1-D waveform, got shape {shape}; downmix it first")
        num_samples = shape[0]
        if num_samples == 0:
            raise ValueError("audio is empty")
        shortest = min_samples_for_one_embedding(downsample_rate)
        if num_samples < shortest:
            raise ValueError(
                f"audio is too short: {num_samples} samples ({1000 * num_samples / self.sampling_rate:.1f} ms) "
                f"at {self.sampling_rate} Hz; at least {shortest} samples "
                f"({1000 * shortest / self.sampling_rate:.0f} ms) are needed for one speech embedding"
            )
        if num_samples > self.max_samples:
            raise ValueError(
                f"audio is too long: {num_samples / self.sampling_rate:.2f} s; the maximum is "
                f"{self.max_audio_seconds:g} s (max_audio_seconds); split it into shorter segments"
            )
        finite = torch.isfinite(torch.as_tensor(waveform)).all()
        if not bool(finite):
            raise ValueError("audio contains NaN or infinite samples")

    def compute_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """fbank + CMVN of one 16 kHz mono waveform in [-1, 1]: [T, 80] float32."""
        features = kaldi_fbank(waveform)
        if self.cmvn_mean is not None:
            mean = torch.tensor(self.cmvn_mean, dtype=torch.float64)
            istd = torch.tensor(self.cmvn_istd, dtype=torch.float64)
            # The original applies float64 statistics to float32 features, then casts to float32.
            features = ((features.to(torch.float64) - mean) * istd).to(torch.float32)
        return features

    def __call__(
        self,
        raw_speech: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz; resample it to {self.sampling_rate} Hz first"
            )
        single = isinstance(raw_speech, (np.ndarray, torch.Tensor)) and raw_speech.ndim == 1
        clips = [raw_speech] if single else list(raw_speech)
        features = [self.compute_features(torch.as_tensor(np.asarray(clip, dtype=np.float32))) for clip in clips]
        lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.int64)
        padded = torch.full(
            (len(features), max((f.shape[0] for f in features), default=0), self.feature_size),
            self.padding_value,
            dtype=torch.float32,
        )
        for row, feature in zip(padded, features):
            row[: feature.shape[0]] = feature
        return BatchFeature({"input_features": padded, "feature_lengths": lengths}, tensor_type=return_tensors)
