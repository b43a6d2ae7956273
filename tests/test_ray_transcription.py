"""`fireredasr-transcribe --engine ray` (`fireredasr_vllm.ray_transcription`) on the tiny converted fixture.

The rows Ray Data carries are checked without an engine: a read row gives the
very segment events the single engine's segmenter gives, and a finished row
gives back the very transcript. Then one run of each over a wav.scp with a
corrupt file, a recording over the model's 30 s limit (cut by the segmenter),
a clip too short and a missing file: the single engine (a subprocess, which
must not start Ray), and two Ray replicas on a local CPU cluster, which
`--resume` the single engine's output cut inside its second line (so one Ray
run checks both, each engine load costing ~40 s): the file must end byte for
byte as the single engine wrote it, the bad items reported.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import speech_recording

from fireredasr_converter import spec
from fireredasr_converter.configuration import FireRedAsrLlmConfig, register_with_transformers
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_vllm.audio_input import AudioError, read_wav_scp
from fireredasr_vllm.ray_transcription import (
    PLUGIN_DISTRIBUTION,
    PLUGIN_ENTRY_POINT,
    RecordingError,
    exception_line,
    finished_from_row,
    finished_row,
    plugin_probe,
    read_recording,
    recording_events,
)
from fireredasr_vllm.recordings import FileFailed, Finished, SegmentReady, segment_events
from fireredasr_vllm.segmenter import SegmenterSettings
from fireredasr_vllm.transcribe import EXIT_PARTIAL, main
from fireredasr_vllm.transcript_formats import RecordingTranscript, TimedText

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


# --- rows, without Ray or an engine ------------------------------------------------


def test_a_read_row_gives_the_single_engines_segment_events(wav_scp, front_end):
    settings, validate = front_end
    for index, utterance in enumerate(read_wav_scp(wav_scp)):
        expected = list(segment_events([(index, utterance)], settings, "auto", validate))
        row = read_recording({"index": index, "uttid": utterance.uttid, "path": utterance.path}, settings, "auto", validate)
        got = recording_events(row)
        if utterance.uttid in BAD:
            # The single engine drops a failed file's segments too: only the failure counts.
            (failed,) = got
            assert isinstance(failed, FileFailed) and isinstance(expected[-1], FileFailed)
            assert (failed.file, str(failed.error)) == (index, str(expected[-1].error))
            continue
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected):
            if isinstance(theirs, SegmentReady):
                assert (mine.file, mine.number, mine.segment, mine.skipped) == (
                    theirs.file, theirs.number, theirs.segment, theirs.skipped)  # fmt: skip
                np.testing.assert_array_equal(mine.samples, theirs.samples)
            else:
                assert mine == theirs
        if utterance.uttid == LONG:
            assert len(got) > 2, "the long recording should be cut into several segments"


def test_a_row_that_cannot_be_read_names_the_problem(front_end, tmp_path):
    settings, validate = front_end
    row = read_recording({"index": 4, "uttid": "gone", "path": str(tmp_path / "gone.wav")}, settings, "auto", validate)
    assert row["error"] == f"{tmp_path / 'gone.wav'}: no such file"
    (failed,) = recording_events(row)
    assert isinstance(failed, FileFailed) and failed.file == 4 and str(failed.error) == row["error"]


def test_a_finished_row_gives_back_the_transcript():
    transcript = RecordingTranscript("utt", 41.23456, (
        TimedText(0.1, 1 / 3, "你好"), TimedText(2.0, 29.9999375, "world"), TimedText(31.0, 41.2, ""),
    ))  # fmt: skip
    assert finished_from_row(finished_row(Finished(7, transcript))) == Finished(7, transcript)

    failed = finished_from_row(finished_row(Finished(2, error=AudioError("x.wav: unreadable audio"))))
    assert failed.file == 2 and failed.transcript is None
    assert isinstance(failed.error, RecordingError) and str(failed.error) == "x.wav: unreadable audio"
    # An exception without a message still marks the recording failed.
    assert str(finished_from_row(finished_row(Finished(3, error=ValueError()))).error) == "ValueError"


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
def ray_run(ray_cluster, single_engine_run, converted_fp32, wav_scp, tmp_path_factory):
    """Two replicas resume the single engine's output cut inside its second line (the long recording's)."""
    data = single_engine_run[1].read_bytes()
    output = tmp_path_factory.mktemp("ray") / "text"
    first_line = data.index(b"\n") + 1
    output.write_bytes(data[: first_line + (data.index(b"\n", first_line) - first_line) // 2])
    result = CliRunner().invoke(main, ["-m", str(converted_fp32), "--wav-scp", str(wav_scp), "-o", str(output),
                                       "--resume", "--engine", "ray", "--num-replicas", "2"])  # fmt: skip
    return result, output


@pytest.mark.vllm
@pytest.mark.ray
def test_single_engine_starts_no_ray(single_engine_run):
    completed, output = single_engine_run
    assert "exit 3; Ray loaded: []; Ray started: False" in completed.stderr, completed.stderr[-3000:]
    assert [line.split("\t", 1)[0] for line in output.read_text(encoding="utf-8").splitlines()] == GOOD


@pytest.mark.vllm
@pytest.mark.ray
def test_two_replicas_resume_to_the_single_engines_text(ray_run, single_engine_run):
    result, output = ray_run
    assert result.exit_code == EXIT_PARTIAL, result.output[-3000:]
    assert f"resuming: 1 of {len(SCP_ORDER)} recordings already in" in result.output
    # Byte for byte, in input order: what the single engine wrote.
    assert output.read_bytes() == single_engine_run[1].read_bytes()

    skipped = {line.split(":", 1)[0] for line in result.output.splitlines() if line.startswith("skipped ")}
    assert skipped == {f"skipped {uttid}" for uttid in BAD}
    assert "audio is too short" in result.output and "no such file" in result.output
    assert f"{len(GOOD)} of {len(SCP_ORDER)} recordings are in {output}" in result.output
