"""Faults in the Ray path (`fireredasr_vllm.ray_transcription`): replicas killed, read tasks crashing.

Runs the Ray path's own driver, read tasks and replica actors on a local
cluster with `benchmarks/ray_scaling.py`'s simulated engine and recordings (no
vLLM: seconds per run), and compares the output with the single engine's loop
(`transcribe.decode_recordings`) over the same segments, byte for byte: nothing
lost, nothing written twice. A killed replica is restarted by Ray while its
segments go to the others; a read task whose worker dies is rerun by Ray
(which replays its stream without repeating it) or, past its retries, read
again file by file, so that only a file that kills every reader is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path

import pytest

from fireredasr_vllm import ray_transcription

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "ray_scaling.py"
BATCH = 8

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def scaling():
    """The benchmark module, shipped to Ray's workers by value (it is not an installed module)."""
    from ray import cloudpickle

    module_spec = importlib.util.spec_from_file_location("ray_scaling_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    yield module
    cloudpickle.unregister_pickle_by_value(module)
    del sys.modules[module_spec.name]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def workload(scaling):
    # 300 segments; a third from recordings of 1-10 minutes, spread over the replicas.
    return scaling.make_workload(300, 0.3, 0, seed=5)


@pytest.fixture(scope="module")
def engine(scaling):
    # Fast: the whole workload in about a second per replica.
    return dataclasses.replace(scaling.EngineModel(), time_scale=0.05)


@pytest.fixture(scope="module")
def expected(scaling, workload, engine):
    reader = scaling.SimulatedReader(scaling.ReadModel(0.0, 0.0, 0.0), True)
    return scaling.single_engine(workload, reader, engine, BATCH)[0]


def long_recordings(workload) -> list[str]:
    return [uttid for uttid, seconds in workload.recordings if seconds > 30.0]


def test_killed_replicas_lose_and_repeat_nothing(scaling, ray_local, workload, engine, expected, tmp_path):
    reader = scaling.SimulatedReader(scaling.ReadModel(), True)
    # Three replicas; the first two to decode 20 segments die as they get the 20th (their process
    # ends), holding the rest of their batch; Ray restarts them and their segments go elsewhere.
    slower = dataclasses.replace(engine, time_scale=0.3)
    heard = []
    dying = functools.partial(scaling.DyingEngine, slower, True, str(tmp_path), 20, 2)
    result = scaling.ray_run(ray_local, workload, reader, slower, 3, BATCH, make_decoder=dying, on_audio=heard.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["death-0", "death-1"]
    assert result["counts"]["replica_deaths"] == 2 and result["counts"]["requeued"] >= 2, result["counts"]
    assert result["output"] == expected
    # Progress as the single engine counts it: each segment's audio once, as it is accepted (a
    # requeued one too), then each recording's silence after its last segment.
    assert len(heard) == workload.segments + len(workload.recordings)
    assert sum(heard) == pytest.approx(sum(round(s * scaling.RATE) for _, s in workload.recordings) / scaling.RATE)


def test_a_read_task_whose_worker_dies_is_rerun_without_repeats(scaling, ray_local, workload, engine, expected,
                                                                  tmp_path):  # fmt: skip
    # The worker dies on the third segment of a long recording, once: Ray reruns the task, whose
    # stream replays without giving the first segments (or the block's earlier files) again.
    once = {long_recordings(workload)[0]}
    reader = scaling.CrashingReader(scaling.ReadModel(), True, str(tmp_path), once=once)
    result = scaling.ray_run(ray_local, workload, reader, engine, 2, BATCH)
    assert (tmp_path / next(iter(once))).exists(), "the reader should have crashed"
    assert result["output"] == expected


def test_a_file_that_kills_every_reader_is_reported_alone(scaling, ray_local, workload, engine, expected, tmp_path,
                                                          monkeypatch):  # fmt: skip
    # No reruns by Ray: a block is split into single files at its first crash. Two neighbouring clips
    # of one block: the first crashes its reader once (then is read again alone), the second every
    # time (so it fails alone).
    monkeypatch.setattr(ray_transcription, "READ_RETRIES", 0)
    clips = [uttid for uttid, seconds in workload.recordings if seconds <= 30.0]
    once, always = clips[2], clips[3]
    reader = scaling.CrashingReader(scaling.ReadModel(), True, str(tmp_path), once={once},
                                    always={always})  # fmt: skip
    settled = {}
    job = ray_transcription.Job(model="simulated", engine="ray", num_replicas=2, batch_size=BATCH)
    transcription = ray_transcription.RayTranscription(
        job, "float32", None, None, read_events=reader, size_of=float,
        make_decoder=functools.partial(scaling.SimulatedEngine, engine, True), replica_options={"num_cpus": 0},
    )  # fmt: skip
    from fireredasr_vllm.audio_input import Utterance

    try:
        transcription.run([(i, Utterance(u, scaling.Workload.path(s))) for i, (u, s) in enumerate(workload.recordings)],
                          lambda finished: settled.setdefault(finished.file, finished), lambda seconds: None)  # fmt: skip
    finally:
        transcription.close()
    assert len(settled) == len(workload.recordings)
    failed = {workload.recordings[i][0]: str(f.error) for i, f in settled.items() if f.error is not None}
    assert list(failed) == [always] and failed[always].startswith("reading it failed: ")
    texts = {f.transcript.uttid: f.transcript for f in settled.values() if f.error is None}
    lines = [line for line in expected.splitlines() if not line.startswith(f"{always}\t")]
    assert [f"{uttid}\t{texts[uttid].text}" for uttid, _ in workload.recordings if uttid != always] == lines
    assert (tmp_path / once).exists()
    assert transcription.counts["reader_failures"] == 2  # the block, then the always-crashing file alone


def test_a_lone_replica_that_dies_is_waited_for(scaling, ray_local, workload, engine, expected, tmp_path):
    # One replica, dying once as it gets its 20th result: no other replica can take its segments, and
    # calls fail at once while Ray restarts it; the driver asks again until the new one answers.
    reader = scaling.SimulatedReader(scaling.ReadModel(0.0, 0.0, 0.0), True)
    dying = functools.partial(scaling.DyingEngine, engine, True, str(tmp_path), 20, 1)
    result = scaling.ray_run(ray_local, workload, reader, engine, 1, BATCH, make_decoder=dying)
    assert (tmp_path / "death-0").exists()
    assert result["counts"]["replica_deaths"] == 1 and result["counts"]["requeued"] > 0, result["counts"]
    assert result["output"] == expected
