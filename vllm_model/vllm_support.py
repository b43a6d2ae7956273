"""Which vLLM releases the plugin is tested with, and the one-line notice for any other.

vLLM ships a minor release every few weeks and moves internal modules between
them (0.34 deleted Model Runner V1). The plugin is tested with every minor in
`TESTED_MINORS` (README "Install" says how each is tested); outside that range
it may still work, so registration warns instead of failing: vLLM calls every
installed general plugin for every model it serves, and an exception there
would stop models that have nothing to do with this one.

`pyproject.toml`'s `vllm` extra admits the same range; `make vllm-watch`
(`.ci/vllm_watch.py`) asks the registry whether a newer release is out.
"""

from __future__ import annotations

import importlib.util
import logging
import runpy
from pathlib import Path

from packaging.version import InvalidVersion, Version

# The oldest and newest (major, minor) tested; every minor in between is tested too.
TESTED_MINORS = ((0, 32), (0, 34))

logger = logging.getLogger("fireredasr_vllm")


def tested_range() -> str:
    """The tested range as a user reads it, e.g. "0.32-0.34"."""
    (low_major, low_minor), (high_major, high_minor) = TESTED_MINORS
    return f"{low_major}.{low_minor}-{high_major}.{high_minor}"


def pip_requirement() -> str:
    """The pip requirement that installs a tested vLLM, e.g. "vllm>=0.32,<0.35"."""
    (low_major, low_minor), (high_major, high_minor) = TESTED_MINORS
    return f"vllm>={low_major}.{low_minor},<{high_major}.{high_minor + 1}"


def is_tested(version: str) -> bool:
    """Whether `version` (vLLM's `__version__`, local and dev tags allowed) is a tested minor."""
    try:
        release = Version(version).release
    except InvalidVersion:
        return False
    low, high = TESTED_MINORS
    return low <= tuple(release[:2]) <= high


def installed_vllm() -> tuple[Path, str]:
    """The vLLM package found on the path: its folder and version, read without importing it (seconds)."""
    folder = Path(importlib.util.find_spec("vllm").origin).parent
    return folder, runpy.run_path(str(folder / "_version.py"))["__version__"]


def untested_notice(version: str) -> str | None:
    """One line naming `version`, the tested range and what to do; None for a tested version."""
    if is_tested(version):
        return None
    try:
        newer = tuple(Version(version).release[:2]) > TESTED_MINORS[1]
    except InvalidVersion:
        newer = False
    advice = (
        "it may work; if loading or decoding fails, upgrade fireredasr-vllm or install a tested vLLM"
        if newer
        else "install a tested vLLM"
    )
    return (
        f"fireredasr-vllm: vLLM {version} is outside the tested range {tested_range()}: "
        f"{advice} (pip install '{pip_requirement()}')"
    )


_warned: set[str] = set()


def warn_if_untested(version: str) -> None:
    """Log `untested_notice` once per process and version (vLLM registers plugins many times)."""
    notice = untested_notice(version)
    if notice is not None and version not in _warned:
        _warned.add(version)
        logger.warning(notice)
