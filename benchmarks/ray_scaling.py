"""Ray path scaling by simulation: `--engine ray`'s driver, read tasks and replicas with a simulated engine.

No machine here holds more than two slow CPU engines, so this runs the Ray
path's own code (`fireredasr_vllm.ray_transcription.RayTranscription`, its read
tasks and `ray_replica.EngineReplica` actors, the command's `OrderedWriter`)
with two stand-ins:

- a simulated engine in each replica (`SimulatedEngine`): it takes clips from
  the replica's inbox exactly as the vLLM loop does (up to `--batch-size` in
  flight, a new one whenever one finishes) and answers each after the time a
  continuous-batching engine would take (`EngineModel`: a decoding step whose
  time grows with the running batch, tokens per clip from the clip's length,
  a prefill cost per second of audio). It sleeps instead of computing, so one
  small machine holds 64 replicas;
- synthetic recordings (`Workload`): thousands of clips with a length mix
  (mostly 1-30 s, some of minutes, some of an hour), read by the real read
  tasks from a description instead of a file (`SimulatedReader`: segments cut
  as the voice activity detector cuts them, each after a read time; by default
  each segment's audio is described by its length, `--payload samples` ships
  real-sized float32 arrays through the object store).

For each replica count it runs a workload sized to `--run-seconds` at the
ideal rate, after the replicas have started, and prints segments/s, files/s and
the efficiency: achieved / (replicas x one replica's rate), one replica's rate
being the simulated engine alone on the same workload (no Ray). It then says
where the time went: the driver's CPU per segment and its loop's parts, the
replicas' fetch, idle and starved time, and the CPU every process of the run
used per segment by role (driver, replicas, read workers, Ray's own), which on
a shared machine says how much of it the run got (`--profile` writes the
driver's cProfile). Every run's output must equal, byte for
byte, the single engine's (`transcribe.decode_recordings` over the same
segments in this process); the script fails otherwise.

    python benchmarks/ray_scaling.py                                    # 1, 2, 4, ..., 32 replicas
    python benchmarks/ray_scaling.py --replicas 32 --kill-every 2       # kill a random replica every 2 s

Figures and the sizing rule they give: docs/scaling.md.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import random
import threading
import time

import click
import numpy as np

from fireredasr_converter import spec
from fireredasr_vllm.audio_input import Utterance
from fireredasr_vllm.decoding import GREEDY
from fireredasr_vllm.engine import Intake
from fireredasr_vllm.ray_transcription import CHUNK_SEGMENTS, READ_CPUS, RayTranscription
from fireredasr_vllm.recordings import FileEnd, SegmentReady
from fireredasr_vllm.segmenter import Segment
from fireredasr_vllm.transcribe import Job, LineOutput, OrderedWriter, decode_recordings

RATE = spec.SAMPLE_RATE


# --- the simulated engine -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EngineModel:
    """Service times of FireRedASR-LLM-L (Qwen2-7B + Conformer encoder, bf16) on one H100-class GPU.

    Derived, not measured (no GPU here): a decoding step reads every weight once
    (7.6e9 parameters x 2 bytes at the H100 SXM's 3.35 TB/s is 4.5 ms; vLLM's
    decoding reaches about 65% of it: 7 ms), and each running request adds its
    share of compute (2 x 7.6e9 FLOPs per token at ~400 TFLOPS achieved: 40 us);
    prefill runs the encoder and the LLM over 12.5 speech embeddings per second
    of audio (0.6 ms per second of audio); Mandarin speech is 4-5 characters a
    second and Qwen2's tokenizer gives ~1.3 characters per token, so 3.5 tokens
    per second of audio, plus the closing <|im_end|>. `time_scale` stretches
    every time alike (`--replica-rate` sets it so one replica makes that rate).
    """

    step_s: float = 0.007
    step_per_request_s: float = 40e-6
    prefill_s_per_audio_s: float = 0.6e-3
    tokens_per_audio_s: float = 3.5
    time_scale: float = 1.0

    def tokens(self, seconds: float) -> int:
        return max(1, round(seconds * self.tokens_per_audio_s)) + 1

    def step(self, running: int) -> float:
        return (self.step_s + self.step_per_request_s * running) * self.time_scale

    def prefill(self, seconds: float) -> float:
        return self.prefill_s_per_audio_s * seconds * self.time_scale


@dataclasses.dataclass(frozen=True)
class SimulatedText:
    """What the replica reads of a result (`text`): the clip's length, so outputs can be compared."""

    text: str


class VirtualClock:
    """Time that passes only when slept: one replica's rate computed in no time."""

    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class RealClock:
    def time(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class SimulatedEngine:
    """A decoder (the interface `transcribe.VllmBackend` has) that answers after `EngineModel`'s times.

    Pulls clips as `offline.stream_transcriptions` does: up to `batch_size` in
    flight, new ones at each step while there is room; requests that join pay
    their prefill in the next step. While the batch is full it changes only when
    a request finishes, so it sleeps once per completion, not once per step.
    """

    def __init__(self, model: EngineModel, described: bool, clock=None, start_seconds: float = 0.0):
        self.model, self.described = model, described
        self.clock = clock or RealClock()
        # Time decoding, running requests x that time, and time lost oversleeping (a loaded machine).
        self.counters = {"busy_s": 0.0, "batch_s": 0.0, "late_s": 0.0}
        # An engine load, e.g. after a replica is killed and restarted.
        self.clock.sleep(start_seconds)

    def seconds(self, samples: np.ndarray) -> float:
        return (float(samples[0]) if self.described else len(samples)) / RATE

    def transcribe(self, clips, decoding, *, batch_size: int):
        clock, model = self.clock, self.model
        intake = Intake(clips)
        running: dict = {}  # key -> [tokens left, text]
        prefill = 0.0
        next_time = clock.time()
        while True:
            for key, samples in intake.take(lambda: len(running) < batch_size):
                seconds = self.seconds(samples)
                running[key] = [model.tokens(seconds), f"{round(seconds * RATE)} samples"]
                prefill += model.prefill(seconds)
            if not running:
                return
            # Time lost waiting for clips is the engine idling, not decoding.
            next_time = max(next_time, clock.time())
            # A full batch changes only when a request finishes; one with room takes new requests at
            # the next step, as the vLLM loop adds one whenever it steps with room.
            full = intake.done or len(running) >= batch_size
            steps = min(left for left, _ in running.values()) if full else 1
            span = prefill + steps * model.step(len(running))
            next_time += span
            prefill = 0.0
            clock.sleep(next_time - clock.time())
            self.counters["busy_s"] += span
            self.counters["batch_s"] += span * len(running)
            self.counters["late_s"] += max(0.0, clock.time() - next_time)
            for key in list(running):
                running[key][0] -= steps
                if running[key][0] == 0:
                    yield key, SimulatedText(running.pop(key)[1])

    def stats(self) -> dict:
        return dict(self.counters)

    def close(self) -> None:
        """Nothing to end."""


def simulated_engine(model: EngineModel, described: bool, restart_seconds: float) -> SimulatedEngine:
    """A replica's decoder: a replica that Ray restarted (after a kill) first loads for `restart_seconds`."""
    import warnings

    import ray

    with warnings.catch_warnings():
        # Ray 2.60 warns about its own use of a deprecated attribute inside this property.
        warnings.simplefilter("ignore", DeprecationWarning)
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
    return SimulatedEngine(model, described, start_seconds=restart_seconds if restarted else 0.0)


class DyingEngine(SimulatedEngine):
    """A simulated engine whose process ends (as when a GPU worker crashes) as it gets its `after`-th
    result, before answering it: at most `deaths` times in a run (marker files in `marks` count them),
    so that the replicas Ray restarts live."""

    def __init__(self, model: EngineModel, described: bool, marks: str, after: int, deaths: int):
        super().__init__(model, described)
        self.marks, self.after, self.deaths = marks, after, deaths

    def transcribe(self, clips, decoding, *, batch_size: int):
        for number, item in enumerate(super().transcribe(clips, decoding, batch_size=batch_size), 1):
            if number == self.after and self._claim_a_death():
                os._exit(1)
            yield item

    def _claim_a_death(self) -> bool:
        for death in range(self.deaths):
            try:
                os.close(os.open(os.path.join(self.marks, f"death-{death}"), os.O_CREAT | os.O_EXCL))
                return True
            except FileExistsError:
                continue
        return False


# --- synthetic recordings ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """Recordings as (uttid, seconds), and the segments each is cut into (start, end in samples)."""

    recordings: list[tuple[str, float]]
    cuts: dict[str, list[tuple[int, int]]]

    @property
    def segments(self) -> int:
        return sum(len(c) for c in self.cuts.values())

    @property
    def audio_seconds(self) -> float:
        return sum(seconds for _, seconds in self.recordings)

    @staticmethod
    def path(seconds: float) -> str:
        """A recording's "path": its length, all a reader needs with its uttid (`recording_cuts`), so the
        reader shipped to every read task stays small however large the workload."""
        return repr(seconds)


def recording_cuts(uttid: str, seconds: float) -> list[tuple[int, int]]:
    """A recording's segments, the same wherever they are computed: cut with a generator seeded by its id."""
    return cut(seconds, random.Random(uttid))


def cut(seconds: float, rng: random.Random, max_seconds: float = 30.0) -> list[tuple[int, int]]:
    """Segments as the VAD leaves them: a clip up to 30 s whole, a longer one in 8-28 s stretches of speech."""
    total = round(seconds * RATE)
    if seconds <= max_seconds:
        return [(0, total)]
    segments, at = [], round(rng.uniform(0.1, 1.0) * RATE)
    while at < total - RATE:
        end = min(total, at + round(rng.uniform(8.0, 28.0) * RATE))
        segments.append((at, end))
        at = end + round(rng.uniform(0.3, 2.0) * RATE)
    return segments


def make_workload(segments: int, long_share: float, hour_files: int, seed: int) -> Workload:
    """About `segments` segments: clips of 1-30 s (log-normal around 5 s), and recordings over 30 s
    giving `long_share` of the segments: `hour_files` of an hour, the rest of 1-10 minutes; in random order."""
    rng = random.Random(seed)
    durations, long_segments = [3600.0] * hour_files, hour_files * 3600.0 / 19.0
    while long_segments < long_share * segments:
        durations.append(rng.uniform(60.0, 600.0))
        long_segments += durations[-1] / 19.0
    short = max(0, segments - round(long_segments))
    durations += [min(30.0, max(1.0, rng.lognormvariate(math.log(5.0), 0.6))) for _ in range(short)]
    rng.shuffle(durations)
    recordings = [(f"u{n:07d}", seconds) for n, seconds in enumerate(durations)]
    return Workload(recordings, {uttid: recording_cuts(uttid, seconds) for uttid, seconds in recordings})


@dataclasses.dataclass(frozen=True)
class ReadModel:
    """Read-task CPU times, measured on this machine with the real reader (`recordings.segment_events`,
    one thread; docs/scaling.md): a 16 kHz WAV clip of up to 30 s costs `file_s` plus `s_per_audio_s`
    per second, a longer recording the voice activity detector's pass, `vad_s_per_audio_s` per second."""

    file_s: float = 0.3e-3
    s_per_audio_s: float = 0.07e-3
    vad_s_per_audio_s: float = 1.5e-3


def read_seconds(workload: Workload, model: ReadModel) -> float:
    """The read tasks' CPU time over the workload."""
    return sum(model.file_s + (model.s_per_audio_s * seconds if seconds <= 30.0 else model.vad_s_per_audio_s * seconds)
               for _, seconds in workload.recordings)  # fmt: skip


class SimulatedReader:
    """A read task's `read_events`: a recording's segment events from its description, after the read time."""

    def __init__(self, model: ReadModel, described: bool):
        self.model, self.described = model, described

    def __call__(self, index: int, uttid: str, path: str):
        seconds = float(path)
        cuts = recording_cuts(uttid, seconds)
        time.sleep(self.model.file_s + (self.model.s_per_audio_s * seconds if seconds <= 30.0 else 0.0))
        covered = 0
        for number, (start, end) in enumerate(cuts):
            if seconds > 30.0:
                time.sleep(self.model.vad_s_per_audio_s * (end - covered) / RATE)
            samples = np.array([end - start], dtype=np.float32) if self.described else np.zeros(end - start, np.float32)
            yield SegmentReady(index, number, Segment(start, end), samples, start - covered)
            covered = end
        yield FileEnd(index, len(cuts), round(seconds * RATE))


class CrashingReader(SimulatedReader):
    """A reader whose worker process dies (as on a segfault) reading some files: `once` on their
    third segment the first time only (a marker file in `marks` remembers), `always` every time."""

    def __init__(self, model: ReadModel, described: bool, marks: str, once: set[str] = frozenset(),
                 always: set[str] = frozenset()):  # fmt: skip
        super().__init__(model, described)
        self.marks, self.once, self.always = marks, set(once), set(always)

    def __call__(self, index: int, uttid: str, path: str):
        mark = os.path.join(self.marks, uttid)
        for event in super().__call__(index, uttid, path):
            crash = uttid in self.always or uttid in self.once and not os.path.exists(mark)
            if crash and (getattr(event, "number", 0) >= 2 or isinstance(event, FileEnd)):
                open(mark, "w").close()
                os._exit(1)
            yield event


# --- runs ---------------------------------------------------------------------------------


def single_engine(workload: Workload, reader: SimulatedReader, model: EngineModel, batch_size: int):
    """The single engine's loop over the workload in virtual time: its output and its segments/s."""
    clock = VirtualClock()
    engine = SimulatedEngine(model, reader.described, clock)
    stream = io.StringIO()
    writer = OrderedWriter(LineOutput("text", stream), range(len(workload.recordings)))
    uttids = {i: uttid for i, (uttid, _) in enumerate(workload.recordings)}

    def events():
        for index, (uttid, seconds) in enumerate(workload.recordings):
            for event in reader(index, uttid, Workload.path(seconds)):
                yield event

    saved, reader.model = reader.model, ReadModel(0.0, 0.0, 0.0)  # reading is not the engine's time
    try:
        decode_recordings(engine, events(), uttids, GREEDY, batch_size,
                          lambda finished: writer.settle(finished.file, finished.transcript))  # fmt: skip
    finally:
        reader.model = saved
    return stream.getvalue(), workload.segments / clock.now, clock.now


def calibrate(rate: float | None, batch_size: int, seed: int) -> EngineModel:
    """The engine model, its times scaled so one replica makes `rate` segments/s on a typical workload."""
    model = EngineModel()
    if rate is None:
        return model
    workload = make_workload(4000, 0.1, 1, seed)
    _, native, _ = single_engine(workload, SimulatedReader(ReadModel(), True), model, batch_size)
    return dataclasses.replace(model, time_scale=native / rate)


class Killer(threading.Thread):
    """Kills a random replica every `every` seconds (Ray restarts it) until stopped or `most` kills."""

    def __init__(self, ray, handles: list, every: float, seed: int, most: int | None = None):
        super().__init__(daemon=True)
        self.ray, self.handles, self.every = ray, handles, every
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.kills, self.most = 0, most

    def run(self) -> None:
        while not self.stop.wait(self.every) and (self.most is None or self.kills < self.most):
            self.ray.kill(self.rng.choice(self.handles), no_restart=False)
            self.kills += 1


def ray_run(ray, workload: Workload, reader: SimulatedReader, model: EngineModel, replicas: int, batch_size: int,
            kill_every: float | None = None, restart_seconds: float = 0.0, seed: int = 0,
            most_kills: int | None = None, on_audio=lambda seconds: None, profile: str | None = None,
            make_decoder=None) -> dict:  # fmt: skip
    """One run of the Ray path over `workload`: its output, wall and driver CPU time, the driver's
    timings and counts, the replicas' stats, kills, and CPU by role (`cpu_roles`). `on_audio` hears
    the audio seconds the driver counts for progress; `profile` names a file for the driver's cProfile;
    `make_decoder` replaces the replicas' simulated engine (`DyingEngine`)."""
    job = Job(model="simulated", engine="ray", num_replicas=replicas, batch_size=batch_size)
    transcription = RayTranscription(
        job, "float32", None, None,
        make_decoder=make_decoder or functools.partial(simulated_engine, model, reader.described, restart_seconds),
        read_events=reader,
        size_of=float,
        replica_options={"num_cpus": 0},
    )  # fmt: skip
    stream = io.StringIO()
    writer = OrderedWriter(LineOutput("text", stream), range(len(workload.recordings)))
    try:
        handles = transcription.start_replicas()
        ray.get([h.stats.remote() for h in handles])  # every replica started: the run measures the steady rate
        killer = Killer(ray, handles, kill_every, seed, most_kills) if kill_every else None
        utterances = [(i, Utterance(uttid, Workload.path(seconds))) for i, (uttid, seconds) in enumerate(workload.recordings)]
        machine = cpu_by_process()
        cpu, start = time.process_time(), time.monotonic()
        if killer:
            killer.start()
        try:
            if profile:
                import cProfile

                profiler = cProfile.Profile(time.process_time)  # the driver's CPU, not its waits
                profiler.runcall(transcription.run, utterances, lambda f: writer.settle(f.file, f.transcript),
                                 on_audio)  # fmt: skip
                profiler.dump_stats(profile)
            else:
                transcription.run(utterances, lambda f: writer.settle(f.file, f.transcript), on_audio)
        finally:
            if killer:
                killer.stop.set()
                killer.join()
        wall, cpu = time.monotonic() - start, time.process_time() - cpu
        after = cpu_by_process()
        stats = transcription.replica_stats()
        machine = cpu_roles(machine, after, {s["pid"] for s in stats})
    finally:
        transcription.close()
    return {"output": stream.getvalue(), "wall": wall, "cpu": cpu, "timings": transcription.timings,
            "counts": transcription.counts, "replicas": stats, "kills": killer.kills if killer else 0,
            "machine": machine}  # fmt: skip


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by this process and every process under it (Ray's GCS, raylet,
    workers and actors of a cluster this process started), by pid: what the run costs the machine."""
    import psutil

    found = {}
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                name = process.name()
                command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        # A worker's title is `ray::IDLE` or `ray::<task or actor>` once it runs (Ray's agents end in Agent).
        worker = "default_worker.py" in command or command.startswith("ray::") and not command.endswith("Agent")
        role = "worker" if worker else "driver" if process.pid == me.pid else "ray"
        found[process.pid] = (role if role != "ray" else f"ray:{name}", times.user + times.system)
    return found


def cpu_roles(before: dict, after: dict, replica_pids: set[int]) -> dict[str, float]:
    """CPU seconds between two `cpu_by_process` snapshots per role: driver, replicas, read workers
    (every other Ray worker; those started during the run apart: their start-up is in it), Ray's
    own processes by name (GCS, raylet, agents)."""
    roles = {"driver": 0.0, "replicas": 0.0, "read workers": 0.0, "workers started in the run": 0.0}
    for pid, (role, seconds) in after.items():
        used = seconds - before.get(pid, (role, 0.0))[1]
        if pid in replica_pids:
            roles["replicas"] += used
        elif role == "worker":
            roles["read workers" if pid in before else "workers started in the run"] += used
        elif role == "driver":
            roles["driver"] += used
        else:
            roles[role] = roles.get(role, 0.0) + used
    return roles


def _import_reader() -> None:
    import fireredasr_vllm.ray_transcription  # noqa: F401  (what a read task's worker loads)

    # Held a moment, so that every read slot gets a worker process of its own.
    time.sleep(2.0)


@click.command()
@click.option("--replicas", default="1,2,4,8,16,32", show_default=True, help="Replica counts to run.")
@click.option("--replica-rate", type=float, default=50.0, show_default=True,
              help="Segments/s one replica makes on the workload (scales the engine model's times; 0: unscaled).")
@click.option("--run-seconds", type=float, default=20.0, show_default=True,
              help="Each run's length at the ideal rate: its workload is replicas x rate x this many segments.")
@click.option("--long-share", type=float, default=0.1, show_default=True,
              help="Share of the segments from recordings over 30 s (cut by the VAD).")
@click.option("--hour-files", type=int, default=2, show_default=True, help="Hour-long recordings in each workload.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--read-cpus", type=click.IntRange(min=1),
              help="Logical CPUs for read tasks (one each; simulated reads sleep, so they cost no real CPU) "
                   "[default: 1.5x what the largest run needs at the ideal rate].")
@click.option("--payload", type=click.Choice(["described", "samples"]), default="described", show_default=True,
              help="described: each segment's audio is its length; samples: real-sized float32 arrays.")
@click.option("--kill-every", type=float, help="Kill a random replica every this many seconds.")
@click.option("--restart-seconds", type=float, default=5.0, show_default=True,
              help="--kill-every: a restarted replica's engine load.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--profile", type=click.Path(dir_okay=False),
              help="Write the driver's cProfile of each run to PROFILE-<replicas>.prof (pstats).")
def main(replicas, replica_rate, run_seconds, long_share, hour_files, batch_size, read_cpus, payload, kill_every,
         restart_seconds, seed, profile):  # fmt: skip
    """Segments/s and efficiency of the Ray path at 1, 2, 4, ... simulated replicas."""
    import ray

    counts = [int(n) for n in replicas.split(",")]
    model = calibrate(replica_rate or None, batch_size, seed)
    described = payload == "described"
    workloads = {n: make_workload(round(n * (replica_rate or 100.0) * run_seconds), long_share, hour_files, seed + n)
                 for n in counts}  # fmt: skip
    # CPUs the read tasks need to keep up with the ideal rate (the simulated ones sleep instead).
    needed = {n: read_seconds(w, ReadModel()) / single_engine(w, SimulatedReader(ReadModel(), True), model,
                                                               batch_size)[2] * n for n, w in workloads.items()}  # fmt: skip
    read_cpus = read_cpus or max(1, math.ceil(1.5 * max(needed.values())))
    ray.init(num_cpus=math.ceil(read_cpus), include_dashboard=False, logging_level="ERROR")
    click.echo(f"engine model: step {model.step(1) * 1e3:.1f} ms + {model.step_per_request_s * model.time_scale * 1e6:.0f} "
               f"us/request, prefill {model.prefill(1.0) * 1e3:.2f} ms per audio s, {model.tokens_per_audio_s} "
               f"tokens per audio s (time scale {model.time_scale:.2f}); batch {batch_size}; read CPUs {read_cpus} "
               f"({int(read_cpus / READ_CPUS)} read tasks at once); payload {payload}")  # fmt: skip
    header = (f"{'replicas':>8} {'files':>7} {'segs':>7} {'audio h':>7} {'wall s':>7} {'segs/s':>8} {'ideal':>8} "
              f"{'eff':>6} {'files/s':>8} {'drv us/seg':>10}")  # fmt: skip
    # Read tasks run in worker processes that import torch (the real reader's VAD needs it): start them
    # before the first measured run, as a long run would have them.
    click.echo("read CPUs needed at the ideal rate: " + ", ".join(f"{n} replicas {c:.1f}" for n, c in needed.items()))
    warm = ray.remote(num_cpus=READ_CPUS)(_import_reader)
    ray.get([warm.remote() for _ in range(int(read_cpus / READ_CPUS))])
    click.echo(header)
    rows = []
    try:
        for n in counts:
            workload = workloads[n]
            reader = SimulatedReader(ReadModel(), described)
            expected, one, _ = single_engine(workload, reader, model, batch_size)
            result = ray_run(ray, workload, reader, model, n, batch_size, kill_every, restart_seconds, seed,
                             profile=f"{profile}-{n}.prof" if profile else None)  # fmt: skip
            if result["output"] != expected:
                raise click.ClickException(f"{n} replicas wrote another output than the single engine")
            rate = workload.segments / result["wall"]
            efficiency = rate / (n * one)
            rows.append((n, workload, result, rate, one, efficiency))
            click.echo(f"{n:8d} {len(workload.recordings):7d} {workload.segments:7d} {workload.audio_seconds / 3600:7.1f} "
                       f"{result['wall']:7.1f} {rate:8.1f} {n * one:8.1f} {efficiency:6.1%} "
                       f"{len(workload.recordings) / result['wall']:8.1f} {result['cpu'] / workload.segments * 1e6:10.0f}")  # fmt: skip
    finally:
        ray.shutdown()
    click.echo("every output identical to the single engine's")
    click.echo("\nwhere the time went (driver loop s; replicas: mean s per replica)")
    for n, workload, result, _, _, _ in rows:
        t, c, stats = result["timings"], result["counts"], result["replicas"]
        mean = {k: sum(s[k] for s in stats) / max(1, len(stats))
                for k in ("fetch_s", "idle_s", "starved_s", "sessions", "busy_s", "batch_s", "late_s")}
        click.echo(
            f"{n:3d} replicas: driver CPU {result['cpu']:.1f} s of {result['wall']:.1f} s "
            f"(wait {t['wait']:.1f}, read {t['read']:.2f}, dispatch {t['dispatch']:.2f}, results {t['results']:.2f}, "
            f"write {t['settle']:.2f}); {c['chunks']} chunks, {c['pushes']} pushes, {c['calls']} result calls; "
            f"replica fetch {mean['fetch_s']:.2f} s, idle {mean['idle_s']:.1f} s, starved {mean['starved_s']:.2f} s, "
            f"{mean['sessions']:.0f} sessions, decoding {mean['busy_s']:.1f} s at a mean batch of "
            f"{mean['batch_s'] / max(mean['busy_s'], 1e-9):.1f}, {mean['late_s']:.2f} s late"
            + (f"; {result['kills']} kills, {c['replica_deaths']} deaths seen, {c['requeued']} segments requeued, "
               f"{c['ignored']} late answers ignored" if kill_every else "")
        )  # fmt: skip
    click.echo(f"(chunks of up to {CHUNK_SEGMENTS} segments)")
    click.echo(f"\nCPU used during each run by role, ms per segment (this machine has {os.cpu_count()} CPUs)")
    for n, workload, result, _, _, _ in rows:
        machine = result["machine"]
        total = sum(machine.values())
        click.echo(f"{n:3d} replicas: " + ", ".join(f"{role} {seconds / workload.segments * 1e3:.2f}"
                                                    for role, seconds in machine.items())
                   + f"; all {total / workload.segments * 1e3:.2f} ms/segment, {total / result['wall']:.2f} CPUs busy")  # fmt: skip


if __name__ == "__main__":
    main()
