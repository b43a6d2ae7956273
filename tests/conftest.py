"""Session-wide fixtures and builders: one tiny release in the original layout, converted once;
the reference model on it; the shipped demo model, converted once; long recordings made of
real speech; the loaders tests read release pickles and safetensors files with."""

import argparse
import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _pytest.mark.expression import Expression  # how pytest evaluates -m; it has no public API for it
from safetensors import safe_open

from fireredasr_converter import spec
from fireredasr_converter.fixtures import TINY_SHAPES, build_release
from fireredasr_converter.pipeline import convert
from fireredasr_vllm import demo
from fireredasr_vllm.audio_input import load_audio
from fireredasr_vllm.reference import ReferenceFireRedAsrLlm
from fireredasr_vllm.vllm_support import installed_vllm

# Clean espeak-ng readings of digit strings (voices the demo model did not train on),
# trimmed to their first and last audible sample, made once with
# `fireredasr_vllm.demo.speech` (plan_utterances(8, 11, HELDOUT_VARIANTS, set(), "clean"),
# synthesize, trim_silence, write_kaldi_set).
CLEAN_SPEECH = Path(__file__).resolve().parent / "data" / "clean_speech"


# torch's intra-op thread count for the whole test process (default 1). The thread count
# changes how float32 sums are split, so `make test-portable` runs the fast lane with 1 and 2
# threads to prove the tolerances hold either way: FIREREDASR_TEST_THREADS=2 make test-fast.
THREADS_VARIABLE = "FIREREDASR_TEST_THREADS"


def pytest_configure(config):
    # Importing silero_vad (the segmenter's VAD) sets torch to one thread for the rest of the
    # process: imported here first, so the count below holds for every test whether or not an
    # earlier test used the VAD. One thread by default: the models here are tiny, and on two
    # cores shared with vLLM engines torch's spinning worker threads made their small ops 6x slower.
    import silero_vad  # noqa: F401

    threads = int(os.environ.get(THREADS_VARIABLE, "1"))
    if threads < 1:
        raise pytest.UsageError(f"{THREADS_VARIABLE} must be a positive thread count, got {threads}")
    torch.set_num_threads(threads)
    _bind_this_workers_engines_to_its_cores()
    _check_the_expected_vllm()


# `make test-vllm-0.33` / `-0.34` set it to their overlay's release (.ci/vllm_overlay.py).
EXPECTED_VLLM_VARIABLE = "FIREREDASR_EXPECT_VLLM"


def _check_the_expected_vllm() -> None:
    """Stop a version lane whose overlay is not the vLLM found: it would test the installed one instead."""
    expected = os.environ.get(EXPECTED_VLLM_VARIABLE)
    if not expected:
        return
    # Read, not imported: importing vLLM takes seconds, and the run's processes import it anyway.
    folder, found = installed_vllm()
    if found != expected:
        raise pytest.UsageError(
            f"{EXPECTED_VLLM_VARIABLE}={expected} but vLLM {found} is found ({folder}): "
            f"build the overlay first (python .ci/vllm_overlay.py {expected} .vllm-{expected}) and put it on PYTHONPATH"
        )


# Set by vLLM's CPU worker from this variable: the cores its OpenMP threads are bound to.
CPU_BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def _bind_this_workers_engines_to_its_cores() -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker's engines get their own cores.

    vLLM's CPU engine binds its OpenMP threads to every core by default; two workers'
    engines (in-process, or the servers and scripts a worker starts, which inherit the
    variable) would then spin-wait on the same cores and stall each other at every
    operator. Worker i of n takes every n-th core from the i-th (with more workers than
    cores, core i mod the core count); a value the user set wins.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or count < 2 or CPU_BIND_VARIABLE in os.environ:
        return
    cores, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
    # More workers than cores: workers take turns on the cores, one each.
    mine = cores[index % count :: count] if count <= len(cores) else [cores[index % len(cores)]]
    os.environ[CPU_BIND_VARIABLE] = ",".join(map(str, mine))


def pytest_ignore_collect(collection_path, config):
    # With `-m "not vllm ..."` (make test-fast) a module marked `vllm` as a whole is not
    # imported at all: importing vLLM's runner, engine and server modules takes ~9 s.
    markexpr = config.option.markexpr
    if not markexpr or collection_path.suffix != ".py" or not _marked_vllm_as_a_whole(collection_path):
        return None
    expression = Expression.compile(markexpr)
    # Left out only if no test of the module can match, whatever other marks it carries.
    if not expression.evaluate(lambda name, **kwargs: name == "vllm") and not expression.evaluate(lambda *a, **k: True):
        return True
    return None


def _marked_vllm_as_a_whole(path: Path) -> bool:
    """True if the module sets `pytestmark = pytest.mark.vllm` (alone or in a list)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            return any(ast.unparse(value) == "pytest.mark.vllm" for value in values)
    return False


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """A tiny FireRedASR-LLM-L v1 release (relative Qwen2 symlink), random weights."""
    return build_release(tmp_path_factory.mktemp("release"), TINY_SHAPES, variant="v1", seed=0)


@pytest.fixture(scope="session")
def converted_fp32(tiny_release, tmp_path_factory):
    """`tiny_release` converted with --dtype fp32: the repo the parity tests load."""
    out = tmp_path_factory.mktemp("converted") / "fireredasr-llm-tiny-fp32"
    convert(tiny_release.model_dir, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def reference(converted_fp32) -> ReferenceFireRedAsrLlm:
    """The plain PyTorch + transformers reference on `converted_fp32`: the parity tests' oracle."""
    return ReferenceFireRedAsrLlm.from_pretrained(converted_fp32)


@pytest.fixture(scope="session")
def demo_fp32(tmp_path_factory):
    """The shipped demo model (`fireredasr_vllm.demo`, trained here) converted with --dtype fp32."""
    out = tmp_path_factory.mktemp("demo") / "demo-fp32"
    convert(demo.RELEASE_DIR, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def demo_reference(demo_fp32) -> ReferenceFireRedAsrLlm:
    """The reference on the demo model: the oracle of the demo and recipe tests."""
    return ReferenceFireRedAsrLlm.from_pretrained(demo_fp32)


# --- vLLM engines: one alive at a time, each started once per run ----------------------------

# The engines tests share, in the order their tests run (pytest_collection_modifyitems):
# a test asks for one through these fixtures (directly or through a fixture that does).
# The documentation's pages come last, after the demo engine's tests: run in one process,
# the README's commands reuse the demo engine (tests/test_docs.py); `make test` runs them
# on a worker of their own (ENGINE_GROUPS), which starts the demo engine again.
ENGINE_FIXTURES = ("tiny_llm", "recipe_llm", "demo_llm", "doc_inputs")


# The session's `Engines`, once a test asked for it: pytest_runtest_teardown ends its engine.
_ENGINES = []


@pytest.fixture(scope="session")
def engines():
    """The suite's vLLM engines (`vllm_helpers.Engines`, built with the product's `create_engine`)."""
    from vllm_helpers import Engines

    factory = Engines()
    _ENGINES.append(factory)
    yield factory
    factory.close()


def _uses_engines(item) -> bool:
    return item is not None and "engines" in getattr(item, "fixturenames", ())


def pytest_runtest_teardown(item, nextitem):
    """The engine ends with the last test of the run that uses the suite's engines.

    Under pytest-xdist other tests may follow on the same worker; an engine left alive
    would hold its cores and keep vLLM's environment frozen for them (vLLM caches its
    environment variables in a process that hosts an engine core).
    """
    if _uses_engines(item) and not _uses_engines(nextitem):
        for factory in _ENGINES:
            factory.close()


@pytest.fixture(scope="module")
def tiny_llm(engines, converted_fp32):
    """The fp32 engine on the tiny fixture, as `create_engine` builds it for greedy decoding."""
    return engines.get(converted_fp32, dtype="float32")


@pytest.fixture(scope="module")
def demo_llm(engines, demo_fp32):
    """The fp32 engine on the demo model for greedy decoding (what `fireredasr-transcribe` builds by default)."""
    return engines.get(demo_fp32, dtype="float32")


@pytest.fixture(scope="module")
def recipe_llm(engines, demo_fp32):
    """The fp32 engine on the demo model with the penalty processor the original recipe needs."""
    from fireredasr_vllm.decoding import ORIGINAL_RECIPE

    return engines.get(demo_fp32, dtype="float32", penalty_processor=ORIGINAL_RECIPE.needs_penalty_processor)


@pytest.fixture
def shared_engines(engines):
    """The package's `create_engine` calls in this process go to `engines.get` for the test's length.

    (`vllm_helpers.share_engines`.) One test still runs the CLI in its own process, as
    users do: test_setup_script's demo next steps.
    """
    from vllm_helpers import share_engines

    with share_engines(engines):
        yield engines


# The engine groups (tests on the suite's shared engines) of a `--dist loadgroup` run: the doc
# pages on their own worker, since they are the longest chain (tests/test_docs.py).
ENGINE_GROUPS = {"doc_inputs": "doc-engines"}
SLOW_MARKS = ("slow", "vllm", "ray")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the xdist_group marks added here
def pytest_collection_modifyitems(config, items):
    """Tests that share an engine run together, so each engine starts once and only one is alive.

    Stable: each ENGINE_FIXTURES group first, in which tests that also build engines
    of their own (`engines` among their arguments) run last, after the shared engine
    served the rest; tests on engines of their own only before the doc pages' group;
    then the other tests, modules with slow tests (marker `slow`,
    `vllm` or `ray`) before the rest. Under pytest-xdist with `--dist loadgroup
    --no-loadscope-reorder` (`make test`) the tests on the shared engines go to one
    worker in this order (the doc pages to another, with engines of its own), every
    other module's tests stay on one worker (a module's fixtures, a server, a Ray
    cluster, the registry's dry runs, then start once, not once per worker), and the
    groups are handed out in this order, the long chains first.
    """
    slow_modules = {item.nodeid.split("::", 1)[0] for item in items if any(item.get_closest_marker(m) for m in SLOW_MARKS)}
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "engines" in names:
            group = next((group for name, group in ENGINE_GROUPS.items() if name in names), "engines")
        else:
            group = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))

    # Tests on engines of their own only (`engines` alone): after the demo engine's tests, before
    # the doc pages, so that a run without pytest-xdist does not end and restart an engine between them.
    own_engines_only = ENGINE_FIXTURES.index("doc_inputs") - 0.5

    def rank(item):
        names = getattr(item, "fixturenames", ())
        engine_group = next((i for i, name in enumerate(ENGINE_FIXTURES) if name in names), None)
        if engine_group is None and "engines" in names:
            return (0, own_engines_only, True)
        if engine_group is None:
            return (1, item.nodeid.split("::", 1)[0] not in slow_modules, False)
        own_engine = "engines" in getattr(getattr(item, "_fixtureinfo", None), "argnames", ())
        return (0, engine_group, own_engine)

    items.sort(key=rank)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Refuse a pytest-xdist `--dist loadgroup` run whose groups would be lost.

    pytest-xdist (3.8) sends an item's group to the scheduler as a suffix of its node
    id, written to `Item._nodeid`; pytest 9.2 builds node ids otherwise, the suffix
    never arrives, and the shared engines' tests would spread over the workers, each
    starting the engines again (hence `pytest<9.2` in the test extra).
    """
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist cannot group {lost[0]} (and {len(lost) - 1} more) with this pytest: "
            "install the test extra's pytest (pip install -e '.[test]')"
        )


def speech_recording(seconds: float, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]], list[str]]:
    """A recording of `CLEAN_SPEECH` pieces between silences and noise, each piece's audible span and its uttid.

    Gaps of 0.3-5 s, every fifth one background noise instead of silence; pieces at
    levels from -14 dB to full scale.
    """
    rng = np.random.default_rng(seed)
    paths = sorted(CLEAN_SPEECH.glob("*.wav"))
    pieces = [load_audio(str(path)) for path in paths]
    parts, speech_spans, names, position, index = [], [], [], 0, 0
    while position < seconds * spec.SAMPLE_RATE:
        gap = np.zeros(int(rng.choice([0.3, 0.8, 2.0, 5.0]) * spec.SAMPLE_RATE), dtype=np.float32)
        if index % 5 == 4:
            gap = (0.01 * rng.standard_normal(len(gap))).astype(np.float32)
        piece = pieces[index % len(pieces)] * rng.uniform(0.2, 1.0)
        parts += [gap, piece.astype(np.float32)]
        # The audible speech: from the first to the last sample within 40 dB of the piece's peak.
        audible = np.flatnonzero(np.abs(piece) >= 0.01 * np.abs(piece).max())
        start = position + len(gap)
        speech_spans.append((start + int(audible[0]), start + int(audible[-1]) + 1))
        names.append(paths[index % len(pieces)].stem)
        position += len(gap) + len(piece)
        index += 1
    return np.concatenate(parts), speech_spans, names


def load_release_pickle(path: Path) -> dict:
    """A release pickle (`model.pth.tar`, `asr_encoder.pth.tar`) loaded safely: tensors and argparse.Namespace only."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_safetensors(folder: Path, pattern: str = "*.safetensors", names=None) -> dict[str, torch.Tensor]:
    """The tensors of `folder`'s safetensors files matching `pattern`: all of them, or those in `names`."""
    tensors = {}
    for path in sorted(Path(folder).glob(pattern)):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if names is None or name in names:
                    tensors[name] = f.get_tensor(name)
    return tensors
