"""Speech segments of a recording of any length: Silero VAD regions cut into pieces the model takes.

FireRedASR-LLM was trained on clips of at most 30 s, and its authors' advice for
longer audio is to cut it with a voice activity detector. Here:

1. Silero VAD (the `silero-vad` package, which ships its weights) gives a speech
   probability for every 32 ms window; a region starts where the probability
   reaches `threshold` and ends after `min_silence_seconds` below it (hysteresis
   `threshold - 0.15`); regions shorter than `min_speech_seconds` are dropped, and
   each region's edges are moved to its audible part (the VAD lags speech).
   Silence and noise between regions are never sent to the model, where an LLM
   decoder would make text up.
2. A region longer than the model's limit is split at its quietest 32 ms window
   (lowest energy) in the second half of each piece.
3. Neighbouring pieces closer than `merge_gap_seconds` are merged while the result
   stays within `max_seconds`.
4. Each segment gets `padding_seconds` of audio on both sides, never past the
   midpoint to its neighbour; segments shorter than the model's shortest clip are
   dropped.

The same audio always gives the same segments. `SegmentStream` runs this over
audio that arrives in blocks, holding only the audio not yet handed out, so
memory stays bounded for recordings of any length.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fireredasr_converter import spec

# Silero VAD's window at 16 kHz.
VAD_WINDOW = 512
# Audio planned at once; segments ending in its last `max_seconds + merge_gap_seconds`
# wait for the next block of audio, which may extend or merge them.
PLANNING_SECONDS = 300.0


@dataclass(frozen=True)
class SegmenterSettings:
    max_seconds: float = 30.0  # the repo's max_audio_seconds
    padding_seconds: float = 0.1
    merge_gap_seconds: float = 1.0
    threshold: float = 0.5
    min_speech_seconds: float = 0.25
    min_silence_seconds: float = 0.3

    def __post_init__(self):
        if self.max_seconds <= 2 * self.padding_seconds + 1.0:
            raise ValueError(f"max_seconds {self.max_seconds} leaves no room for speech between the paddings")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class Segment:
    """Samples [start, end) of a 16 kHz recording."""

    start: int
    end: int

    @property
    def start_seconds(self) -> float:
        return self.start / spec.SAMPLE_RATE

    @property
    def end_seconds(self) -> float:
        return self.end / spec.SAMPLE_RATE

    @property
    def num_samples(self) -> int:
        return self.end - self.start


def _windows(seconds: float) -> int:
    return max(1, round(seconds * spec.SAMPLE_RATE / VAD_WINDOW))


def speech_regions(probabilities: np.ndarray, settings: SegmenterSettings) -> list[tuple[int, int]]:
    """[start, end) window ranges of speech, by hysteresis over the VAD probabilities."""
    low = settings.threshold - 0.15
    min_silence, min_speech = _windows(settings.min_silence_seconds), _windows(settings.min_speech_seconds)
    regions, start, quiet = [], None, 0
    for index, probability in enumerate(probabilities):
        if start is None:
            if probability >= settings.threshold:
                start, quiet = index, 0
        elif probability < low:
            quiet += 1
            if quiet >= min_silence:
                regions.append((start, index + 1 - quiet))
                start = None
        else:
            quiet = 0
    if start is not None:
        regions.append((start, len(probabilities) - quiet))
    return [(s, e) for s, e in regions if e - s >= min_speech]


# A region's edges are moved to where its audio is clearly speech: the VAD's
# probability rises 50-150 ms after a word starts and falls 100-200 ms after it ends.
# An edge window counts as speech when it is at most EDGE_FLOOR_DB below the region's
# loud windows and at least NOISE_MARGIN_DB above the background beside that edge (the
# median of BACKGROUND_WINDOWS windows outside it); an edge moves outwards by at most
# MAX_EDGE_EXTENSION windows.
EDGE_FLOOR_DB = 35.0
NOISE_MARGIN_DB = 5.0
BACKGROUND_WINDOWS = 16
MAX_EDGE_EXTENSION = 6


def refine_edges(region: tuple[int, int], energies: np.ndarray, lower: int, upper: int) -> tuple[int, int]:
    """The region with its edges moved to the audible speech, staying within [lower, upper)."""
    start, end = region
    loud_floor = np.percentile(energies[start:end], 90) * 10 ** (-EDGE_FLOOR_DB / 10)
    margin = 10 ** (NOISE_MARGIN_DB / 10)

    def floor(background: np.ndarray) -> float:
        return max(loud_floor, margin * float(np.median(background))) if background.size else loud_floor

    lead_floor = floor(energies[max(lower, start - BACKGROUND_WINDOWS - MAX_EDGE_EXTENSION) : start - MAX_EDGE_EXTENSION])
    tail_floor = floor(energies[end + MAX_EDGE_EXTENSION : min(upper, end + MAX_EDGE_EXTENSION + BACKGROUND_WINDOWS)])
    inside = energies[start:end]
    lead, tail = np.flatnonzero(inside >= lead_floor), np.flatnonzero(inside >= tail_floor)
    if lead.size and tail.size and lead[0] <= tail[-1]:
        start, end = start + int(lead[0]), start + int(tail[-1]) + 1
    for _ in range(MAX_EDGE_EXTENSION):
        if start - 1 >= lower and energies[start - 1] >= lead_floor:
            start -= 1
    for _ in range(MAX_EDGE_EXTENSION):
        if end < upper and energies[end] >= tail_floor:
            end += 1
    return start, end


def split_at_quietest(region: tuple[int, int], energies: np.ndarray, max_windows: int) -> list[tuple[int, int]]:
    """Cut a region into pieces of at most `max_windows`, each cut at the lowest-energy window of the piece's second half."""
    start, end = region
    pieces = []
    while end - start > max_windows:
        lo, hi = start + max_windows // 2, start + max_windows
        cut = lo + int(np.argmin(energies[lo:hi]))  # the first of equally quiet windows
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def plan_segments(
    probabilities: np.ndarray,
    energies: np.ndarray,
    num_samples: int,
    settings: SegmenterSettings,
    min_samples: int,
) -> list[Segment]:
    """Segments of a recording from its per-window VAD probabilities and energies."""
    max_samples = int(round(settings.max_seconds * spec.SAMPLE_RATE))
    pad = int(round(settings.padding_seconds * spec.SAMPLE_RATE))
    max_windows = (max_samples - 2 * pad) // VAD_WINDOW
    regions = speech_regions(probabilities, settings)
    bounds = [0, *(r[1] for r in regions)], [*(r[0] for r in regions), len(energies)]
    pieces = [
        piece
        for region, lower, upper in zip(regions, bounds[0], bounds[1][1:])
        for piece in split_at_quietest(refine_edges(region, energies, lower, upper), energies, max_windows)
    ]
    merge_gap = _windows(settings.merge_gap_seconds)
    groups: list[list[int]] = []
    for piece in pieces:
        if groups and piece[0] - groups[-1][1] <= merge_gap and piece[1] - groups[-1][0] <= max_windows:
            groups[-1][1] = piece[1]
        else:
            groups.append(list(piece))

    spans = [(s * VAD_WINDOW, min(e * VAD_WINDOW, num_samples)) for s, e in groups]
    segments = []
    for index, (start, end) in enumerate(spans):
        # Padding stops halfway to a neighbour, so segments never overlap.
        floor = 0 if index == 0 else (spans[index - 1][1] + start) // 2
        ceiling = num_samples if index == len(spans) - 1 else (end + spans[index + 1][0]) // 2
        segment = Segment(max(floor, start - pad), min(ceiling, end + pad))
        if segment.num_samples >= min_samples:
            segments.append(segment)
    return segments


@functools.lru_cache(maxsize=1)
def load_vad():
    """Silero VAD's TorchScript model, from the weights the `silero-vad` package ships."""
    from silero_vad import load_silero_vad

    return load_silero_vad()


class SileroVad:
    """Silero VAD's speech probabilities for many consecutive windows in one pass.

    Silero's own `model(window, 16000)` runs one 32 ms window per Python call,
    whose overhead competes with the engine for the CPU (docs/benchmarks.md,
    the long-form benchmark). Only its LSTM carries state from one window to the next; its
    front end (STFT and convolutions, each window seeing the 64 samples before
    it) and its output layer are per window. So the front end and output layer
    run batched over all windows, and the LSTM cell's weights run as a
    one-layer `nn.LSTM` over the sequence: the same computation, within float
    rounding (tested against the per-window calls).
    """

    CONTEXT = 64  # samples of the previous window each window sees (16 kHz)

    def __init__(self):
        model = load_vad()._model
        self.front_end, self.encoder = model.stft, model.encoder
        self.output_layer = model.decoder.decoder
        cell = model.decoder.rnn
        self.lstm = torch.nn.LSTM(cell.weight_ih.shape[1], cell.weight_hh.shape[1], batch_first=True)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.lstm, f"{name}_l0").copy_(getattr(cell, name))
        self.lstm.eval()
        self.reset()

    def reset(self) -> None:
        self.context = torch.zeros(1, self.CONTEXT)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, windows: torch.Tensor) -> np.ndarray:
        """Probabilities for [n, VAD_WINDOW] consecutive windows following those of earlier calls."""
        with torch.inference_mode():
            contexts = torch.cat([self.context, windows[:-1, -self.CONTEXT :]])
            features = self.encoder(self.front_end(torch.cat([contexts, windows], dim=1)))  # [n, C, 1]
            hidden, self.state = self.lstm(features.squeeze(-1).unsqueeze(0), self.state)
            probabilities = self.output_layer(hidden[0].unsqueeze(-1)).squeeze(1).mean(dim=1)
            self.context = windows[-1:, -self.CONTEXT :].clone()
        return probabilities.numpy().astype(np.float64)


class SegmentStream:
    """Segments of audio that arrives in blocks, each handed out with its samples once final.

    Holds the audio from the first sample a later segment may still need, at most
    about `PLANNING_SECONDS` plus one block: memory does not grow with the recording.
    """

    def __init__(self, settings: SegmenterSettings = SegmenterSettings(), min_samples: int | None = None):
        self.settings = settings
        self.min_samples = spec.min_samples_for_one_embedding() if min_samples is None else min_samples
        self.vad = SileroVad()
        # Segments ending this close to a planned span's end wait for more audio.
        self.carry = int((settings.max_seconds + settings.merge_gap_seconds + settings.min_silence_seconds + 1.0)
                         * spec.SAMPLE_RATE)  # fmt: skip
        self.planning_span = int(PLANNING_SECONDS * spec.SAMPLE_RATE) // VAD_WINDOW * VAD_WINDOW
        if self.planning_span <= self.carry + settings.max_seconds * spec.SAMPLE_RATE:
            raise ValueError(f"max_seconds {settings.max_seconds} is too long for {PLANNING_SECONDS:g} s planning spans")
        self.buffer = np.zeros(0, dtype=np.float32)
        self.origin = 0  # absolute index of buffer[0]; a multiple of VAD_WINDOW
        self.probabilities: list[float] = []  # per window from `origin`
        self.energies: list[float] = []
        self.pending = np.zeros(0, dtype=np.float32)  # samples not yet a whole VAD window

    def _score_windows(self, samples: np.ndarray) -> None:
        samples = np.concatenate([self.pending, samples])
        whole = len(samples) // VAD_WINDOW * VAD_WINDOW
        self.pending = samples[whole:]
        if not whole:
            return
        windows = torch.from_numpy(np.ascontiguousarray(samples[:whole], dtype=np.float32)).view(-1, VAD_WINDOW)
        self.probabilities.extend(self.vad(windows).tolist())
        self.energies.extend(np.mean(windows.double().numpy() ** 2, axis=1).tolist())

    def _plan(self, span: int, final: bool) -> list[tuple[Segment, np.ndarray]]:
        """Plan the first `span` samples; hand out the segments no later audio can change."""
        windows = -(-span // VAD_WINDOW)
        planned = plan_segments(
            np.asarray(self.probabilities[:windows]), np.asarray(self.energies[:windows]), span, self.settings,
            self.min_samples,
        )  # fmt: skip
        ready = planned if final else [s for s in planned if s.end <= span - self.carry]
        out = [(Segment(self.origin + s.start, self.origin + s.end), self.buffer[s.start : s.end].copy()) for s in ready]
        # Keep the audio a later segment may need: from the first segment not handed out,
        # else from the end of the last one handed out (or the carry when there was none).
        waiting = planned[len(ready) :]
        keep_from = waiting[0].start if waiting else (ready[-1].end if ready else span - self.carry)
        keep_from = max(0, keep_from) // VAD_WINDOW * VAD_WINDOW
        self.buffer = self.buffer[keep_from:]
        del self.probabilities[: keep_from // VAD_WINDOW]
        del self.energies[: keep_from // VAD_WINDOW]
        self.origin += keep_from
        return out

    def feed(self, samples: np.ndarray) -> list[tuple[Segment, np.ndarray]]:
        """Add 16 kHz mono float32 samples; returns the segments that are now final.

        Planning runs on fixed spans of `PLANNING_SECONDS` from the oldest audio held,
        so the segments do not depend on how the audio was cut into blocks.
        """
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.buffer = np.concatenate([self.buffer, samples])
        self._score_windows(samples)
        out = []
        while len(self.probabilities) * VAD_WINDOW >= self.planning_span:
            out += self._plan(self.planning_span, final=False)
        return out

    def finish(self) -> list[tuple[Segment, np.ndarray]]:
        """The recording has ended: every remaining segment."""
        if len(self.pending):
            self._score_windows(np.zeros(VAD_WINDOW - len(self.pending), dtype=np.float32))
            self.pending = np.zeros(0, dtype=np.float32)
        return self._plan(len(self.buffer), final=True)


def segment_blocks(
    blocks: Iterable[np.ndarray], settings: SegmenterSettings = SegmenterSettings()
) -> Iterator[tuple[Segment, np.ndarray]]:
    """Segments of a recording that arrives in blocks, in order, each with its samples."""
    stream = SegmentStream(settings)
    for block in blocks:
        yield from stream.feed(block)
    yield from stream.finish()


def segment(
    samples: np.ndarray, settings: SegmenterSettings = SegmenterSettings(), block_seconds: float = 60.0
) -> Iterator[tuple[Segment, np.ndarray]]:
    """Segments of a whole recording held in memory, fed to the stream `block_seconds` at a time."""
    step = int(block_seconds * spec.SAMPLE_RATE)
    yield from segment_blocks((samples[i : i + step] for i in range(0, len(samples), step)), settings)
