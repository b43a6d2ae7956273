"""Recordings of any length through one decoder: files -> segments -> clips -> per-file transcripts.

Holds the long-form pipeline `FireRedAsr.transcribe_many` (hence
`fireredasr-transcribe`) and the Ray replicas run: a background thread reads
each file (or array) block by block and cuts it into segments the model takes
(`fireredasr_vllm.segmenter`); every file's segments go to the decoder as one
stream of clips (`decoded_recordings`), so continuous batching keeps the engine
full across file boundaries; results come back in any order and are gathered
per file, and a file is handed on as a `RecordingTranscript` once each of its
segments is decoded. Does not read lists of files, decode, or write outputs.

Memory for audio is bounded whatever a file's length: the segments queued
ahead of the decoder (`QUEUED_SEGMENTS`), the segmenter's look-ahead (about
`PLANNING_SECONDS` plus a block) and the clips in the decoder.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fireredasr_converter import spec

from .audio_input import Utterance, Waveform, read_blocks
from .decoding import Decoding
from .errors import AudioError
from .segmenter import Segment, SegmenterSettings, SegmentStream
from .transcript_formats import RecordingTranscript, TimedText

# Segments read and cut ahead of the decoder.
QUEUED_SEGMENTS = 16
SEGMENT_MODES = ("auto", "always")


@dataclass(frozen=True)
class SegmentReady:
    file: int
    number: int
    segment: Segment
    samples: np.ndarray
    # Audio before this segment that no earlier segment covered (silence left out), in samples.
    skipped: int


@dataclass(frozen=True)
class FileEnd:
    file: int
    segments: int
    num_samples: int


@dataclass(frozen=True)
class FileFailed:
    file: int
    error: AudioError


def file_segments(
    path: str | Waveform, settings: SegmenterSettings, mode: str, validate: Callable[[np.ndarray], None]
) -> Generator[tuple[Segment, np.ndarray], None, int]:
    """Yields a file's segments with their samples; returns its length in samples.

    `mode` "auto" keeps a file of at most `settings.max_seconds` whole, as the
    original decodes it (`validate` refuses it when the model cannot take it,
    e.g. too short); longer files, and every file in mode "always", go through
    the voice activity detector.
    """
    limit = int(settings.max_seconds * spec.SAMPLE_RATE)
    blocks = read_blocks(path)
    head: list[np.ndarray] = []
    held = 0
    if mode == "auto":
        for block in blocks:
            head.append(block)
            held += len(block)
            if held > limit:
                break
        else:
            whole = np.concatenate(head)
            try:
                validate(whole)
            except ValueError as error:
                raise AudioError(f"{path}: {error}") from None
            yield Segment(0, len(whole)), whole
            return len(whole)
    stream = SegmentStream(settings)
    total = 0
    for block in itertools.chain(head, blocks):
        total += len(block)
        yield from stream.feed(block)
    yield from stream.finish()
    return total


def segment_events(
    files: Iterable[tuple[int, Utterance]],
    settings: SegmenterSettings,
    mode: str,
    validate: Callable[[np.ndarray], None],
) -> Iterator[SegmentReady | FileEnd | FileFailed]:
    """Every file's segments in input order, each file closed by a FileEnd or a FileFailed."""
    for index, utterance in files:
        number = covered = 0
        segments = file_segments(utterance.path, settings, mode, validate)
        try:
            while True:
                try:
                    seg, samples = next(segments)
                except StopIteration as end:
                    yield FileEnd(index, number, end.value)
                    break
                yield SegmentReady(index, number, seg, samples, seg.start - covered)
                number, covered = number + 1, seg.end
        except AudioError as error:
            yield FileFailed(index, error)


def in_background(events: Iterator, depth: int = QUEUED_SEGMENTS) -> Iterator:
    """Run an iterator on a worker thread, at most `depth` items ahead of the consumer.

    Reading and the VAD overlap with decoding. When the consumer stops early, the
    worker stops at its next item.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in events:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as error:  # handed to the consumer, which raises it
            items.put(error)

    worker = threading.Thread(target=work, name="audio-segmenter", daemon=True)
    worker.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


@dataclass
class _Recording:
    uttid: str
    texts: dict[int, tuple[Segment, str, tuple[int, ...]]] = field(default_factory=dict)
    expected: int | None = None  # segments, once the file is fully read
    decoded: int = 0
    num_samples: int = 0


@dataclass(frozen=True)
class Finished:
    """A recording whose every segment is decoded (`transcript`), or that failed (`error`)."""

    file: int
    transcript: RecordingTranscript | None = None
    error: Exception | None = None


class Assembler:
    """Gathers segment results per file and reports each file once it is settled.

    `clips()` feeds the decoder from segment events; `result()` takes what the
    decoder gives back. Both return the files they settled, which the caller
    writes. `on_audio` hears how much audio (seconds) each result and each file's
    end account for, for progress.
    """

    def __init__(self, uttids: dict[int, str], on_audio: Callable[[float], None] = lambda seconds: None):
        self.uttids = uttids
        self.recordings: dict[int, _Recording] = {}
        self.failed: set[int] = set()
        self.covers: dict[tuple[int, int], int] = {}  # samples each segment in flight accounts for
        self.settled: list[Finished] = []
        self.on_audio = on_audio

    def clips(self, events: Iterable[SegmentReady | FileEnd | FileFailed]) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        for event in events:
            recording = self.recordings.setdefault(event.file, _Recording(self.uttids[event.file]))
            if isinstance(event, SegmentReady):
                if event.file not in self.failed:
                    self.covers[(event.file, event.number)] = event.skipped + event.segment.num_samples
                    recording.texts[event.number] = (event.segment, "", ())
                    yield (event.file, event.number), event.samples
            elif isinstance(event, FileFailed):
                self._fail(event.file, event.error)
            else:
                recording.expected, recording.num_samples = event.segments, event.num_samples
                self._check(event.file)

    def result(self, key: tuple[int, int], outcome) -> None:
        file, number = key
        covered = self.covers.pop(key, 0)
        if file in self.failed:
            return
        if isinstance(outcome, Exception):
            self._fail(file, outcome)
            return
        self.on_audio(covered / spec.SAMPLE_RATE)
        recording = self.recordings[file]
        seg, _, _ = recording.texts[number]
        # A Ray replica's answer carries the text only.
        recording.texts[number] = (seg, outcome.text, tuple(getattr(outcome, "token_ids", ())))
        recording.decoded += 1
        self._check(file)

    def take_settled(self) -> list[Finished]:
        settled, self.settled = self.settled, []
        return settled

    def _fail(self, file: int, error: Exception) -> None:
        self.failed.add(file)
        self.recordings.pop(file, None)
        self.settled.append(Finished(file, error=error))

    def _check(self, file: int) -> None:
        recording = self.recordings.get(file)
        if recording is None or recording.expected is None or recording.decoded < recording.expected:
            return
        del self.recordings[file]
        # The audio after the last segment (silence left out) is accounted for now.
        last_end = max((seg.end for seg, _, _ in recording.texts.values()), default=0)
        self.on_audio((recording.num_samples - last_end) / spec.SAMPLE_RATE)
        segments = tuple(
            TimedText(seg.start_seconds, seg.end_seconds, text, token_ids)
            for _, (seg, text, token_ids) in sorted(recording.texts.items())
        )
        self.settled.append(Finished(file, RecordingTranscript(recording.uttid, recording.num_samples / spec.SAMPLE_RATE, segments)))


class ClipDecoder(Protocol):
    """What turns clips into transcripts (`decoders.VllmDecoder`, `decoders.ReferenceBackend`)."""

    def transcribe(self, clips: Iterable[tuple], decoding: Decoding, *, batch_size: int) -> Generator[tuple, None, None]:
        """`(key, Transcript or the exception that refused the clip)` for every `(key, waveform)` clip, in any order."""
        ...


def decoded_recordings(
    decoder: ClipDecoder,
    events: Iterable[SegmentReady | FileEnd | FileFailed],
    uttids: dict[int, str],
    decoding: Decoding,
    batch_size: int,
    on_audio: Callable[[float], None] = lambda seconds: None,
) -> Iterator[Finished]:
    """Every file's segments (`segment_events`) through `decoder` in one continuous batch;
    each file is yielded as soon as it is settled.

    The one decoding loop of `FireRedAsr.transcribe_many`, hence of the CLI, and of
    every Ray replica."""
    assembler = Assembler(uttids, on_audio=on_audio)
    settled: list[Finished] = []

    def clips():
        for clip in assembler.clips(events):
            yield clip
            settled.extend(assembler.take_settled())
        settled.extend(assembler.take_settled())

    results = decoder.transcribe(clips(), decoding, batch_size=batch_size)
    try:
        for key, outcome in results:
            assembler.result(key, outcome)
            settled.extend(assembler.take_settled())
            # Files settled while the decoder pulled clips (unreadable ones) go first, in the order they settled.
            while settled:
                yield settled.pop(0)
    finally:
        # A consumer that stops early ends the decoder now, which takes its requests out of the engine.
        results.close()
    settled.extend(assembler.take_settled())
    yield from settled


def decode_recordings(
    decoder: ClipDecoder,
    events: Iterable,
    uttids: dict[int, str],
    decoding: Decoding,
    batch_size: int,
    on_finished: Callable[[Finished], None],
    on_audio: Callable[[float], None] = lambda seconds: None,
) -> None:
    """`decoded_recordings`, each settled file handed to `on_finished`."""
    for finished in decoded_recordings(decoder, events, uttids, decoding, batch_size, on_audio):
        on_finished(finished)
