"""`fireredasr-transcribe --engine ray` (`fireredasr_vllm.ray_transcription`) on the tiny converted fixture.

The read tasks are checked without Ray or an engine: their chunks give the
very segment events the single engine's segmenter gives. Then, over a wav.scp
with a corrupt file, a recording over the model's 30 s limit (cut by the
segmenter), a clip too short and a missing file: the single engine (a
subprocess, which must not start Ray); a Ray driver with one replica (a
subprocess on the test's cluster) killed with SIGKILL halfway through writing
its second line; and two Ray replicas that `--resume` what it left, one of them
dying (its process ends) as it decodes its first segment. The file must end
byte for byte as the single engine wrote it, the bad items reported: nothing
lost, nothing written twice. (One resumed run checks all three, each engine
load costing ~20-40 s here.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import speech_recording

from fireredasr_converter import spec
from fireredasr_converter.configuration import FireRedAsrLlmConfig, register_with_transformers
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_vllm import ray_transcription
from fireredasr_vllm.audio_input import read_wav_scp
from fireredasr_vllm.ray_transcription import (
    PLUGIN_DISTRIBUTION,
    PLUGIN_ENTRY_POINT,
    exception_line,
    file_size,
    plugin_probe,
    read_chunks,
    read_file_events,
    read_order,
)
from fireredasr_vllm.recordings import FileEnd, FileFailed, SegmentReady, segment_events
from fireredasr_vllm.segmenter import SegmenterSettings
from fireredasr_vllm.transcribe import EXIT_PARTIAL, main

CORRUPT, LONG, TOO_SHORT, MISSING = "corrupt", "long", "too_short", "missing"
SCP_ORDER = ["clip_a", CORRUPT, LONG, TOO_SHORT, MISSING, "clip_b", "clip_c"]
BAD = {CORRUPT, TOO_SHORT, MISSING}
GOOD = [uttid for uttid in SCP_ORDER if uttid not in BAD]


@pytest.fixture(scope="module")
def wav_scp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    paths = {uttid: folder / f"{uttid}.wav" for uttid in SCP_ORDER}
    sf.write(paths["clip_a"], synthetic_speech(2 * spec.SAMPLE_RATE, seed=1), spec.SAMPLE_RATE)
    sf.write(paths["clip_b"], synthetic_speech(int(1.5 * spec.SAMPLE_RATE), seed=2), spec.SAMPLE_RATE)
    sf.write(paths["clip_c"], synthetic_speech(3 * spec.SAMPLE_RATE, seed=3), spec.SAMPLE_RATE)
    # Over the model's 30 s: cut into several segments by the voice activity detector.
    long_recording, _, _ = speech_recording(45.0)
    sf.write(paths[LONG], long_recording, spec.SAMPLE_RATE)
    paths[CORRUPT].write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    sf.write(paths[TOO_SHORT], synthetic_speech(spec.min_samples_for_one_embedding() - 1), spec.SAMPLE_RATE)
    scp = folder / "wav.scp"
    scp.write_text("".join(f"{uttid} {paths[uttid]}\n" for uttid in SCP_ORDER), encoding="utf-8")
    return scp


@pytest.fixture(scope="module")
def front_end(converted_fp32):
    """The segmenter settings and clip check `fireredasr-transcribe` uses for this repo."""
    register_with_transformers()
    config = FireRedAsrLlmConfig.from_pretrained(converted_fp32)
    extractor = FireRedAsrFeatureExtractor.from_pretrained(converted_fp32)
    validate = functools.partial(extractor.validate_waveform, downsample_rate=config.encoder_downsample_rate)
    return SegmenterSettings(max_seconds=extractor.max_audio_seconds), validate


# --- reading, without Ray or an engine ------------------------------------------------


def chunk_events(chunks: list) -> list:
    """A read task's objects (audio, events, audio, events, ...) as segment events with their samples."""
    events = []
    for audio, chunk in zip(chunks[::2], chunks[1::2]):
        samples = iter(audio)
        events += [dataclasses.replace(e, samples=next(samples)) if isinstance(e, SegmentReady) else e for e in chunk]
        assert next(samples, None) is None, "one array per segment event"
    return events


def test_read_chunks_give_the_single_engines_segment_events(wav_scp, front_end):
    settings, validate = front_end
    read_events = functools.partial(read_file_events, settings=settings, mode="auto", validate=validate)
    utterances = read_wav_scp(wav_scp)
    files = [(index, u.uttid, u.path, 0) for index, u in enumerate(utterances)]
    # Chunks of two segments: the long recording's segments span several.
    got = chunk_events(list(read_chunks(read_events, files, 2, 10**9)))
    expected = list(segment_events(list(enumerate(utterances)), settings, "auto", validate))
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        if isinstance(theirs, SegmentReady):
            assert (mine.file, mine.number, mine.segment, mine.skipped) == (
                theirs.file, theirs.number, theirs.segment, theirs.skipped)  # fmt: skip
            np.testing.assert_array_equal(mine.samples, theirs.samples)
        elif isinstance(theirs, FileFailed):
            assert (mine.file, str(mine.error)) == (theirs.file, str(theirs.error))
        else:
            assert mine == theirs
    long_index = SCP_ORDER.index(LONG)
    long_segments = [e for e in got if isinstance(e, SegmentReady) and e.file == long_index]
    assert len(long_segments) > 2, "the long recording should be cut into several segments"

    # A file read again after its task failed gives only the segments not given before.
    again = chunk_events(list(read_chunks(read_events, [(long_index, LONG, utterances[long_index].path, 2)], 2, 10**9)))
    assert [e.number for e in again if isinstance(e, SegmentReady)] == [e.number for e in long_segments[2:]]
    assert again[-1] == FileEnd(long_index, len(long_segments), again[-1].num_samples)


def test_a_file_whose_reading_breaks_fails_alone(wav_scp, front_end):
    settings, validate = front_end
    read = functools.partial(read_file_events, settings=settings, mode="auto", validate=validate)

    def breaks_on_b(index, uttid, path):
        if uttid == "clip_b":
            raise RuntimeError("decoder bug")
        return read(index, uttid, path)

    utterances = read_wav_scp(wav_scp)
    files = [(i, u.uttid, u.path, 0) for i, u in enumerate(utterances) if u.uttid in ("clip_a", "clip_b", "clip_c")]
    events = chunk_events(list(read_chunks(breaks_on_b, files, 16, 10**9)))
    ends = {e.file: e for e in events if not isinstance(e, SegmentReady)}
    b = SCP_ORDER.index("clip_b")
    assert isinstance(ends[b], FileFailed) and str(ends[b].error) == "RuntimeError: decoder bug"
    assert all(isinstance(ends[SCP_ORDER.index(u)], FileEnd) for u in ("clip_a", "clip_c"))


def test_long_files_are_read_first_between_blocks_of_the_others():
    files = [(n, f"u{n}", f"p{n}", 0) for n in range(7)]
    # u2 and u5 are over 8x the median size; u5 is the larger; u6 could not be seen (size 0).
    sizes = [10.0, 12.0, 500.0, 9.0, 11.0, 900.0, 0.0]
    blocks = read_order(files, sizes, 2)
    assert [[f[0] for f in block] for block in blocks] == [[5], [0, 1], [2], [3, 4], [6]]
    assert read_order(files, [0.0] * 7, 3) == [files[0:3], files[3:6], files[6:]]
    assert file_size("/no/such/file") == 0.0


def test_a_failed_ray_run_is_named_by_the_workers_exception():
    text = (
        "ray::MapWorker(MapBatches(EngineReplica)).__init__() (pid=8465, ip=10.0.0.7)\n"
        "Traceback (most recent call last):\n"
        '  File "vllm/engine/arg_utils.py", line 1955, in create_model_config\n'
        "    raise ValueError(message)\n"
        "ValueError: max_model_len (101024) is greater than the derived max_model_len (32768)\n"
        "\nThe above exception was the direct cause of the following exception:\n\n"
        "vllm.v1.engine.exceptions.EngineStartupError: Engine core initialization failed\n"
    )
    assert exception_line(RuntimeError(text)) == "EngineStartupError: Engine core initialization failed"
    assert exception_line(RuntimeError("actor died")) == "RuntimeError"


def test_the_plugin_probe_names_what_a_node_lacks():
    assert plugin_probe()() is None
    assert plugin_probe("no-such-distribution-xyz")() == "no-such-distribution-xyz is not installed"
    group, _ = PLUGIN_ENTRY_POINT
    lacking = plugin_probe(PLUGIN_DISTRIBUTION, (group, "elsewhere:register"))()
    assert lacking.startswith(f"{PLUGIN_DISTRIBUTION} ") and f"without its {group} entry point" in lacking


def test_ray_options_that_do_not_fit_are_usage_errors(converted_fp32, wav_scp):
    runner = CliRunner()
    base = ["-m", str(converted_fp32), "--wav-scp", str(wav_scp)]
    reference = runner.invoke(main, [*base, "--engine", "ray", "--backend", "reference"])
    assert reference.exit_code == 2 and "--engine ray runs vLLM engines: drop --backend reference" in reference.output
    replicas = runner.invoke(main, [*base, "--num-replicas", "2"])
    assert replicas.exit_code == 2 and "--num-replicas and --ray-address apply to --engine ray only" in replicas.output


# --- the single engine and Ray replicas on the same inputs -----------------------------

# The default engine, as a user runs it; afterwards it says whether Ray Data or this
# project's Ray module was loaded or a Ray cluster started. (vLLM itself imports the
# `ray` package when it is installed: its engine utilities look for it.)
SINGLE_ENGINE = """
import sys
from fireredasr_vllm.transcribe import main
try:
    main(sys.argv[1:])
except SystemExit as end:
    status = end.code
import ray
loaded = sorted(m for m in sys.modules if m.startswith("ray.data") or m == "fireredasr_vllm.ray_transcription")
print(f"exit {status}; Ray loaded: {loaded}; Ray started: {ray.is_initialized()}", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def single_engine_run(converted_fp32, wav_scp, tmp_path_factory):
    output = tmp_path_factory.mktemp("single") / "text"
    command = [sys.executable, "-c", SINGLE_ENGINE, "-m", str(converted_fp32), "--wav-scp", str(wav_scp),
               "-o", str(output), "-q"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    return completed, output


# A driver killed while it writes: its second recording's line half written, then SIGKILL (a
# machine lost, the OOM killer), on the test's cluster (`--ray-address`).
KILLED_DRIVER = """
import os, signal, sys
from fireredasr_vllm.transcribe import main
from fireredasr_vllm.transcript_formats import LineOutput

write = LineOutput.write
written = []

def write_then_die(self, transcript):
    if written:
        line = self.render(transcript)
        self.stream.write(line[: len(line) // 2])
        self.stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, transcript)
    written.append(transcript.uttid)

LineOutput.write = write_then_die
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with room for two CPU engine actors and the read tasks."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Two engines share this machine's cores: no thread pinning, one thread each.
        env.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setenv("OMP_NUM_THREADS", "1")
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def killed_driver(ray_cluster, converted_fp32, wav_scp, tmp_path_factory):
    """`--engine ray` with one replica on the test's cluster, its driver killed inside its second line."""
    output = tmp_path_factory.mktemp("ray") / "text"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-c", KILLED_DRIVER, "-m", str(converted_fp32), "--wav-scp", str(wav_scp),
               "-o", str(output), "-q", "--engine", "ray", "--num-replicas", "1", "--ray-address", address]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    # Ray ends a dead driver's replica and read tasks: the cluster gets its CPUs back.
    total = ray_cluster.cluster_resources()["CPU"]
    for _ in range(120):
        if ray_cluster.available_resources().get("CPU", 0) == total:
            break
        time.sleep(0.5)
    return completed, output, ray_cluster.available_resources().get("CPU", 0) == total


class DiesOnce:
    """A replica's decoder whose process ends (as on a segfault) when it has decoded its first
    segment, before answering it; once in the run (a marker file remembers), so Ray's restart lives."""

    def __init__(self, decoder, marker: str):
        self.decoder, self.marker = decoder, marker

    def transcribe(self, clips, decoding, *, batch_size):
        for key, outcome in self.decoder.transcribe(clips, decoding, batch_size=batch_size):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                yield key, outcome
            else:
                os._exit(1)

    def close(self):
        self.decoder.close()


def dies_once(make_decoder, marker: str) -> DiesOnce:
    return DiesOnce(make_decoder(), marker)


@pytest.fixture(scope="module")
def ray_run(killed_driver, converted_fp32, wav_scp, tmp_path_factory):
    """Two replicas resume the killed driver's output; the first to decode a segment dies mid-run."""
    from ray import cloudpickle

    marker = tmp_path_factory.mktemp("marks") / "died"
    runs = []

    class OneReplicaDies(ray_transcription.RayTranscription):
        def __init__(self, job, dtype, settings, validate):
            decoder = functools.partial(dies_once, functools.partial(ray_transcription.vllm_decoder, job, dtype),
                                        str(marker))  # fmt: skip
            super().__init__(job, dtype, settings, validate, make_decoder=decoder)
            runs.append(self)

    output = killed_driver[1]
    # The decoder wrapper travels to the replicas by value: this module is not importable there.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ray_transcription, "RayTranscription", OneReplicaDies)
            result = CliRunner().invoke(main, ["-m", str(converted_fp32), "--wav-scp", str(wav_scp), "-o", str(output),
                                               "--resume", "--engine", "ray", "--num-replicas", "2"])  # fmt: skip
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return result, output, runs[0].counts if runs else {}, marker.exists()


@pytest.mark.vllm
@pytest.mark.ray
def test_single_engine_starts_no_ray(single_engine_run):
    completed, output = single_engine_run
    assert "exit 3; Ray loaded: []; Ray started: False" in completed.stderr, completed.stderr[-3000:]
    assert [line.split("\t", 1)[0] for line in output.read_text(encoding="utf-8").splitlines()] == GOOD


@pytest.mark.vllm
@pytest.mark.ray
def test_a_killed_driver_resumes_with_a_replica_dying_to_the_single_engines_text(killed_driver, ray_run,
                                                                                  single_engine_run):  # fmt: skip
    completed, _, released = killed_driver
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    assert released, "the killed driver's replica and read tasks should have ended with it"
    result, output, counts, died = ray_run
    assert result.exit_code == EXIT_PARTIAL, result.output[-3000:]
    # The killed driver wrote one line and half of the next; the resumed run redoes that one.
    assert f"resuming: 1 of {len(SCP_ORDER)} recordings already in" in result.output
    # A replica died holding segments: they went to the other, and nothing was lost or repeated.
    assert died and counts["replica_deaths"] >= 1 and counts["requeued"] >= 1, counts
    # Byte for byte, in input order: what the single engine wrote.
    assert output.read_bytes() == single_engine_run[1].read_bytes()

    skipped = {line.split(":", 1)[0] for line in result.output.splitlines() if line.startswith("skipped ")}
    assert skipped == {f"skipped {uttid}" for uttid in BAD}
    assert "audio is too short" in result.output and "no such file" in result.output
    assert f"{len(GOOD)} of {len(SCP_ORDER)} recordings are in {output}" in result.output
