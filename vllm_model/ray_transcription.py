"""`fireredasr-transcribe --engine ray`: the same run, spread over a Ray cluster.

Holds the driver side of `fireredasr_vllm.transcribe.run`'s Ray path: Ray
tasks read and segment the audio files anywhere in the cluster (`read_chunks`,
streaming their segments as they are cut), `--num-replicas` actors each hold
one vLLM engine with the plugin (`ray_replica.EngineReplica`), and the driver
hands segments to whichever replica has room, gathers each segment's text and
settles recordings with the single engine's own `recordings.Assembler`, so
the command writes them in input order through the single engine's writers.
Does not read file lists, open outputs or format transcripts.

The unit of work is the segment, not the file: a long recording's segments
go to many replicas and are put back in order by the assembler, and a replica
keeps its engine's batch full from a stream of segments (its inbox), so no
engine drains at a file or batch boundary. Audio travels from the read tasks
to the replicas through the object store in chunks of a few segments; the
driver handles only object references and each chunk's small list of segment
events.

Faults: a read task whose worker dies is rerun by Ray (a streaming generator
replays without repeating what it already gave); one that still fails is
split into single files, so only the file that kills it is reported. A
replica that dies is restarted by Ray (`max_restarts=-1`) while its segments
go back to the queue for the others; a segment whose replica dies
`MAX_REPLICA_DEATHS` times fails its recording. The driver accepts each
segment's text once, from the replica it last gave the segment to, so nothing
is lost or written twice. A driver that dies is covered by `--resume`.

Why not Ray Data: its actors answer batch by batch (each engine call drains),
and its `ray.data.llm` vLLM stage has neither the per-clip token limit, nor
the HF repetition penalty processor, nor this project's beam search, and pulls
in `ray[llm]` (which pins `vllm[audio]==0.29.0` in Ray 2.60).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from fireredasr_converter import spec

from .audio_input import Utterance
from .decoders import VllmBackend
from .engine import quiet_vllm_logs
from .errors import AudioError, TranscriptionFailed
from .job import Job
from .ray_replica import EngineReplica
from .recordings import Assembler, FileFailed, SegmentReady, segment_events

# What a node must have for the plugin to load in its vLLM engines.
PLUGIN_DISTRIBUTION = "fireredasr-vllm"
PLUGIN_ENTRY_POINT = ("vllm.general_plugins", "fireredasr_vllm:register")
# CPUs a read task asks for: reading is CPU work (decoding, resampling, the VAD). A whole one
# also keeps the read tasks within Ray's pool of worker processes (one per CPU): with half a CPU
# each, Ray ended the idle workers over that between blocks and started new ones, each loading
# torch again (docs/scaling.md).
READ_CPUS = 1.0
# Files one read task reads at most, in input order: enough that starting tasks costs little
# against reading, fewer when there are few files (every read task gets some).
BLOCK_FILES = 64
# A chunk (one object in the object store) holds at most this many segments or this much
# audio: small enough that a long recording's chunks spread over the replicas.
CHUNK_SEGMENTS = 32
CHUNK_SECONDS = 240.0
# A file this many times the median file's size is read first, by a task of its own: reading
# (the VAD's pass) is sequential within a file, so an hour-long recording found last would
# keep the run going for minutes after everything else is done.
LONG_FILE_FACTOR = 8
# Objects a read task yields ahead of the driver before it waits (two per chunk).
READ_AHEAD_OBJECTS = 4
# Ray reruns a read task whose worker died this many times.
READ_RETRIES = 3
# A segment whose replica dies this many times fails its recording.
MAX_REPLICA_DEATHS = 3
# A replica whose call failed (Ray restarts it; calls fail at once meanwhile) is asked again after this.
RETRY_S = 0.5
# Once something is ready, the driver waits this much longer for more before it handles them:
# each pass of its loop (waits, dispatch, calls) then serves several answers and chunks. Far
# below a replica's reply interval, so replicas get their segments no later to speak of.
GATHER_S = 0.01

# A traceback's exception line: `package.module.SomeError: message` at the start of a line.
EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception): .*)$", re.MULTILINE)


class RecordingError(Exception):
    """Why a Ray worker could not transcribe one recording (its message, as the worker reported it)."""


@dataclasses.dataclass(frozen=True)
class SegmentText:
    """A replica's answer for one segment, as the assembler takes it (it reads `text`)."""

    text: str


def exception_line(error: Exception) -> str:
    """The last `Name: message` line of a Ray error's text (the worker's own exception), or its type."""
    found = EXCEPTION_LINE.findall(str(error))
    return found[-1] if found else type(error).__name__


# --- reading ----------------------------------------------------------------------


def read_file_events(index: int, uttid: str, path: str, *, settings, mode: str, validate):
    """One file's segment events, read and cut as the single engine does (`recordings.segment_events`)."""
    return segment_events([(index, Utterance(uttid, path))], settings, mode, validate)


def read_chunks(read_events: Callable, files: list[tuple[int, str, str, int]], chunk_segments: int,
                chunk_samples: int) -> Iterator:  # fmt: skip
    """A Ray streaming task: a block of files as chunks, each two objects, the audio then its events.

    `files` are `(index, uttid, path, segments to leave out)`: a file read again
    after its task failed gives only the segments not given before. The audio is a
    list of float32 arrays, one per `SegmentReady` event of the chunk, in order;
    those events carry no samples. Any failure while reading one file becomes its
    `FileFailed`: a bad file never ends the others' reading.
    """
    audio: list[np.ndarray] = []
    events: list = []
    held = 0
    for index, uttid, path, leave_out in files:
        try:
            for event in read_events(index, uttid, path):
                if isinstance(event, SegmentReady):
                    if event.number < leave_out:
                        continue
                    audio.append(np.ascontiguousarray(event.samples, dtype=np.float32))
                    events.append(dataclasses.replace(event, samples=None))
                    held += len(audio[-1])
                    if len(audio) >= chunk_segments or held >= chunk_samples:
                        yield audio
                        yield events
                        audio, events, held = [], [], 0
                else:
                    events.append(event)
        except Exception as error:  # a bug in one file's reading must not end everyone's run: report it
            events.append(FileFailed(index, AudioError(f"{type(error).__name__}: {error}")))
    if events:
        yield audio
        yield events


def file_size(path: str) -> float:
    """A file's size in bytes, 0 when it cannot be seen (its read task reports why)."""
    try:
        return float(os.stat(path).st_size)
    except (OSError, ValueError):
        return 0.0


def read_order(files: list, sizes: list[float], per_block: int) -> list[list]:
    """Read tasks' blocks: files over `LONG_FILE_FACTOR` x the median size one per block, largest first,
    taking turns with blocks of `per_block` other files in input order (so short files flow from the start)."""
    median = sorted(sizes)[len(sizes) // 2] if sizes else 0.0
    long = sorted((n for n, size in enumerate(sizes) if median > 0 and size > LONG_FILE_FACTOR * median),
                  key=lambda n: -sizes[n])  # fmt: skip
    skip = set(long)
    rest = [f for n, f in enumerate(files) if n not in skip]
    short_blocks = [rest[n : n + per_block] for n in range(0, len(rest), per_block)]
    turns = itertools.zip_longest([[files[n]] for n in long], short_blocks)
    return [block for pair in turns for block in pair if block is not None]


# --- the replicas ---------------------------------------------------------------


def vllm_decoder(job: Job, dtype: str) -> VllmBackend:
    """A replica's decoder: the single engine's, with the run's settings."""
    quiet_vllm_logs()
    return VllmBackend(job.model, dtype=dtype, decoding=job.decoding,
                       tensor_parallel_size=job.tensor_parallel_size, seed=job.seed)  # fmt: skip


class _Chunk:
    """A chunk's audio in the object store and the segments still to decode from it."""

    __slots__ = ("audio", "segments", "deaths")

    def __init__(self, audio, segments: list[tuple[tuple[int, int], int]], deaths: int = 0):
        self.audio, self.segments, self.deaths = audio, segments, deaths


class _Replica:
    """The driver's view of one replica: its handle, its call in flight and the segments it holds."""

    def __init__(self, handle):
        self.handle = handle
        self.call = None  # the `results` call in flight
        self.held: dict[tuple[int, int], _Chunk] = {}
        # Its incarnation as of its last answer (`EngineReplica.results`); None when not known.
        self.incarnation: str | None = None
        # False after a failed call, until the replica answers again (Ray restarts it meanwhile).
        self.answering = True
        # Not asked again before this time (`time.monotonic`) after a failed call.
        self.retry_at = 0.0
        self.gone = False


class _Reader:
    """A read task in flight: its files, the audio object it gave last, the files it has settled."""

    def __init__(self, files: list[tuple[int, str, str, int]]):
        self.files = files
        self.audio = None
        self.expect_audio = True
        self.segments: dict[int, int] = {index: leave_out for index, _, _, leave_out in files}
        self.settled: set[int] = set()


def plugin_probe(distribution: str = PLUGIN_DISTRIBUTION, entry_point: tuple[str, str] = PLUGIN_ENTRY_POINT):
    """A function that says what a node lacks to load the plugin (None: nothing).

    Nested, so Ray ships it by value: it runs on a node where this package is
    not installed at all, which is what it looks for.
    """

    def probe() -> str | None:
        import importlib.metadata

        try:
            found = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"{distribution} is not installed"
        group, value = entry_point
        if not any(ep.group == group and ep.value == value for ep in found.entry_points):
            return f"{distribution} {found.version} is installed without its {group} entry point {value}"
        return None

    return probe


def check_nodes(ray) -> None:
    """Every live node can load the plugin, or TranscriptionFailed naming the nodes and the fix."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(plugin_probe())
    nodes = [node for node in ray.nodes() if node["Alive"]]
    answers = ray.get([
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
        for node in nodes
    ])  # fmt: skip
    missing = [f"{node['NodeManagerAddress']} ({answer})" for node, answer in zip(nodes, answers) if answer]
    if missing:
        raise TranscriptionFailed(
            f"--engine ray: the plugin is missing on {', '.join(missing)}; pip install fireredasr-vllm (and "
            "vLLM) on every node: Ray's runtime_env does not install the entry point vLLM finds plugins by"
        )


class RayStopped(Exception):
    """The run cannot go on (an engine that cannot start, a decoder that broke): the worker's exception line."""


class RayTranscription:
    """One run on a Ray cluster: read tasks, `job.num_replicas` engine replicas, and the driver loop.

    `make_decoder`, `read_events` and `size_of` replace the vLLM engine, the
    audio reader and the file sizes that order the reading
    (`benchmarks/ray_scaling.py` passes a simulated engine and synthetic
    recordings); `replica_options` adds Ray options to the replicas.
    """

    def __init__(self, job: Job, dtype: str, settings, validate, *, make_decoder: Callable | None = None,
                 read_events: Callable | None = None, size_of: Callable[[str], float] | None = None,
                 replica_options: dict | None = None):  # fmt: skip
        try:
            import ray
        except ImportError:
            raise TranscriptionFailed(
                "--engine ray needs Ray: pip install 'fireredasr-vllm[ray]' (ray 2.60) on every node"
            ) from None
        self.ray, self.job = ray, job
        self.make_decoder = make_decoder or functools.partial(vllm_decoder, job, dtype)
        self.read_events = read_events or functools.partial(read_file_events, settings=settings, mode=job.segment,
                                                            validate=validate)  # fmt: skip
        self.size_of = size_of or file_size
        self.replica_options = replica_options or {}
        self.replicas: list[_Replica] = []
        # Where the driver's time goes (seconds) and what it handled, for the benchmark.
        self.timings = {"wait": 0.0, "read": 0.0, "dispatch": 0.0, "results": 0.0, "settle": 0.0}
        self.counts = {"chunks": 0, "segments": 0, "results": 0, "ignored": 0, "requeued": 0, "replica_deaths": 0,
                       "reader_failures": 0, "calls": 0, "pushes": 0}  # fmt: skip
        # A cluster someone else started (a test, a notebook) is theirs to end.
        self.started = not ray.is_initialized()
        if self.started:
            local = {}
            if job.ray_address is None:
                # Room for the read tasks beside one CPU per engine actor, even on a small machine.
                local = {"include_dashboard": False, "num_cpus": max(os.cpu_count() or 1, job.num_replicas + 1)}
            try:
                ray.init(address=job.ray_address, logging_level=logging.WARNING, **local)
            except ConnectionError as error:
                raise TranscriptionFailed(
                    f"--ray-address {job.ray_address}: {error}; start the cluster with `ray start` first"
                ) from None
        if make_decoder is None:
            check_nodes(ray)

    # --- the replicas -------------------------------------------------------------

    def _engine_resources(self) -> dict:
        if self.ray.cluster_resources().get("GPU", 0) > 0:
            return {"num_gpus": self.job.tensor_parallel_size}
        return {"num_cpus": 1}

    def start_replicas(self) -> list:
        """Start the replicas (each loads its engine in the background); their handles."""
        if not self.replicas:
            options = {**self._engine_resources(), **self.replica_options}
            # Two calls at once: `push` while `results` waits for answers.
            actor = self.ray.remote(EngineReplica).options(max_restarts=-1, max_task_retries=0, max_concurrency=2,
                                                           **options)  # fmt: skip
            self.replicas = [
                _Replica(actor.remote(self.make_decoder, self.job.decoding, self.job.batch_size, self._answer_at))
                for _ in range(self.job.num_replicas)
            ]
        return [replica.handle for replica in self.replicas]

    @property
    def _capacity(self) -> int:
        """Segments a replica holds at most: its engine's batch, and enough more that it does not
        run dry between two of the driver's deliveries (it answers when it has decoded half of
        that more, `_answer_at`, so a delivery comes while it still has the other half)."""
        return self.job.batch_size + max(CHUNK_SEGMENTS, self.job.batch_size // 2)

    @property
    def _answer_at(self) -> int:
        return (self._capacity - self.job.batch_size) // 2

    # --- the run --------------------------------------------------------------------

    def run(self, pending: list[tuple[int, Utterance]], on_finished, on_audio) -> None:
        try:
            self._run(pending, on_finished, on_audio)
        except RayStopped as stopped:
            raise TranscriptionFailed(f"the Ray run stopped: {stopped} (the worker's traceback is above); rerun "
                                      "with --resume to keep what is written") from None  # fmt: skip

    def _run(self, pending: list[tuple[int, Utterance]], on_finished, on_audio) -> None:
        ray, timings = self.ray, self.timings
        uttids = {i: u.uttid for i, u in pending}
        assembler = Assembler(uttids, on_audio=on_audio)
        replicas = len(self.start_replicas())
        max_readers = max(2, int(ray.cluster_resources().get("CPU", 1) / READ_CPUS))
        per_block = max(1, min(BLOCK_FILES, math.ceil(len(pending) / (2 * max_readers))))
        files = [(i, u.uttid, str(u.path), 0) for i, u in pending]
        blocks = deque(read_order(files, [self.size_of(path) for _, _, path, _ in files], per_block))
        readers: dict = {}
        ready: deque[_Chunk] = deque()
        # Segments read ahead of the replicas: enough to refill every one of them at once.
        ready_limit = replicas * CHUNK_SEGMENTS + self.job.batch_size
        chunk_samples = int(CHUNK_SECONDS * spec.SAMPLE_RATE)
        read_task = ray.remote(read_chunks).options(num_cpus=READ_CPUS, max_retries=READ_RETRIES,
                                                    _generator_backpressure_num_objects=READ_AHEAD_OBJECTS)  # fmt: skip
        unsettled = len(pending)
        # Shipped once, not with every read task (it holds the feature extractor's checks).
        read_events = ray.put(self.read_events)

        def settle() -> None:
            nonlocal unsettled
            start = time.perf_counter()
            for finished in assembler.take_settled():
                unsettled -= 1
                on_finished(finished)
            timings["settle"] += time.perf_counter() - start

        def ready_segments() -> int:
            return sum(len(chunk.segments) for chunk in ready)

        def start_reading() -> None:
            while blocks and len(readers) < max_readers and ready_segments() < ready_limit:
                block = blocks.popleft()
                generator = read_task.remote(read_events, block, CHUNK_SEGMENTS, chunk_samples)
                readers[generator] = _Reader(block)

        def take_events(reader: _Reader, events: list) -> None:
            positions, number = {}, 0
            for event in events:
                if isinstance(event, SegmentReady):
                    positions[(event.file, event.number)] = number
                    number += 1
                    reader.segments[event.file] = event.number + 1
                else:
                    reader.settled.add(event.file)
            segments = [(key, positions[key]) for key, _ in assembler.clips(events)]
            if segments:
                ready.append(_Chunk(reader.audio, segments))
                self.counts["chunks"] += 1
                self.counts["segments"] += len(segments)

        def reader_failed(reader: _Reader, error: Exception) -> None:
            """Files a read task left unsettled: each read again on its own, or failed if it was alone."""
            self.counts["reader_failures"] += 1
            unsettled_files = [f for f in reader.files if f[0] not in reader.settled]
            if len(reader.files) > 1:
                blocks.extendleft(reversed([[(i, u, p, reader.segments[i])] for i, u, p, _ in unsettled_files]))
                return
            for index, *_ in unsettled_files:
                list(assembler.clips([FileFailed(index, AudioError(f"reading it failed: {exception_line(error)}"))]))

        def on_reader(generator) -> None:
            reader = readers[generator]
            try:
                reference = next(generator)
            except StopIteration:
                del readers[generator]
                if all(f[0] in reader.settled for f in reader.files):
                    return
                # The task failed for good (its worker died READ_RETRIES + 1 times): its last object says why.
                try:
                    ray.get(reader.audio)
                    error = RuntimeError("its read task ended early")
                except ray.exceptions.RayError as failure:
                    error = failure
                reader_failed(reader, error)
                return
            if reader.expect_audio:
                reader.audio, reader.expect_audio = reference, False
                return
            reader.expect_audio = True
            try:
                events = ray.get(reference)
            except ray.exceptions.RayError as error:
                del readers[generator]
                reader_failed(reader, error)
                return
            take_events(reader, events)

        def dispatch() -> None:
            """Ready chunks, one at a time in turn, to the replicas with room; then a `results` call
            in flight for every replica that holds work (or has not answered since a failure)."""
            open_replicas = [r for r in self.replicas if r.answering and not r.gone and len(r.held) < self._capacity]
            deliveries: dict[int, list] = {}
            while ready and open_replicas:
                for replica in list(open_replicas):
                    if not ready:
                        break
                    chunk = ready.popleft()
                    for key, _ in chunk.segments:
                        replica.held[key] = chunk
                    deliveries.setdefault(id(replica), []).append(([chunk.audio], chunk.segments))
                    if len(replica.held) >= self._capacity:
                        open_replicas.remove(replica)
            now = time.monotonic()
            for replica in self.replicas:
                if id(replica) in deliveries:
                    # Not waited for: a push that is lost with its replica is found by `results`
                    # (the call fails, or the answer comes from a new incarnation).
                    replica.handle.push.remote(deliveries[id(replica)])
                    self.counts["pushes"] += 1
                if replica.call is None and not replica.gone and (replica.held or not replica.answering) \
                        and now >= replica.retry_at:  # fmt: skip
                    replica.call = replica.handle.results.remote()
                    self.counts["calls"] += 1

        def replica_lost(replica: _Replica, error: Exception) -> None:
            """A call to a replica failed: it died and Ray restarts it, or it is gone for good.

            Its segments go back to the front of the queue for the others, and it gets
            nothing more until it answers again.
            """
            if getattr(error, "actor_init_failed", False) or not isinstance(error, ray.exceptions.RayActorError) \
                    and isinstance(error, ray.exceptions.RayTaskError):  # fmt: skip
                # An engine that cannot start, or a decoder that broke: no restart will help.
                raise RayStopped(exception_line(error)) from error
            if replica.answering:
                self.counts["replica_deaths"] += 1
            replica.answering, replica.incarnation = False, None
            # Unavailable: restarting (calls fail until it is back: ask again a little later).
            # Died: ended for good (Ray would restart it otherwise).
            replica.retry_at = time.monotonic() + RETRY_S
            replica.gone = isinstance(error, ray.exceptions.ActorDiedError)
            requeue(replica, exception_line(error))
            if all(r.gone for r in self.replicas):
                raise RayStopped(f"every replica is gone: {exception_line(error)}") from error

        def requeue(replica: _Replica, why: str) -> None:
            """The segments a replica held go back to the front of the queue, or fail their recording
            when their replicas died `MAX_REPLICA_DEATHS` times."""
            chunks: dict[int, _Chunk] = {}
            for key, chunk in replica.held.items():
                again = chunks.setdefault(id(chunk), _Chunk(chunk.audio, [], chunk.deaths + 1))
                again.segments += [(k, p) for k, p in chunk.segments if k == key]
            replica.held.clear()
            for chunk in reversed(chunks.values()):
                if chunk.deaths >= MAX_REPLICA_DEATHS:
                    for key, _ in chunk.segments:
                        assembler.result(key, RecordingError(
                            f"the replica decoding it died {chunk.deaths} times ({why})"))
                    continue
                self.counts["requeued"] += len(chunk.segments)
                ready.appendleft(chunk)

        def on_answer(replica: _Replica) -> None:
            reference, replica.call = replica.call, None
            try:
                incarnation, answers = ray.get(reference)
            except ray.exceptions.RayError as error:
                replica_lost(replica, error)
                return
            replica.answering = True
            # Restarted since its last answer without a call of ours failing (it died between two
            # calls): what it was given before is lost, kept only by this driver.
            restarted = replica.incarnation not in (None, incarnation)
            replica.incarnation = incarnation
            for key, text, error in answers:
                if replica.held.pop(key, None) is None:
                    # Its replica was given up for dead after all, and the segment went elsewhere.
                    self.counts["ignored"] += 1
                    continue
                self.counts["results"] += 1
                assembler.result(key, RecordingError(error) if error else SegmentText(text))
            if restarted and replica.held:
                # Some of these may be in its new inbox: their late answers are ignored.
                self.counts["replica_deaths"] += 1
                requeue(replica, "it was restarted")

        while True:
            settle()
            held = sum(len(r.held) for r in self.replicas)
            if not (blocks or readers or ready or held):
                break
            start = time.perf_counter()
            start_reading()
            dispatch()
            timings["dispatch"] += time.perf_counter() - start
            calls = {r.call: r for r in self.replicas if r.call is not None}
            waiting = list(calls)
            if ready_segments() < ready_limit:
                waiting += list(readers)
            if not waiting:
                # Nothing in flight: every replica with work is being restarted. Until the first is asked again.
                retry = min((r.retry_at for r in self.replicas if not r.gone), default=0.0)
                time.sleep(max(GATHER_S, retry - time.monotonic()))
                continue
            start = time.perf_counter()
            # At most RETRY_S, so that a replica whose call failed is asked again.
            done, _ = ray.wait(waiting, num_returns=1, timeout=RETRY_S, fetch_local=False)
            timings["wait"] += time.perf_counter() - start
            # And what else gets ready within GATHER_S: one pass of the loop for several answers.
            if done and len(waiting) > 1:
                done, _ = ray.wait(waiting, num_returns=len(waiting), timeout=GATHER_S, fetch_local=False)
            for item in done:
                start = time.perf_counter()
                if isinstance(item, ray.ObjectRefGenerator):
                    on_reader(item)
                    timings["read"] += time.perf_counter() - start
                else:
                    on_answer(calls[item])
                    timings["results"] += time.perf_counter() - start
        if unsettled:
            raise RayStopped(f"{unsettled} recordings were never settled")  # pragma: no cover

    def replica_stats(self) -> list[dict]:
        """Each replica's counters (`EngineReplica.stats`), for the benchmark; a replica that is
        restarting (it was killed) has none."""
        stats = []
        for reference in [r.handle.stats.remote() for r in self.replicas if not r.gone]:
            try:
                stats.append(self.ray.get(reference, timeout=10))
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
                continue
        return stats

    def close(self) -> None:
        for replica in self.replicas:
            # Ends the actor's process, and with it an engine that runs in it; vLLM's own
            # worker processes (tensor parallelism) end when their parent does.
            self.ray.kill(replica.handle, no_restart=True)
        self.replicas = []
        if self.started:
            self.ray.shutdown()

    def load_note(self, seconds: float) -> str:
        replicas = self.job.num_replicas
        return f"Ray start {seconds:.1f} s, {replicas} replica{'s' if replicas > 1 else ''} loaded within the run"
