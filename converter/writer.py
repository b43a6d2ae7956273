"""Writing safetensors files and the converted repo: headers, streamed shards, the index, an atomically placed folder.

`safetensors_header` and `write_index` are also what the fixture builder writes
its Qwen2 folders with. What goes into which shard is `plan`'s; checking what
was written is `verify`'s; the small JSON and Markdown files are written by
`repo_configs`, `tokenizer` and `model_card`.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from .errors import ConversionError
from .plan import PlannedShard
from .provenance import PROVENANCE_KEY, made_by_converter
from .repo_format import INDEX_NAME, SAFETENSORS_DTYPE_NAMES
from .safe_io import current_umask, missing_folders, remove_created_folders, write_atomically


# Blocks waiting for the write thread. A block's memory is reused once this many
# later blocks, plus the one being written, have been queued: BlockBuffers must
# rotate at least WRITE_QUEUE_DEPTH + 2 slots.
WRITE_QUEUE_DEPTH = 2



def safetensors_header(tensors: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """The bytes a safetensors file starts with for `tensors` (name, shape) of one dtype, stored in that order.

    Known from names and shapes alone, so a writer can put it first and stream
    each tensor's bytes after it.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, shape in tensors:
        end = offset + math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded

class BackgroundWriter:
    """Runs queued writes, in order, on a separate thread.

    Once the kernel's dirty-page limit is reached, write() waits for the disk;
    on this thread that wait overlaps computing the next blocks instead of adding
    to it. A failed write is raised to the producer at its next call, and
    whatever was queued after it is skipped.
    """

    def __init__(self, depth: int = WRITE_QUEUE_DEPTH):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="fireredasr-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            action = self._queue.get()
            try:
                if action is None:
                    return
                if self._error is None and not self._discard:
                    action()
            except BaseException as error:  # handed to the producer
                self._error = error
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, action: Callable[[], object]) -> None:
        self._raise_error()
        self._queue.put(action)

    def wait(self) -> None:
        """Return once everything queued has run; raise the error of a failed write."""
        self._queue.join()
        self._raise_error()

    def cancel(self) -> None:
        """Skip what is queued and return once the write in progress is over."""
        self._discard = True
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class ShardWriter:
    """Writes one safetensors file front to back, one tensor's blocks at a time.

    The header only needs names, dtypes and shapes, which the plan knows, so it
    goes first and each tensor's bytes follow as they are produced: memory holds
    a few blocks, never the shard.
    """

    def __init__(self, path: Path, shard: PlannedShard, dtype: torch.dtype, background: BackgroundWriter):
        self.path = path
        self._dtype = dtype
        self._background = background
        self._pending = [(tensor.name, tensor.nbytes(dtype)) for tensor in shard.tensors]
        self._file = open(path, "wb")
        self._file.write(safetensors_header([(tensor.name, tuple(tensor.shape)) for tensor in shard.tensors], dtype))

    def write_tensor(self, name: str, blocks: Iterable[torch.Tensor], then: Callable[[], None] | None = None) -> None:
        """Queue a tensor's blocks for writing, and `then` to run once they are written."""
        expected_name, expected_bytes = self._pending.pop(0)
        if name != expected_name:
            raise RuntimeError(f"{self.path.name}: wrote {name} where the header has {expected_name}")
        written = 0
        for block in blocks:
            if block.dtype != self._dtype:
                raise RuntimeError(f"{name}: block of dtype {block.dtype}, the header says {self._dtype}")
            # Tensor memory is little-endian, as safetensors stores it.
            data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
            self._background.submit(functools.partial(self._file.write, data))
            written += data.nbytes
        if written != expected_bytes:
            raise RuntimeError(f"{name}: produced {written} bytes, the header says {expected_bytes}")
        if then is not None:
            self._background.submit(then)

    def close(self) -> None:
        self._background.wait()
        self._file.close()
        if self._pending:
            raise RuntimeError(f"{self.path.name}: {len(self._pending)} tensors not written")

    def abort(self) -> None:
        self._background.cancel()
        self._file.close()


def write_index(folder: Path, total_size: int, weight_map: dict[str, str]) -> None:
    """The sharded checkpoint's index: bytes of tensor data and each tensor's shard, by tensor name."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomically(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def _is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(out: Path, inputs: Iterable[Path], overwrite: bool) -> Path:
    """OUT as an absolute path, refusing locations that would lose data or clash with the inputs."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise ConversionError(f"{out} is a symlink: give the real output folder")
    resolved = out.parent.resolve() / out.name
    for source in inputs:
        if _inside(resolved, source):
            raise ConversionError(f"output {out} is inside the input folder {source}: write the repo somewhere else")
        if _inside(source, resolved):
            raise ConversionError(f"output {out} contains the input folder {source}: write the repo somewhere else")
    if out.exists():
        if not out.is_dir():
            raise ConversionError(f"{out} exists and is not a folder: remove it or choose another output folder")
        if any(out.iterdir()):
            if not overwrite:
                raise ConversionError(
                    f"{out} is not empty: pass --overwrite to replace it, or choose another output folder"
                )
            _check_replaceable(out)
    return resolved


def _check_replaceable(out: Path) -> None:
    """--overwrite replaces only a repo this converter made, never a folder of something else."""
    if not made_by_converter(out):
        raise ConversionError(
            f"{out} is not empty and is not a repo made by fireredasr-convert (its config.json has no "
            f"{PROVENANCE_KEY} record), so --overwrite leaves it alone: empty or remove it yourself, "
            "or choose another output folder"
        )


class StagedOutput:
    """Builds the output in a hidden sibling folder and puts it in place only when complete.

    On any exception, KeyboardInterrupt included, the staging folder is removed,
    and so are the parent folders created for it while they are empty (another
    job may have written into them meanwhile); OUT is left as it was. With
    `overwrite`, an old OUT that is a repo this converter made is moved aside,
    the new one renamed in, and the old one deleted; if the swap fails the old
    one is moved back.
    """

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.overwrite = overwrite
        self.path: Path | None = None
        self._created_parents: list[Path] = []
        self._committed = False

    def __enter__(self) -> StagedOutput:
        missing = missing_folders(self.out.parent)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._created_parents = missing
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            # mkdtemp makes the folder private (0700); OUT gets the usual permissions.
            os.chmod(self.path, 0o777 & ~current_umask())
        except OSError as error:
            remove_created_folders(self._created_parents)
            raise output_error(error, self.out.parent) from None
        return self

    def commit(self) -> None:
        """Move the finished staging folder to OUT."""
        try:
            if self.out.exists() and any(self.out.iterdir()):
                if not self.overwrite:
                    raise ConversionError(f"{self.out} became non-empty during the conversion: nothing was replaced")
                # Checked again: the folder may have changed during the conversion.
                _check_replaceable(self.out)
                self._swap()
            else:
                # rename() replaces an empty folder atomically.
                os.rename(self.path, self.out)
        except OSError as error:
            raise output_error(error, self.out.parent) from None
        self._committed = True

    def _swap(self) -> None:
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        os.rename(self.out, old)  # onto the empty placeholder
        try:
            os.rename(self.path, self.out)
        except BaseException:
            os.rename(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and self.path is not None:
            # The staging folder is this run's own (a unique mkdtemp name).
            shutil.rmtree(self.path, ignore_errors=True)
            remove_created_folders(self._created_parents)


def output_error(error: OSError, where: Path) -> ConversionError:
    if _is_disk_full(error):
        return ConversionError(
            f"disk full while writing to {where}: free some space there or choose another output folder"
        )
    return ConversionError(
        f"{error.strerror or error} ({error.filename or where}): check the files' permissions and the free space"
    )
