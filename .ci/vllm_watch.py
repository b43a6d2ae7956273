"""Ask the package registry for the newest vLLM and say whether the plugin is tested with it.

    python .ci/vllm_watch.py            # one line; exit 0 whatever it finds (CI step)
    python .ci/vllm_watch.py --strict   # exit 1 when a newer, untested vLLM is out (a daily job)

vLLM ships a minor release every few weeks; run daily (or at every CI run, as
`.ci/run` does), this notices a new one the day it appears. It asks pip, so it
sees the same index (and mirror settings) an install would. A registry that
cannot be reached is reported, never an error of the build.
"""

from __future__ import annotations

import re
import subprocess
import sys

from fireredasr_vllm.vllm_support import is_tested, pip_requirement, tested_range

NEWEST = re.compile(r"^vllm \(([^)]+)\)", re.MULTILINE)


def newest_vllm() -> str:
    """The newest vLLM release pip can install here; RuntimeError naming what failed."""
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm", "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = NEWEST.search(completed.stdout)
    if completed.returncode != 0 or found is None:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip index versions vllm failed: {last}")
    return found.group(1)


def main(argv: list[str]) -> int:
    strict = argv == ["--strict"]
    if argv and not strict:
        print(f"usage: {sys.argv[0]} [--strict]", file=sys.stderr)
        return 2
    try:
        newest = newest_vllm()
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as error:
        print(f"vllm-watch: could not ask the registry ({error}); nothing checked")
        return 0
    if is_tested(newest):
        print(f"vllm-watch: the newest vLLM, {newest}, is inside the tested range {tested_range()}")
        return 0
    print(
        f"vllm-watch: the newest vLLM, {newest}, is OUTSIDE the tested range {tested_range()} "
        f"({pip_requirement()}): run the version lanes against it (README 'Install') and widen "
        "fireredasr_vllm.vllm_support.TESTED_MINORS and the vllm extra"
    )
    return 1 if strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
