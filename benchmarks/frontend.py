"""Front-end throughput: the vectorised fbank + CMVN against a per-frame kaldi-native-fbank loop.

The per-frame loop is how the original and the other ports compute features:
`OnlineFbank.accept_waveform` on integer-scale samples, then `get_frame(i)` for
every frame in Python, then CMVN in NumPy. Both run on the same synthetic speech
in the same process, one thread each; the script prints each side's throughput
in audio seconds per second, the ratio, and the largest feature difference.

    python benchmarks/frontend.py [--seconds 60] [--clips 6] [--repeats 3]

Exits with status 1 when the features differ by more than --tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time

import kaldi_native_fbank as knf
import numpy as np
import torch

from fireredasr_converter import spec
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor, kaldi_fbank
from fireredasr_converter.fixtures import synthetic_speech


def per_frame_fbank(waveform: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank with the original's options, read out frame by frame."""
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = spec.NUM_MEL_BINS
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(spec.SAMPLE_RATE, (waveform * spec.SAMPLE_SCALE).tolist())
    fbank.input_finished()
    return np.vstack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def per_frame_features(clips: list[np.ndarray], mean: np.ndarray, istd: np.ndarray) -> list[np.ndarray]:
    return [((per_frame_fbank(clip) - mean) * istd).astype(np.float32) for clip in clips]


def vectorised_features(extractor: FireRedAsrFeatureExtractor, clips: list[np.ndarray]) -> list[np.ndarray]:
    batch = extractor(clips, sampling_rate=spec.SAMPLE_RATE)
    return [
        features[:length].numpy()
        for features, length in zip(batch["input_features"], batch["feature_lengths"].tolist())
    ]


def best_time(run, repeats: int):
    """The fastest of `repeats` runs (the least disturbed by other load) and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="total audio duration")
    parser.add_argument("--clips", type=int, default=6, help="number of clips the audio is split into")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest counts")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest acceptable feature difference")
    args = parser.parse_args()

    torch.set_num_threads(1)
    total_samples = int(args.seconds * spec.SAMPLE_RATE)
    # Slightly different clip lengths, so the frame counts cover several residues.
    lengths = [total_samples // args.clips + 37 * i for i in range(args.clips)]
    # Quantised to 16-bit PCM, as audio read from WAV files is.
    clips = [
        np.round(synthetic_speech(n, seed=i) * spec.SAMPLE_SCALE).clip(-32768, 32767).astype(np.float32)
        / spec.SAMPLE_SCALE
        for i, n in enumerate(lengths)
    ]
    audio_seconds = sum(lengths) / spec.SAMPLE_RATE

    # CMVN statistics of this audio, in Kaldi's layout, so both sides normalise realistically.
    raw = np.concatenate([per_frame_fbank(clip) for clip in clips]).astype(np.float64)
    stats = np.zeros((2, spec.NUM_MEL_BINS + 1))
    stats[0, :-1], stats[0, -1], stats[1, :-1] = raw.sum(0), raw.shape[0], np.square(raw).sum(0)
    mean, istd, count = spec.cmvn_from_stats(stats)
    extractor = FireRedAsrFeatureExtractor(cmvn_mean=mean, cmvn_istd=istd, cmvn_frame_count=count)

    vectorised_features(extractor, clips[:1])  # warm-up: FFT plans, mel bank cache
    loop_time, expected = best_time(lambda: per_frame_features(clips, mean, istd), args.repeats)
    ours_time, ours = best_time(lambda: vectorised_features(extractor, clips), args.repeats)

    if [f.shape for f in ours] != [f.shape for f in expected]:
        print(f"frame counts differ: {[f.shape[0] for f in ours]} vs {[f.shape[0] for f in expected]}")
        return 1
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, expected))
    raw_diff = max(
        float(np.abs(kaldi_fbank(torch.from_numpy(clip)).numpy() - per_frame_fbank(clip)).max()) for clip in clips
    )
    loop_speed, ours_speed = audio_seconds / loop_time, audio_seconds / ours_time
    num_frames = sum(f.shape[0] for f in ours)
    print(f"audio: {args.clips} clips, {audio_seconds:.1f} s, {num_frames} frames; 1 thread each")
    print(f"per-frame kaldi_native_fbank loop + NumPy CMVN: {loop_time:.3f} s  ({loop_speed:,.0f} audio s/s)")
    print(f"FireRedAsrFeatureExtractor (vectorised):      {ours_time:.3f} s  ({ours_speed:,.0f} audio s/s)")
    print(f"speed-up: {ours_speed / loop_speed:.2f}x (target >= 4x)")
    print(f"max abs log-mel difference before CMVN: {raw_diff:.2e}")
    print(f"max abs feature difference after CMVN: {max_diff:.2e} (tolerance {args.tolerance:g})")
    return 0 if max_diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
