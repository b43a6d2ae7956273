"""The vectorised front-end against kaldi-native-fbank (the original's front-end)."""

import numpy as np
import pytest
import torch
from tolerances import F32_EPS, fbank_atol

from fireredasr_converter.feature_extraction import (
    KALDI_FBANK_OPTIONS,
    FireRedAsrFeatureExtractor,
    kaldi_fbank,
)
from fireredasr_converter.spec import cmvn_from_stats, fbank_frame_count

knf = pytest.importorskip("kaldi_native_fbank")


def original_fbank(int16_samples: np.ndarray) -> np.ndarray:
    """The original's front-end: kaldi-native-fbank, one frame at a time, integer-scale input."""
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, int16_samples.tolist())
    fbank.input_finished()
    if fbank.num_frames_ready == 0:
        return np.zeros((0, 80), dtype=np.float32)
    return np.vstack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def int16_clip(num_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(num_samples)
    return np.clip(np.round(wave * 32767), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("num_samples", [0, 399, 400, 559, 560, 1040, 16000, 16000 * 7 + 123])
def test_fbank_matches_kaldi_native_fbank(num_samples):
    samples = int16_clip(num_samples, seed=num_samples)
    expected = original_fbank(samples)
    ours = kaldi_fbank(torch.from_numpy(samples.astype(np.float32) / 32768.0))
    assert ours.shape == (fbank_frame_count(num_samples), 80) == expected.shape
    assert ours.dtype == torch.float32
    if num_samples >= 400:
        # Float32 in two orders (kaldi-native-fbank's and torch's FFT): see fbank_atol.
        waveform = samples.astype(np.float32) / 32768.0
        assert (np.abs(ours.numpy() - expected) <= fbank_atol(waveform, expected)).all()


def test_digital_silence_is_floored_like_kaldi():
    ours = kaldi_fbank(torch.zeros(1600))
    expected = original_fbank(np.zeros(1600, dtype=np.int16))
    # Both floor at FLT_EPSILON and take its float32 log: each log within an ulp.
    np.testing.assert_allclose(ours.numpy(), expected, rtol=2 * F32_EPS, atol=0)


def test_cmvn_applied_in_float64_then_cast():
    stats = np.zeros((2, 81))
    rng = np.random.default_rng(1)
    stats[0, :80] = rng.normal(10, 1, 80) * 1000
    stats[0, 80] = 1000
    stats[1, :80] = (stats[0, :80] / 1000) ** 2 * 1000 + rng.uniform(1, 4, 80) * 1000
    mean, istd, count = cmvn_from_stats(stats)
    extractor = FireRedAsrFeatureExtractor(cmvn_mean=mean, cmvn_istd=istd, cmvn_frame_count=count)
    samples = int16_clip(8000, seed=3)
    waveform = samples.astype(np.float32) / 32768.0
    batch = extractor(waveform, sampling_rate=16000)
    raw = kaldi_fbank(torch.from_numpy(waveform)).numpy()
    expected = ((raw.astype(np.float64) - mean) * istd).astype(np.float32)
    np.testing.assert_array_equal(batch["input_features"][0].numpy(), expected)
    assert batch["feature_lengths"].tolist() == [fbank_frame_count(8000)]


def test_batch_is_zero_padded_with_lengths():
    extractor = FireRedAsrFeatureExtractor()
    clips = [int16_clip(n, seed=n).astype(np.float32) / 32768.0 for n in (1600, 4000, 2400)]
    batch = extractor(clips, sampling_rate=16000)
    lengths = [fbank_frame_count(len(c)) for c in clips]
    assert batch["feature_lengths"].tolist() == lengths
    assert batch["input_features"].shape == (3, max(lengths), 80)
    for row, clip, length in zip(batch["input_features"], clips, lengths):
        torch.testing.assert_close(row[:length], extractor.compute_features(torch.from_numpy(clip)), rtol=0, atol=0)
        assert not row[length:].any()


def test_config_round_trip_keeps_full_precision(tmp_path):
    mean = [0.1 + i / 3 for i in range(80)]
    istd = [1 / (7 + i) for i in range(80)]
    extractor = FireRedAsrFeatureExtractor(cmvn_mean=mean, cmvn_istd=istd, cmvn_frame_count=123456789.0,
                                           max_audio_seconds=25.0)
    extractor.save_pretrained(tmp_path)
    loaded = FireRedAsrFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.cmvn_mean == mean and loaded.cmvn_istd == istd
    assert loaded.cmvn_frame_count == 123456789.0
    assert loaded.max_audio_seconds == 25.0
    assert loaded.fbank_options == KALDI_FBANK_OPTIONS


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="unsupported fbank options \\['dither'\\]"):
        FireRedAsrFeatureExtractor(fbank_options={**KALDI_FBANK_OPTIONS, "dither": 1.0})
    with pytest.raises(ValueError, match="resample it to 16000 Hz"):
        FireRedAsrFeatureExtractor()(np.zeros(1600, np.float32), sampling_rate=8000)


@pytest.mark.parametrize(
    ("waveform", "message"),
    [
        (np.zeros(0, np.float32), "audio is empty"),
        (np.zeros(1039, np.float32), "too short: 1039 samples"),
        (np.zeros(16000 * 30 + 1, np.float32), "too long: 30.00 s"),
        (np.array([0.0] * 2000 + [np.nan], np.float32), "NaN or infinite"),
        (np.zeros((2, 2000), np.float32), "mono 1-D"),
    ],
)
def test_validate_waveform_names_the_problem(waveform, message):
    with pytest.raises(ValueError, match=message):
        FireRedAsrFeatureExtractor().validate_waveform(waveform)


def test_validate_waveform_accepts_the_limits():
    extractor = FireRedAsrFeatureExtractor()
    extractor.validate_waveform(np.zeros(1040, np.float32))
    extractor.validate_waveform(np.zeros(16000 * 30, np.float32))
