"""Every shell and Python block of README.md and docs/*.md runs as written, or is skipped with its reason.

The convention and the workspace the blocks run in: tests/doc_blocks.py. A page
whose blocks start vLLM (marker `vllm`, `server`, `client`) is in the `vllm`
lane, a page whose blocks only run commands in the `slow` lane; `make test-fast`
keeps the marker check, which needs no process. The blocks run in this process
(servers in their own), on the suite's shared engines: `.demo/converted` is the
suite's demo conversion, so the README's commands reuse the demo engine the tests
before them started.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from doc_blocks import PAGES, REPO, blocks, marker_problems, run_page
from vllm_helpers import share_engines

from fireredasr_vllm import demo

ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
SKIPPED = [block for block in ALL_BLOCKS if block.mode == "skip"]
ENGINE_MODES = {"vllm", "server", "client"}


def test_every_block_is_marked():
    problems = [problem for block in ALL_BLOCKS for problem in marker_problems(block)]
    assert not problems, "\n".join(problems)


def test_the_pages_have_blocks_to_run():
    # The parser finding nothing would pass every other test here.
    assert sum(block.mode != "skip" for block in ALL_BLOCKS) >= 10


def test_the_convention_is_enforced(tmp_path, monkeypatch):
    import doc_blocks

    monkeypatch.setattr(doc_blocks, "REPO", tmp_path)
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nfireredasr-score a b\n```\n\n"
        "<!-- doc-test: skip: -->\n```python\nprint(1)\n```\n\n"
        "<!-- doc-test: cpu -->\n```sh\necho ok\n```\n\n"
        "```text\nnot a command\n```\n"
    )
    found = blocks(page)
    assert [(b.line, b.language, b.mode) for b in found] == [(1, "shell", None), (6, "python", "skip"), (11, "shell", "cpu")]
    problems = [marker_problems(b) for b in found]
    assert "without a marker" in problems[0][0] and "needs its reason" in problems[1][0] and problems[2] == []


def test_only_plain_calls_of_the_project_scripts_and_python_scripts_run_in_process():
    from doc_blocks import _plain_call

    scripts = {"fireredasr-transcribe": "fireredasr_vllm.transcribe:main"}
    assert _plain_call("fireredasr-transcribe -m ./out a.wav   # to stdout", scripts) == ["fireredasr-transcribe", "-m", "./out", "a.wav"]
    assert _plain_call("python setup_fireredasr.py --demo .demo", scripts) == ["python", "setup_fireredasr.py", "--demo", ".demo"]
    for command in ("fireredasr-transcribe -m ./out a.wav > text", "X=1 fireredasr-transcribe a.wav",
                    "fireredasr-transcribe $ARGS", "python -m vllm.entrypoints.openai.api_server --model ./out",
                    "python setup_fireredasr.py ./a ./out | tee log", "fireredasr-score ref hyp && echo done"):
        assert _plain_call(command, scripts) is None, command


@pytest.mark.parametrize("block", SKIPPED, ids=[block.where for block in SKIPPED])
def test_skipped_block(block):
    pytest.skip(f"{block.where}: {block.reason}")


def _page_params():
    params = []
    for page in PAGES:
        modes = {block.mode for block in blocks(page)} - {"skip", None}
        if modes:
            lane = pytest.mark.vllm if modes & ENGINE_MODES else pytest.mark.slow
            params.append(pytest.param(page, marks=[lane, pytest.mark.slow], id=str(page.relative_to(REPO))))
    return params


# --- the workspace --------------------------------------------------------------


def _heldout(language: str) -> list[tuple[str, Path, str]]:
    return [clip for clip in demo.heldout_clips() if clip[0].endswith(f"-{language}")]


@pytest.fixture(scope="session")
def doc_inputs(tmp_path_factory, demo_fp32) -> Path:
    """What the docs' commands name, made once: `converted` (the demo in fp32, as `make demo` makes it) and audio files."""
    root = tmp_path_factory.mktemp("doc_inputs")
    (root / "converted").symlink_to(demo_fp32)
    english, mandarin = _heldout("en"), _heldout("zh")
    picked = [english[0], mandarin[0], english[1]]
    (root / "wav.scp").write_text("".join(f"{uttid} {path}\n" for uttid, path, _ in picked))
    (root / "ref_text").write_text("".join(f"{uttid}\t{text}\n" for uttid, _, text in picked))
    audio = {uttid: soundfile.read(path, dtype="float32") for uttid, path, _ in english + mandarin[:1]}
    (samples, rate), (zh_samples, _) = audio[english[0][0]], audio[mandarin[0][0]]
    soundfile.write(root / "clip.wav", samples, rate)
    soundfile.write(root / "a.wav", samples, rate)
    soundfile.write(root / "b.flac", zh_samples, rate)
    (root / "wavs").mkdir()
    for uttid, _, _ in picked[:2]:
        soundfile.write(root / "wavs" / f"{uttid}.wav", *audio[uttid])
    # A recording longer than the model's 30 s: English digit strings with pauses between them.
    pause = np.zeros(int(0.8 * rate), dtype=np.float32)
    pieces = []
    for uttid, _, _ in english:
        pieces += [audio[uttid][0], pause]
        if sum(len(p) for p in pieces) >= 40 * rate:
            break
    meeting = np.concatenate(pieces)
    assert len(meeting) > 31 * rate, "the long-upload block needs more than the model's 30 s"
    soundfile.write(root / "meeting.wav", meeting, rate)
    return root


def _workspace(path: Path, inputs: Path) -> Path:
    """A checkout after `make demo`, as the docs assume, plus the inputs they name."""
    path.mkdir()
    (path / "FireRedASR-LLM-L").symlink_to(demo.RELEASE_DIR)
    (path / ".venv").symlink_to(Path(sys.prefix))
    (path / ".demo").mkdir()
    (path / ".demo" / "converted").symlink_to(inputs / "converted")
    for name in ("vllm_model", "setup_fireredasr.py", "benchmarks"):
        (path / name).symlink_to(REPO / name)
    for name in ("wav.scp", "ref_text", "clip.wav", "meeting.wav", "a.wav", "b.flac", "wavs"):
        (path / name).symlink_to(inputs / name)
    return path


def _activated_environment() -> dict[str, str]:
    """The environment after `source .venv/bin/activate`, which README asks for."""
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONHOME", None)
    return env


@pytest.mark.parametrize("page", _page_params())
def test_page_blocks_run(page, doc_inputs, engines, tmp_path, monkeypatch):
    workspace = _workspace(tmp_path / "ws", doc_inputs)
    monkeypatch.chdir(workspace)
    runnable = [block for block in blocks(page) if block.mode not in ("skip", None)]
    with share_engines(engines):
        done = run_page(page, workspace, _activated_environment(), engines)
    assert [block.line for block in done] == [block.line for block in runnable]
