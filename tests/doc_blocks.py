"""The shell and Python blocks of README.md and docs/*.md, and the runner that executes them.

Convention: every fenced block tagged bash/sh/shell/console/python/py has an HTML
comment on the line right before its opening fence (invisible on GitHub):

    <!-- doc-test: cpu -->            run; starts no vLLM engine
    <!-- doc-test: vllm -->           run; starts a vLLM engine (a CLI run, a script with LLM(...))
    <!-- doc-test: server -->         one shell command that starts the OpenAI server: started in the
                                      background, waited for (/health), stopped before the next block
                                      that is not a client block
    <!-- doc-test: client -->         a Python block run against the server of the server block before it
    <!-- doc-test: skip: REASON -->   not run; the test reports the skip with REASON (a GPU, the Hub,
                                      a cluster, hours of CPU)

Blocks of one page run in page order in one workspace, as a reader following the
page would: a folder laid out like a checkout after `make demo` (`.venv`,
`.demo/converted`, `vllm_model/`, `setup_fireredasr.py`, links to this checkout),
plus the names the docs use: `FireRedASR-LLM-L` (the demo release), `clip.wav`,
`meeting.wav` (40 s of English digit strings), `a.wav`, `b.flac`, `wavs/`, `wav.scp`,
`ref_text`. The demo model stands in for FireRedASR-LLM-L. The environment is
`.venv` activated, as README says to do.

Shell blocks run line by line. A line that calls one of this project's console
scripts (`fireredasr-transcribe ...`) or runs a script of the checkout
(`python setup_fireredasr.py ...`), with no pipes, redirections or variables, runs in
this process through the function the script runs, as a reader's shell would run it
in a new one; every other line runs in `bash -e`. Python blocks are saved as a script
in the workspace and run in this process as `__main__`, as `python script.py` would
run them. So a page's engines can be shared: tests/test_docs.py hands every
`create_engine` call to the suite's engine cache, and a block's own `LLM(...)` is shut
down after its block. The one change made to a block: the server gets `--port N` and
the clients' `localhost:8000` becomes `localhost:N`, so that two test runs on one
machine do not collide.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_LANGUAGES = {"bash": "shell", "sh": "shell", "shell": "shell", "console": "shell", "python": "python", "py": "python"}
MODES = ("cpu", "vllm", "server", "client", "skip")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(?P<mode>[a-z]+)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^\s`]*)")
DOC_PORT = 8000
SERVER_START_S = 300
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repo
    line: int  # of the opening fence, 1-based
    language: str  # "shell" or "python"
    code: str
    mode: str | None  # None: no marker (an error)
    reason: str  # for skip

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


class MarkerError(ValueError):
    pass


def blocks(page: Path) -> list[Block]:
    """Every shell and Python block of a page, with its marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, indent = match["fence"], match["indent"]
        start = index
        index += 1
        body = []
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index])
            index += 1
        index += 1
        language = CODE_LANGUAGES.get(match["info"].lower())
        if language is None:
            continue  # output, diagrams, YAML: nothing to run
        marker = MARKER.match(lines[start - 1].strip()) if start > 0 else None
        mode = marker["mode"] if marker else None
        found.append(
            Block(
                page=str(page.relative_to(REPO)),
                line=start + 1,
                language=language,
                code="\n".join(body) + "\n",
                mode=mode,
                reason=(marker["reason"] or "") if marker else "",
            )
        )
    return found


def marker_problems(block: Block) -> list[str]:
    """What is wrong with a block's marker, as lines naming the block and the fix."""
    if block.mode is None:
        return [f"{block.where}: {block.language} block without a marker; put <!-- doc-test: cpu|vllm|server|client|skip: REASON --> on the line before its fence"]
    if block.mode not in MODES:
        return [f"{block.where}: unknown doc-test mode {block.mode!r}; use one of {', '.join(MODES)}"]
    if block.mode == "skip" and len(block.reason) < 10:
        return [f"{block.where}: a skipped block needs its reason: <!-- doc-test: skip: needs a GPU (...) -->"]
    if block.mode != "skip" and block.reason:
        return [f"{block.where}: only skip takes a reason (got {block.mode}: {block.reason})"]
    if block.mode == "server" and (block.language != "shell" or len(_commands(block.code)) != 1):
        return [f"{block.where}: a server block is one shell command"]
    if block.mode == "client" and block.language != "python":
        return [f"{block.where}: a client block is Python"]
    return []


# --- running ------------------------------------------------------------------


def _commands(code: str) -> list[str]:
    """Logical lines: comments and blank lines dropped, backslash continuations joined."""
    commands, current = [], ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip() and not current.strip().startswith("#"):
            commands.append(current)
        current = ""
    return commands


def _console_scripts() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("fireredasr-")}


SHELL_SYNTAX = set("|&;<>$`(){}*?[]~") | {"\n"}


def _plain_call(command: str, scripts: dict[str, str]) -> list[str] | None:
    """The argv of a command that calls one of our console scripts (or `python SCRIPT.py`) and needs nothing from a shell."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    if not words or not (words[0] in scripts or (words[0] == "python" and len(words) > 1 and words[1].endswith(".py"))):
        return None
    code_part = command.split(" #", 1)[0]
    if any(c in SHELL_SYNTAX for c in code_part) or "=" in words[0]:
        return None
    return words


def _run_as_command(argv: list[str], main: Callable[[], object]) -> tuple[int, object]:
    """`main()` run with `sys.argv` = `argv`, as a command would: its exit status and what it returned."""
    saved = sys.argv
    sys.argv = argv
    try:
        return 0, main()
    except SystemExit as exit_:
        code = exit_.code
        return (0 if code is None else code if isinstance(code, int) else 1), None
    finally:
        sys.argv = saved
        sys.stdout.flush()
        sys.stderr.flush()


def _call_entry_point(argv: list[str], value: str) -> int:
    """`argv[0]` (a console script whose entry point is `value`) run in this process; its exit status."""
    import importlib

    module, _, function = value.partition(":")
    code, _ = _run_as_command(argv, getattr(importlib.import_module(module), function))
    return code


def run_script(path: Path, argv: list[str], engines=None) -> dict:
    """A Python script run in this process as `python path *argv` would run it; its globals.

    A `vllm.LLM` the script built for itself and left running is shut down here, as
    the end of its process would. `engines` (the suite's `Engines`, whose engine the
    script may have been handed by a patched `create_engine`) is left its own engine,
    except when the script built another one: two engine cores in one process share
    vLLM's process-wide parallel state, which the other one's shutdown tears down, so
    the suite's engine is ended too and the next request builds it again.
    """
    from vllm import LLM

    code, namespace = _run_as_command([str(path), *argv], lambda: runpy.run_path(str(path), run_name="__main__"))
    if code != 0:
        raise RuntimeError(f"{path.name} exited with {code}")
    namespace = namespace or {}
    shared = engines.engine if engines is not None else None
    own = [value for value in namespace.values() if isinstance(value, LLM) and value is not shared]
    for llm in own:
        llm.llm_engine.engine_core.shutdown()
    if own and engines is not None:
        engines.close()
    return namespace


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Page:
    """A page's blocks run in order in `workspace` (the current directory while they run), `env` for its shells.

    `engines`: the suite's shared engines the blocks' `create_engine` calls get (see `run_script`).
    """

    def __init__(self, workspace: Path, env: dict[str, str], engines=None):
        self.workspace = workspace
        self.env = env
        self.engines = engines
        self.scripts = _console_scripts()
        self.server: subprocess.Popen | None = None
        self.port = _free_port()

    def run(self, block: Block) -> None:
        print(f"\n===== {block.where} ({block.mode})\n{block.code}", flush=True)
        if block.mode != "client":
            # The server serves the client blocks right after it; other blocks get the cores back.
            self.close()
        if block.mode == "server":
            self.start_server(block)
        elif block.language == "python":
            if block.mode == "client" and self.server is None:
                raise RuntimeError(f"{block.where}: a client block before the page's server block")
            script = self.workspace / f"doc_block_{Path(block.page).stem}_{block.line}.py"
            code = block.code.replace(f"localhost:{DOC_PORT}", f"localhost:{self.port}")
            script.write_text(code)
            print(f"$ python {script.name}  [in-process]", flush=True)
            run_script(script, [], self.engines)
        else:
            for command in _commands(block.code):
                argv = _plain_call(command, self.scripts)
                if argv is None:
                    self._bash(command, block)
                    continue
                print(f"$ {command}  [in-process]", flush=True)
                if argv[0] == "python":
                    run_script(self.workspace / argv[1], argv[2:], self.engines)
                    continue
                code = _call_entry_point(argv, self.scripts[argv[0]])
                if code != 0:
                    raise RuntimeError(f"{block.where}: `{command.strip()}` exited with {code}")

    def _bash(self, command: str, block: Block) -> None:
        print(f"$ {command}", flush=True)
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command], cwd=self.workspace, env=self.env, timeout=BLOCK_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"{block.where}: `{command.strip()}` exited with {done.returncode}")

    def start_server(self, block: Block) -> None:
        (command,) = _commands(block.code)
        command = command.split(" #", 1)[0].rstrip() + f" --port {self.port}"
        print(f"$ {command} &", flush=True)
        log = open(self.workspace / "server.log", "w")
        self.server = subprocess.Popen(
            ["bash", "-c", command], cwd=self.workspace, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"{block.where}: the server exited with {self.server.returncode}:\n" + self.server_log())
            try:
                with urllib.request.urlopen(f"http://localhost:{self.port}/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"{block.where}: the server did not answer /health in {SERVER_START_S} s:\n" + self.server_log())

    def server_log(self) -> str:
        return (self.workspace / "server.log").read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        self.server = None


def run_page(page: Path, workspace: Path, env: dict[str, str], engines=None) -> list[Block]:
    """Run a page's cpu/vllm/server/client blocks in order; the blocks run, or the first failure, raised with its place."""
    runner = Page(workspace, env, engines)
    done = []
    try:
        for block in blocks(page):
            if block.mode in (None, "skip"):
                continue
            started = time.monotonic()
            try:
                runner.run(block)
            except Exception as error:
                detail = f"\n--- server log ---\n{runner.server_log()}" if runner.server is not None else ""
                raise BlockFailed(f"{block.where}: {error}{detail}") from error
            print(f"===== {block.where}: {time.monotonic() - started:.1f} s", flush=True)
            done.append(block)
    finally:
        runner.close()
    return done


class BlockFailed(RuntimeError):
    pass
