"""The facts of FireRedASR-LLM that every part of the project shares.

The converter, the reference implementation, the vLLM plugin and the tests all
import these definitions; none of them restates a length formula, the prompt or
the CMVN maths on its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# --- audio front-end --------------------------------------------------------

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_SAMPLES = 400  # 25 ms at 16 kHz
FRAME_SHIFT_SAMPLES = 160  # 10 ms at 16 kHz
# The original feeds kaldi-native-fbank 16-bit integer-scale samples.
SAMPLE_SCALE = 32768.0
# Kaldi floors variances at this value before taking 1/sqrt.
CMVN_VARIANCE_FLOOR = 1e-20

# --- encoder geometry -------------------------------------------------------

# Conv2dSubsampling: two 3x3 stride-2 convolutions with 32 output channels each.
ENCODER_SUBSAMPLING = 4
SUBSAMPLING_CHANNELS = 32
# Zero frames the original appends to the features before subsampling
# (the subsampling context of 7 frames minus one).
ENCODER_INPUT_PADDING = 6
# The relative position table always has max_len 5000 in the original: the
# encoder constructor never passes `pe_maxlen` on.
RELATIVE_POSITION_MAX_LEN = 5000


def subsampled_feature_width(idim: int) -> int:
    """Width of the feature axis after Conv2dSubsampling's two unpadded 3x3 stride-2 convolutions."""
    return ((idim - 1) // 2 - 1) // 2


def relative_position_table(d_model: int, max_len: int = RELATIVE_POSITION_MAX_LEN) -> torch.Tensor:
    """The Conformer's relative sinusoidal position table, [1, 2 * max_len - 1, d_model] float32.

    Row j encodes the relative distance r = max_len - 1 - j (from max_len - 1 down
    to -(max_len - 1)): even columns sin(r * w_i), odd columns cos(r * w_i) with
    w_i = 10000^(-2i / d_model). The checkpoints store it as the buffer
    `encoder.positional_encoding.pe`; the arithmetic follows the original in float32
    (including its float32 log(10000)) so the values match that buffer bit for bit.
    """
    if d_model % 2:
        raise ValueError(f"the relative position table needs an even d_model, got {d_model}")
    # Explicit device and dtype: callers may run under a meta or bf16 default (vLLM's model init).
    cpu32 = {"device": "cpu", "dtype": torch.float32}
    log_base = torch.log(torch.tensor(10000.0, **cpu32)).item()
    inv_freq = torch.exp(torch.arange(0, d_model, 2, **cpu32) * -(log_base / d_model))
    distance = torch.arange(max_len - 1, -max_len, -1, **cpu32).unsqueeze(1)
    angles = distance * inv_freq
    table = torch.empty(2 * max_len - 1, d_model, **cpu32)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.unsqueeze(0)


# --- prompt and special tokens ----------------------------------------------

SPEECH_TOKEN = "<speech>"
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
QWEN2_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
TRANSCRIBE_INSTRUCTION = "请转写音频为文字"

# --- LoRA --------------------------------------------------------------------

LORA_DEFAULT_ALPHA = 16
LORA_TARGET_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def transcription_prompt(speech_placeholder: str = SPEECH_TOKEN) -> str:
    """The decoding prompt of the original: one user turn, no system turn."""
    return (
        f"{BOS_TOKEN}user\n{speech_placeholder}{TRANSCRIBE_INSTRUCTION}{EOS_TOKEN}\n"
        f"{BOS_TOKEN}assistant\n"
    )


def fbank_frame_count(num_samples: int) -> int:
    """Frames Kaldi's fbank yields with snip_edges=true for 16 kHz audio."""
    if num_samples < FRAME_LENGTH_SAMPLES:
        return 0
    return 1 + (num_samples - FRAME_LENGTH_SAMPLES) // FRAME_SHIFT_SAMPLES


def encoder_frame_count(num_frames: int) -> int:
    """Valid encoder frames for T fbank frames (first-release masking: ceil(T/4))."""
    return -(-num_frames // ENCODER_SUBSAMPLING)


def speech_embedding_count(num_frames: int, downsample_rate: int = 2) -> int:
    """Speech embeddings the adapter yields for T fbank frames: ceil(T/4) // rate."""
    return encoder_frame_count(num_frames) // downsample_rate


def speech_embedding_count_for_samples(num_samples: int, downsample_rate: int = 2) -> int:
    """Speech embeddings for a 16 kHz clip of `num_samples` samples."""
    return speech_embedding_count(fbank_frame_count(num_samples), downsample_rate)


def min_samples_for_one_embedding(downsample_rate: int = 2) -> int:
    """The shortest 16 kHz clip that yields at least one speech embedding."""
    frames = ENCODER_SUBSAMPLING * (downsample_rate - 1) + 1
    return FRAME_LENGTH_SAMPLES + (frames - 1) * FRAME_SHIFT_SAMPLES


# The longest clip the model takes whole: the original's training limit (`input_length_max`
# of both releases). `fireredasr-transcribe` segments anything longer, and its documented
# memory bound assumes segments of at most this; a config may lower it, never raise it.
MAX_CLIP_SECONDS = 30.0


def check_max_audio_seconds(value: object) -> float:
    """`value` as the clip limit in seconds, or ValueError naming why it cannot be one.

    Releases and repos are data from elsewhere: NaN, text or 1e7 must not travel
    on into a feature extractor or the memory bound.
    """
    shortest = min_samples_for_one_embedding() / SAMPLE_RATE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"the clip limit {str(value)[:40]!r} is not a number of seconds")
    if not (math.isfinite(value) and shortest < value <= MAX_CLIP_SECONDS):
        raise ValueError(
            f"the clip limit {value!r} s is outside ({shortest:g}, {MAX_CLIP_SECONDS:g}] s"
        )
    return float(value)


def max_fbank_frames(max_audio_seconds: float) -> int:
    return fbank_frame_count(int(round(max_audio_seconds * SAMPLE_RATE)))


def cmvn_from_stats(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Kaldi CMVN statistics (2 x (D+1) float64) -> (mean, istd, frame count).

    Row 0 holds per-dimension sums with the frame count in the last column,
    row 1 per-dimension sums of squares. Computed in float64 as Kaldi does.
    """
    stats = np.asarray(stats, dtype=np.float64)
    if stats.ndim != 2 or stats.shape[0] != 2 or stats.shape[1] < 2:
        raise ValueError(f"CMVN statistics must be a 2 x (dim+1) matrix, got shape {stats.shape}")
    if not np.isfinite(stats).all():
        raise ValueError("CMVN statistics hold NaN or infinite values")
    count = float(stats[0, -1])
    if not math.isfinite(count) or count < 1:
        raise ValueError(f"CMVN frame count must be >= 1, got {count}")
    mean = stats[0, :-1] / count
    variance = np.maximum(stats[1, :-1] / count - mean * mean, CMVN_VARIANCE_FLOOR)
    istd = 1.0 / np.sqrt(variance)
    return mean, istd, count


def lora_scale(alpha: float, rank: int) -> float:
    """LoRA merge scale: W' = W + (alpha / r) * B @ A."""
    return alpha / rank
