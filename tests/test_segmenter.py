"""The long-recording segmenter: VAD regions -> model-sized segments with little padding."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import speech_recording
from tolerances import float32_atol

from fireredasr_converter import spec
from fireredasr_vllm.segmenter import (
    VAD_WINDOW,
    Segment,
    SegmenterSettings,
    SileroVad,
    load_vad,
    plan_segments,
    segment,
    speech_regions,
    split_at_quietest,
)

SETTINGS = SegmenterSettings()
MIN_SAMPLES = spec.min_samples_for_one_embedding()
WINDOWS_PER_SECOND = spec.SAMPLE_RATE / VAD_WINDOW


def windows(seconds: float) -> int:
    return round(seconds * WINDOWS_PER_SECOND)


def vad_track(spans: list[tuple[float, float]], total_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities 0.9 inside the speech spans and 0.05 outside; energies 1e-2 and 1e-8."""
    probabilities = np.full(windows(total_seconds), 0.05)
    energies = np.full(windows(total_seconds), 1e-8)
    for start, end in spans:
        probabilities[windows(start) : windows(end)] = 0.9
        energies[windows(start) : windows(end)] = 1e-2
    return probabilities, energies


def plan(spans, total_seconds, settings=SETTINGS) -> list[Segment]:
    probabilities, energies = vad_track(spans, total_seconds)
    return plan_segments(probabilities, energies, int(total_seconds * spec.SAMPLE_RATE), settings, MIN_SAMPLES)


def test_regions_need_the_threshold_to_start_and_a_long_enough_pause_to_end():
    probabilities = np.array([0.1, 0.6, 0.4, 0.2, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9])
    settings = SegmenterSettings(min_silence_seconds=0.1, min_speech_seconds=0.05)  # 3 and 2 windows
    # 0.4 stays above the hysteresis level 0.35; one 0.2 window is too short a pause; the
    # last speech window at the end is too short a region.
    assert speech_regions(probabilities, settings) == [(1, 6)]


def test_a_long_run_is_cut_at_its_quietest_window_in_each_pieces_second_half():
    energies = np.ones(100)
    energies[[10, 30, 62, 80]] = [1e-6, 0.1, 0.01, 1e-6]
    # Pieces of at most 40 windows: the first cut is searched in [20, 40) (window 10 is
    # quieter but would leave a short piece), the next in [50, 70); the rest fits.
    assert split_at_quietest((0, 100), energies, 40) == [(0, 30), (30, 62), (62, 100)]


def test_neighbours_merge_up_to_the_limit_and_silence_is_left_out():
    # Two words 0.4 s apart merge; 5 s of silence is not sent to the model.
    segments = plan([(1.0, 2.0), (2.4, 3.0), (8.0, 9.0)], 12.0)
    pad = int(SETTINGS.padding_seconds * spec.SAMPLE_RATE)
    edge = lambda seconds: windows(seconds) * VAD_WINDOW  # noqa: E731 (speech edges fall on VAD windows)
    assert [(s.start, s.end) for s in segments] == [
        (edge(1.0) - pad, edge(3.0) + pad),
        (edge(8.0) - pad, edge(9.0) + pad),
    ]


def test_segments_stay_within_the_limit_never_overlap_and_are_long_enough():
    # 70 s of speech with 0.5 s pauses every 4 s, a blip of 0.3 s, and speech up to the end.
    spans = [(t, t + 3.5) for t in np.arange(0.5, 70.0, 4.0)] + [(75.0, 75.3), (78.0, 80.0)]
    segments = plan(spans, 80.0)
    max_samples = SETTINGS.max_seconds * spec.SAMPLE_RATE
    assert all(MIN_SAMPLES <= s.num_samples <= max_samples for s in segments)
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:]))
    assert segments[-1].end == 80 * spec.SAMPLE_RATE  # padding stops at the end of the audio
    assert len(segments) >= 3  # 70 s of speech needs at least three segments


def test_one_unbroken_run_longer_than_the_limit_is_split():
    segments = plan([(0.0, 75.0)], 75.0)
    assert len(segments) == 3
    assert all(s.num_samples <= SETTINGS.max_seconds * spec.SAMPLE_RATE for s in segments)
    assert segments[0].start == 0 and segments[-1].end == 75 * spec.SAMPLE_RATE
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))  # cut inside speech: no gap, no overlap


# --- with the real VAD, on real speech ------------------------------------------------------


@pytest.fixture(scope="module")
def recording() -> tuple[np.ndarray, list[tuple[int, int]]]:
    audio, spans, _ = speech_recording(180.0)
    return audio, spans


def test_segments_hug_the_speech_they_hold(recording):
    audio, speech_spans = recording
    segments = [s for s, _ in segment(audio)]
    tolerance = int(0.3 * spec.SAMPLE_RATE)
    for seg in segments:
        held = [(a, b) for a, b in speech_spans if a < seg.end and seg.start < b]
        assert held, f"a segment without speech: {seg}"
        assert seg.start >= held[0][0] - tolerance
        assert seg.end <= held[-1][1] + tolerance
        assert MIN_SAMPLES <= seg.num_samples <= SETTINGS.max_seconds * spec.SAMPLE_RATE
    # Every word is inside one segment.
    for a, b in speech_spans:
        assert any(seg.start <= a and b <= seg.end for seg in segments), (a, b)


def test_the_same_audio_gives_the_same_segments_whatever_the_blocks(recording):
    audio, _ = recording
    results = [[(s, samples.tobytes()) for s, samples in segment(audio, block_seconds=b)] for b in (60.0, 7.3)]
    assert results[0] == results[1]
    for seg, samples in results[0]:
        assert samples == audio[seg.start : seg.end].tobytes()


def test_silence_and_noise_give_no_segments():
    rng = np.random.default_rng(1)
    silence = np.zeros(20 * spec.SAMPLE_RATE, dtype=np.float32)
    noise = (0.02 * rng.standard_normal(20 * spec.SAMPLE_RATE)).astype(np.float32)
    assert list(segment(silence)) == []
    assert list(segment(noise)) == []


def test_the_batched_vad_gives_silero_s_own_per_window_probabilities(recording):
    audio, _ = recording
    windows = torch.from_numpy(audio[: 40 * spec.SAMPLE_RATE // VAD_WINDOW * VAD_WINDOW]).view(-1, VAD_WINDOW)
    silero = load_vad()
    silero.reset_states()
    with torch.inference_mode():
        expected = np.array([float(silero(window, spec.SAMPLE_RATE)) for window in windows])
    vad = SileroVad()
    # In two calls of uneven size: the state and context carry over from one to the next.
    batched = np.concatenate([vad(windows[:555]), vad(windows[555:])])
    # The decision that matters, exactly: the same speech regions, so the same segments.
    assert speech_regions(batched, SETTINGS) == speech_regions(expected, SETTINGS)
    probabilities_to_segments = lambda p: plan_segments(  # noqa: E731
        p, np.mean(windows.double().numpy() ** 2, axis=1), windows.numel(), SETTINGS, MIN_SAMPLES
    )
    assert probabilities_to_segments(batched) == probabilities_to_segments(expected)
    # The probabilities themselves, within float32 reordering (batched convolutions and a
    # sequence LSTM sum in another order than per-window calls, and differently on each
    # CPU: 1.2e-5 to 3.6e-5 measured on CPUs and kernel sets). Terms summed on one window's
    # path: STFT 256 + magnitude 2, convolutions 129*3 + 128*3 + 64*3 + 64*3, LSTM gates
    # 128 + 128 + 2 biases, output 128 + 1. Logits are O(1) and the sigmoid's slope is at
    # most 1/4; the LSTM's forget gates (< 1) damp the error it carries between windows.
    # A state not carried over between the two calls moves probabilities by O(0.1).
    reductions = 256 + 2 + 129 * 3 + 128 * 3 + 64 * 3 + 64 * 3 + 128 + 128 + 2 + 128 + 1
    np.testing.assert_allclose(batched, expected, rtol=0, atol=float32_atol(reductions))
    assert (expected > 0.5).any() and (expected < 0.1).any()  # the clip holds speech and pauses


def test_the_vad_keeps_the_suite_s_thread_count():
    # silero_vad sets torch to one thread when imported; conftest imports it before it sets the
    # count from FIREREDASR_TEST_THREADS, so `make test-kernels` really runs with 2 threads.
    from conftest import THREADS_VARIABLE

    load_vad()
    SileroVad()
    assert torch.get_num_threads() == int(os.environ.get(THREADS_VARIABLE, "1"))
