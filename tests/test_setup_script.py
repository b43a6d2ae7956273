"""`setup_fireredasr.py`: finding or fixing the Qwen2 link, then convert and verify (no vLLM: --skip-smoke)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from fireredasr_converter.fixtures import TINY_SHAPES, build_release
from fireredasr_converter.release import QWEN2_FOLDER

SCRIPT = Path(__file__).resolve().parents[1] / "setup_fireredasr.py"


@pytest.fixture(scope="module")
def setup_script():
    spec = importlib.util.spec_from_file_location("setup_fireredasr", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A tiny v1 release whose Qwen2 folder is moved away: the link is broken. Empty HF cache."""
    fixture = build_release(tmp_path / "models", TINY_SHAPES, variant="v1")
    moved = tmp_path / "elsewhere" / "qwen2"
    moved.parent.mkdir()
    fixture.llm_dir.rename(moved)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return fixture.model_dir, moved


def run(setup_script, args, stdin: str = ""):
    return CliRunner().invoke(setup_script.main, [str(a) for a in args] + ["--skip-smoke", "--dtype", "fp32"], input=stdin)


def test_broken_link_without_a_way_to_fix_it_is_one_clear_error(setup_script, release, tmp_path):
    model_dir, _ = release
    result = run(setup_script, [model_dir, tmp_path / "out"])
    assert result.exit_code == 1
    assert "is a broken link" in result.output and "pass --llm-dir /path/to/Qwen2-7B-Instruct" in result.output
    assert not (tmp_path / "out").exists()


def test_llm_dir_from_stdin_converts_and_leaves_the_release_alone(setup_script, release, tmp_path):
    model_dir, qwen2 = release
    link_before = os.readlink(model_dir / QWEN2_FOLDER)

    result = run(setup_script, [model_dir, tmp_path / "out", "--llm-dir", "-"], stdin=f"{qwen2}\n")

    assert result.exit_code == 0, result.output
    assert "[3/5] verified:" in result.output and "[5/5] serve it with:" in result.output
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert os.readlink(model_dir / QWEN2_FOLDER) == link_before


def test_a_folder_next_to_the_release_is_found(setup_script, release, tmp_path):
    model_dir, qwen2 = release
    (model_dir / QWEN2_FOLDER).unlink()
    qwen2.rename(model_dir.parent / QWEN2_FOLDER)  # the original README's pretrained_models/ layout

    result = run(setup_script, [model_dir, tmp_path / "out"])

    assert result.exit_code == 0, result.output
    assert f"using {model_dir.parent / QWEN2_FOLDER}" in result.output
    assert not (model_dir / QWEN2_FOLDER).exists()


def test_on_a_terminal_it_offers_to_repair_the_link(setup_script, release, tmp_path, monkeypatch):
    model_dir, qwen2 = release
    snapshot = tmp_path / "hf-cache" / "models--Qwen--Qwen2-7B-Instruct" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    qwen2.rename(snapshot)
    monkeypatch.setattr(setup_script, "stdin_is_terminal", lambda: True)

    result = run(setup_script, [model_dir, tmp_path / "out"], stdin="y\n")

    assert result.exit_code == 0, result.output
    assert f"found {snapshot}; link" in result.output
    assert (model_dir / QWEN2_FOLDER).resolve() == snapshot.resolve()
    assert (tmp_path / "out" / "config.json").is_file()


def test_on_a_terminal_it_asks_for_the_folder_when_none_is_found(setup_script, release, tmp_path, monkeypatch):
    model_dir, qwen2 = release
    monkeypatch.setattr(setup_script, "stdin_is_terminal", lambda: True)

    result = run(setup_script, [model_dir, tmp_path / "out"], stdin=f"{tmp_path}\n{qwen2}\n")

    assert result.exit_code == 0, result.output
    assert "has no config.json" in result.output  # the first answer was not a Qwen2 folder
    assert (model_dir / QWEN2_FOLDER).resolve() == qwen2.resolve()


@pytest.mark.vllm
def test_demo_next_steps_run_as_printed_from_any_directory(tmp_path):
    """`make demo`'s last lines: full paths, so they work without the venv on PATH and from any folder;
    vLLM's own logs stay off stdout, which is the script's report."""
    import shlex
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM")}
    clean["PATH"] = "/usr/bin:/bin"
    setup = subprocess.run(
        [sys.executable, str(SCRIPT), "--demo", "demo-out"], cwd=tmp_path, env=clean, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert " INFO " not in setup.stdout, setup.stdout
    lines = setup.stdout.splitlines()
    serve = lines[lines.index("[5/5] serve it with:") + 1].strip()
    transcribe = lines[lines.index("or transcribe files with:") + 1].strip()
    converted = str((tmp_path / "demo-out" / "converted").resolve())
    assert f"{sys.executable} -m vllm.entrypoints.openai.api_server --model {converted} --dtype float32" in serve

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(shlex.split(transcribe), cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from fireredasr_vllm import demo

    assert len(done.stdout.splitlines()) == len(demo.heldout_clips())
