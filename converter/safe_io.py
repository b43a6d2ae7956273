"""Reading untrusted files and writing outputs without losing or leaking anything.

Shared by the converter, the push and `fireredasr-transcribe`:

- `load_json` parses a JSON file from a release, a repo or the Hub with bounds
  (size, nesting depth, finite numbers), so hostile input is a one-line error
  instead of a RecursionError traceback or a NaN that travels on;
- `write_atomically` writes a file under a unique temporary name in its own
  folder (`mkstemp`, never a fixed name someone could plant a symlink at) and
  renames it into place, so a file that exists is complete;
- `remove_created_folders` undoes `mkdir -p` for exactly the folders a run made,
  and only while they are empty;
- `sigterm_as_interrupt` makes SIGTERM (what `kill`, a scheduler or a container
  stop sends) unwind like Ctrl-C, so every cleanup a KeyboardInterrupt runs
  also runs then.

Each caller turns `UnsafeInput` into its own one-line error type.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path

# Far more than any config, tokenizer or index needs (Qwen2's tokenizer.json nests
# 6 deep); far less than what makes Python's parser recurse out of its stack.
MAX_JSON_DEPTH = 32
# Larger than a 7B model's tokenizer.json (7 MB) with room to spare.
MAX_JSON_BYTES = 64 << 20


class UnsafeInput(ValueError):
    """A file that cannot be trusted as it is; the message names the problem (no path, no fix)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeInput(f"the number {text[:20]} is out of range")
    return value


def _refuse_constant(name: str):
    raise UnsafeInput(f"it holds {name}, which is not a number JSON allows")


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH):
    """`data` parsed as strict JSON: UTF-8, finite numbers, at most `max_depth` levels; else UnsafeInput."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnsafeInput:
        raise
    except UnicodeDecodeError:
        raise UnsafeInput("it is not UTF-8 text") from None
    except RecursionError:
        raise UnsafeInput(f"it nests deeper than {max_depth} levels") from None
    except ValueError as error:  # JSONDecodeError, and ints longer than Python converts
        raise UnsafeInput(f"it is not valid JSON ({str(error).splitlines()[0][:100]})") from None
    if json_depth(value) > max_depth:
        raise UnsafeInput(f"it nests deeper than {max_depth} levels")
    return value


def load_json(path: Path, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A JSON object from `path` (a regular file, at most `max_bytes`), checked as `parse_json` does.

    OSError propagates (the caller names the file and the fix).
    """
    # Non-blocking: a FIFO planted in place of the file must not hang the open.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise UnsafeInput("it is not a regular file")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeInput(f"it is larger than {max_bytes >> 20} MiB")
    value = parse_json(data, max_depth)
    if not isinstance(value, dict):
        raise UnsafeInput("it is not a JSON object")
    return value


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_prefix(name: str) -> str:
    """How the temporary names of `write_atomically(folder / name)` begin (a leftover's pattern).

    Hidden, and short enough that the whole name stays within the 255 bytes a
    filesystem allows whatever `name` is.
    """
    return "." + name.encode("utf-8")[:120].decode("utf-8", errors="ignore") + "."


class StagedFile:
    """A file written under a unique temporary name in its target's folder and renamed onto
    the target by `commit()`: whatever was at the target stays untouched until then, and
    `discard()` leaves it as it was. A symlink planted at either name is never followed.
    """

    def __init__(self, path: Path, binary: bool = False):
        self.path = Path(path)
        descriptor, self._temporary = tempfile.mkstemp(
            prefix=temporary_prefix(self.path.name), suffix=".partial", dir=self.path.parent
        )
        self.stream = os.fdopen(descriptor, "wb") if binary else os.fdopen(descriptor, "w", encoding="utf-8")

    def commit(self) -> None:
        self.stream.close()
        # mkstemp makes the file private (0600); outputs get the usual permissions.
        os.chmod(self._temporary, 0o666 & ~current_umask())
        os.replace(self._temporary, self.path)

    def discard(self) -> None:
        self.stream.close()
        with contextlib.suppress(OSError):
            os.unlink(self._temporary)


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a `StagedFile`; on any failure (KeyboardInterrupt
    included) `path` is as it was and no temporary file is left."""
    staged = StagedFile(path, binary=isinstance(data, bytes))
    try:
        staged.stream.write(data)
        staged.commit()
    except BaseException:
        staged.discard()
        raise


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist, deepest first."""
    folder = Path(os.path.abspath(folder))
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_created_folders(created: list[Path]) -> None:
    """Remove the folders a run created (deepest first), stopping at the first that is not empty.

    A folder made for this run may have been filled by another job meanwhile:
    that one, and every folder above it, stays.
    """
    for folder in created:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:
            return


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does.

    Only installed from the main thread (signal handlers cannot be set elsewhere);
    the previous handler is restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
