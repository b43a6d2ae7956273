"""`fireredasr-transcribe --engine ray`: the same run, spread over a Ray cluster with Ray Data.

Holds the Ray path of `fireredasr_vllm.transcribe.run`: a Ray Data pipeline in
which tasks read and segment the audio files (`read_recording`, on CPUs
anywhere in the cluster) and `--num-replicas` actors each hold one vLLM engine
with the plugin (`EngineReplica`) and decode with the single engine's own loop
(`transcribe.decode_recordings`, hence `offline.transcriptions`: greedy, the
HF repetition penalty and beam search alike). Finished recordings come back to
the driver, which writes them in input order through the single engine's
writers, so outputs, `--resume`, reports and exit statuses are the same. Does
not read file lists, open outputs or format transcripts.

Rows carry plain columns (ints, strings, bytes), which every Ray Data block
format holds without type inference: a recording's segments travel together,
their bounds as int64 bytes and their samples as float32 bytes; a finished
recording travels as JSON.

Why not `ray.data.llm`'s vLLM stage: it drives its own engine with a
`SamplingParams` per row, so it has neither the per-clip token limit, nor the
HF repetition penalty processor, nor this project's beam search; and its
dependencies are `ray[llm]`'s (hf_transfer, smart_open, nixl...), which pins
`vllm[audio]==0.29.0` in Ray 2.60.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re

import numpy as np

from .audio_input import AudioError, Utterance
from .recordings import FileEnd, FileFailed, Finished, SegmentReady, segment_events
from .segmenter import Segment
from .transcribe import Job, TranscriptionFailed, VllmBackend, decode_recordings, quiet_vllm_logs
from .transcript_formats import RecordingTranscript, TimedText

# What a node must have for the plugin to load in its vLLM engines.
PLUGIN_DISTRIBUTION = "fireredasr-vllm"
PLUGIN_ENTRY_POINT = ("vllm.general_plugins", "fireredasr_vllm:register")
# Read tasks: one block per file up to this many, so reading spreads over the cluster's CPUs.
MAX_READ_BLOCKS = 1024
# CPUs a read task asks for: it mostly waits on storage and the resampler. Not 1, the
# default an engine actor asks for: Ray Data fuses a map into the actors after it when
# their resources are equal, and the engine would then wait while its actor reads.
READ_CPUS = 0.5


# A traceback's exception line: `package.module.SomeError: message` at the start of a line.
EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w+(?:Error|Exception): .*)$", re.MULTILINE)


class RecordingError(Exception):
    """Why a Ray worker could not transcribe one recording (its message, as the worker reported it)."""


# --- rows -----------------------------------------------------------------------


def error_text(error: Exception) -> str:
    """An error as a row's `error` column: never empty, since empty means no error."""
    return str(error) or type(error).__name__


def read_recording(row: dict, settings, mode: str, validate) -> dict:
    """A Ray task: one file read and segmented as the single engine does (`recordings.segment_events`).

    An unreadable file, or any failure while reading it, becomes the row's
    `error`: one bad file never fails the run.
    """
    index, uttid = int(row["index"]), str(row["uttid"])
    out = {"index": index, "uttid": uttid, "error": "", "num_samples": 0, "bounds": b"", "audio": b""}
    bounds, audio = [], []
    try:
        for event in segment_events([(index, Utterance(uttid, str(row["path"])))], settings, mode, validate):
            if isinstance(event, SegmentReady):
                bounds += [event.segment.start, event.segment.end]
                audio.append(np.ascontiguousarray(event.samples, dtype=np.float32))
            elif isinstance(event, FileFailed):
                out["error"] = error_text(event.error)
            else:
                out["num_samples"] = event.num_samples
    except Exception as error:  # a bug in one file's reading must not end everyone's run: report it
        out["error"] = f"{type(error).__name__}: {error}"
    if not out["error"]:
        out["bounds"] = np.asarray(bounds, dtype=np.int64).tobytes()
        out["audio"] = b"".join(a.tobytes() for a in audio)
    return out


def recording_events(row: dict) -> list[SegmentReady | FileEnd | FileFailed]:
    """A read row as the segment events the single engine's segmenter thread yields for that file."""
    index = int(row["index"])
    if row["error"]:
        return [FileFailed(index, AudioError(str(row["error"])))]
    bounds = np.frombuffer(row["bounds"], dtype=np.int64).reshape(-1, 2)
    # A copy: arrays over the row's bytes are read-only, which torch warns about when it wraps them.
    samples = np.frombuffer(row["audio"], dtype=np.float32).copy()
    events, offset, covered = [], 0, 0
    for number, (start, end) in enumerate(bounds.tolist()):
        seg = Segment(start, end)
        events.append(SegmentReady(index, number, seg, samples[offset : offset + seg.num_samples], start - covered))
        offset, covered = offset + seg.num_samples, end
    events.append(FileEnd(index, len(bounds), int(row["num_samples"])))
    return events


def finished_row(result: Finished) -> dict:
    """A settled recording as a row for the driver."""
    if result.error is not None:
        return {"index": result.file, "error": error_text(result.error), "transcript": ""}
    transcript = result.transcript
    record = {
        "uttid": transcript.uttid,
        "duration": transcript.duration,
        "segments": [[s.start, s.end, s.text] for s in transcript.segments],
    }
    return {"index": result.file, "error": "", "transcript": json.dumps(record, ensure_ascii=False)}


def finished_from_row(row: dict) -> Finished:
    """The driver's side of `finished_row`: the recording exactly as the replica settled it."""
    index = int(row["index"])
    if row["error"]:
        return Finished(index, error=RecordingError(str(row["error"])))
    record = json.loads(row["transcript"])
    segments = tuple(TimedText(start, end, text) for start, end, text in record["segments"])
    return Finished(index, RecordingTranscript(record["uttid"], record["duration"], segments))


def _rows(batch: dict) -> list[dict]:
    """A Ray Data batch (column -> values) as rows."""
    columns = list(batch)
    return [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


def exception_line(error: Exception) -> str:
    """The last `Name: message` line of a Ray error's text (the worker's own exception), or its type."""
    found = EXCEPTION_LINE.findall(str(error))
    return found[-1] if found else type(error).__name__


# --- the replicas ---------------------------------------------------------------


class EngineReplica:
    """A Ray Data actor: one vLLM engine with the plugin, decoding batches of read recordings."""

    def __init__(self, job: Job, dtype: str):
        quiet_vllm_logs()
        # Replicas may share a node's cores: vLLM's CPU backend would bind every one of them to all cores.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self.job = job
        self.decoder = VllmBackend(job.model, dtype=dtype, decoding=job.decoding,
                                   tensor_parallel_size=job.tensor_parallel_size, seed=job.seed)  # fmt: skip

    def __call__(self, batch: dict) -> dict:
        rows = _rows(batch)
        uttids = {int(row["index"]): str(row["uttid"]) for row in rows}
        events = itertools.chain.from_iterable(recording_events(row) for row in rows)
        results: list[dict] = []
        decode_recordings(self.decoder, events, uttids, self.job.decoding, self.job.batch_size,
                          lambda result: results.append(finished_row(result)))  # fmt: skip
        return {column: [r[column] for r in results] for column in ("index", "error", "transcript")}

    def __del__(self):
        # Ray Data ends its actors when the dataset is done: end the engine's processes with them.
        decoder = getattr(self, "decoder", None)
        if decoder is not None:
            decoder.close()


# --- the cluster ----------------------------------------------------------------


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


class RayTranscription:
    """The Ray Data pipeline for one run: read tasks, then `job.num_replicas` engine actors."""

    def __init__(self, job: Job, dtype: str, settings, validate):
        try:
            import ray
        except ImportError:
            raise TranscriptionFailed(
                "--engine ray needs Ray: pip install 'fireredasr-vllm[ray]' (ray[data] 2.60) on every node"
            ) from None
        self.ray, self.job, self.dtype = ray, job, dtype
        self.read_kwargs = {"settings": settings, "mode": job.segment, "validate": validate}
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
        check_nodes(ray)

    def _engine_resources(self) -> dict:
        if self.ray.cluster_resources().get("GPU", 0) > 0:
            return {"num_gpus": self.job.tensor_parallel_size}
        return {"num_cpus": 1}

    def run(self, pending: list[tuple[int, Utterance]], on_finished, on_audio) -> None:
        import ray.data

        context = ray.data.DataContext.get_current()
        # The command's own progress line says how far the run is.
        context.enable_progress_bars = False
        items = [{"index": i, "uttid": u.uttid, "path": u.path} for i, u in pending]
        replicas = self.job.num_replicas
        # Files per engine call: every replica gets work even when there are few files.
        files_per_call = max(1, min(self.job.batch_size, math.ceil(len(items) / replicas)))
        dataset = (
            ray.data.from_items(items, override_num_blocks=min(len(items), MAX_READ_BLOCKS))
            .map(read_recording, fn_kwargs=self.read_kwargs, num_cpus=READ_CPUS)
            .map_batches(
                EngineReplica,
                fn_constructor_kwargs={"job": self.job, "dtype": self.dtype},
                batch_size=files_per_call,
                concurrency=replicas,
                **self._engine_resources(),
            )
        )
        try:
            for row in dataset.iter_rows():
                result = finished_from_row(row)
                if result.transcript is not None:
                    on_audio(result.transcript.duration)
                on_finished(result)
        except ray.exceptions.RayError as error:
            # An engine that cannot start (its node lacks the model folder, GPU memory...) or a
            # batch that failed after Ray's retries; Ray has printed the worker's traceback above.
            raise TranscriptionFailed(f"the Ray run stopped: {exception_line(error)} (the worker's traceback "
                                      "is above); rerun with --resume to keep what is written") from error  # fmt: skip

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()

    def load_note(self, seconds: float) -> str:
        replicas = self.job.num_replicas
        return f"Ray start {seconds:.1f} s, {replicas} replica{'s' if replicas > 1 else ''} loaded within the run"
