"""Readers for the files of a FireRedASR-LLM release.

Pickled checkpoints are loaded with `weights_only=True` (tensors, plain
containers and `argparse.Namespace`, nothing else) and memory-mapped where the
file format allows; Kaldi CMVN statistics are parsed in their binary and text
forms; the Qwen2 folder's safetensors shards are read lazily, a slice at a time.
Every problem surfaces as a one-line `ConversionError`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConversionError
from .repo_format import INDEX_NAME
from .safe_io import UnsafeInput, load_json, parse_json

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def check_readable(path: Path, fix: str) -> None:
    """Raise a ConversionError unless `path` is a regular file this process can read."""
    if not path.exists():
        raise ConversionError(f"missing {path}: {fix}")
    if not path.is_file():
        raise ConversionError(f"{path} is not a regular file: {fix}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as error:
        raise ConversionError(f"cannot read {path}: {error.strerror}; fix its permissions or copy it again") from None


def _short(error: BaseException) -> str:
    """The gist of an exception for a one-line message."""
    text = str(error)
    # torch's weights-only errors bury the actual problem after several paragraphs of advice.
    text = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if text.strip() else ""
    text = " ".join(text.split()).split(". ")[0]
    return f"{type(error).__name__}: {text[:120]}" if text else type(error).__name__


# --- pickled checkpoints ---------------------------------------------------------------

_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _load_libc_madvise():
    path = ctypes.util.find_library("c")
    if path is None or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    madvise = ctypes.CDLL(path, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_libc_madvise()


@dataclass
class Checkpoint:
    """A loaded `*.pth.tar`: the unpickled package and whether its tensors are memory-mapped."""

    path: Path
    package: dict
    memory_mapped: bool

    def release_pages(self, tensor: torch.Tensor) -> None:
        """Let go of the resident pages of a memory-mapped tensor we are done with.

        A memory-mapped checkpoint stays mapped for the whole conversion, and every
        page read from it counts towards the process's resident memory: a 3.4 GB
        `model.pth.tar` read once would hold 3.4 GB. The mapping is private and never
        written, so dropping the pages loses nothing: touching them again reads them
        back from the file (or the page cache). Only done on memory-mapped
        checkpoints: on anonymous memory MADV_DONTNEED would zero the data.
        """
        if not self.memory_mapped or _madvise is None or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end_page = end // mmap.PAGESIZE * mmap.PAGESIZE
        if end_page > first_page:
            _madvise(first_page, end_page - first_page, mmap.MADV_DONTNEED)


def load_checkpoint(path: Path, fix: str) -> Checkpoint:
    """Load a FireRedASR `*.pth.tar` without running code from it.

    `weights_only=True` admits tensors and plain containers; `argparse.Namespace`
    (the pickled training arguments) is the one class added. A checkpoint that
    needs anything else is refused: unrestricted unpickling runs arbitrary code.
    """
    check_readable(path, fix)
    # Only the zip-based format (torch >= 1.6) can be memory-mapped.
    memory_mapped = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            package = torch.load(path, map_location="cpu", weights_only=True, mmap=memory_mapped)
    except pickle.UnpicklingError as error:
        unsafe = _UNSAFE_GLOBAL.search(str(error))
        if unsafe is None:
            raise ConversionError(f"{path} is truncated or corrupt ({_short(error)}): download it again") from None
        raise ConversionError(
            f"{path} needs {unsafe.group(1)} to unpickle, which could run arbitrary code; only tensors and "
            "argparse.Namespace are loaded: re-save it with plain tensors, or download the original release again"
        ) from None
    except Exception as error:  # torch reports damage with many exception types
        raise ConversionError(f"{path} is truncated or corrupt ({_short(error)}): download it again") from None
    if not isinstance(package, dict):
        raise ConversionError(f"{path} holds a {type(package).__name__}, not a FireRedASR checkpoint dict: {fix}")
    return Checkpoint(path=path, package=package, memory_mapped=memory_mapped)


# --- Kaldi CMVN statistics -------------------------------------------------------------

_KALDI_BINARY_MATRIX = {b"DM ": np.dtype("<f8"), b"FM ": np.dtype("<f4")}
_CMVN_FIX = "regenerate it with Kaldi's compute-cmvn-stats or copy it from the original release"


def read_kaldi_matrix(path: Path) -> np.ndarray:
    """A Kaldi matrix file: binary double (`\\0B` `DM `) or float (`FM `), or text `[ ... ]`."""
    check_readable(path, _CMVN_FIX)
    data = path.read_bytes()
    if data.startswith(b"\0B"):
        return _read_kaldi_binary_matrix(path, data)
    if data.lstrip().startswith(b"["):
        return _read_kaldi_text_matrix(path, data)
    raise ConversionError(
        f"{path} is not a Kaldi matrix (it starts with {data[:5]!r}, expected b'\\x00BDM ', b'\\x00BFM ' or '['): "
        + _CMVN_FIX
    )


def _read_kaldi_binary_matrix(path: Path, data: bytes) -> np.ndarray:
    token = data[2:5]
    if token not in _KALDI_BINARY_MATRIX:
        raise ConversionError(
            f"{path} holds a Kaldi {token.decode(errors='replace').strip() or 'unknown'} object, "
            f"not an uncompressed DM/FM matrix: {_CMVN_FIX}"
        )
    dtype = _KALDI_BINARY_MATRIX[token]
    # Each dimension is written as a one-byte size (4) and a little-endian int32.
    if len(data) < 15 or data[5] != 4 or data[10] != 4:
        raise ConversionError(f"{path} has a damaged Kaldi matrix header: {_CMVN_FIX}")
    rows, cols = struct.unpack("<i", data[6:10])[0], struct.unpack("<i", data[11:15])[0]
    payload = data[15:]
    if rows < 0 or cols < 0 or len(payload) != rows * cols * dtype.itemsize:
        raise ConversionError(
            f"{path} declares a {rows} x {cols} matrix but holds {len(payload)} bytes of data: {_CMVN_FIX}"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(rows, cols).astype(np.float64)


def _read_kaldi_text_matrix(path: Path, data: bytes) -> np.ndarray:
    text = data.decode("ascii", errors="replace").strip()
    if not text.endswith("]"):
        raise ConversionError(f"{path} is a text Kaldi matrix without its closing ']': {_CMVN_FIX}")
    try:
        rows = [[float(v) for v in line.split()] for line in text[1:-1].splitlines() if line.strip()]
    except ValueError as error:
        raise ConversionError(f"{path} has a non-numeric entry ({error}): {_CMVN_FIX}") from None
    if not rows or any(len(row) != len(rows[0]) for row in rows):
        raise ConversionError(f"{path} is a text Kaldi matrix with ragged or no rows: {_CMVN_FIX}")
    return np.array(rows, dtype=np.float64)


# --- tensor names and shapes ------------------------------------------------------------

# Dotted names of letters, digits and underscores, as PyTorch modules name their tensors.
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_MAX_TENSOR_NAME = 300


def tensor_problem(name: object, shape: tuple[int, ...]) -> str | None:
    """What makes a tensor unusable by its name or shape alone; None if nothing.

    An empty dimension holds no data yet can declare 10**15 rows, which a
    row-by-row copy would loop over; no FireRedASR or Qwen2 tensor has one.
    """
    if not isinstance(name, str) or len(name) > _MAX_TENSOR_NAME or not _TENSOR_NAME.match(name):
        return f"the tensor name {str(name)[:60]!r} is not a dotted module path"
    if any(dim <= 0 for dim in shape):
        return f"tensor {name} has shape {list(shape)}, with an empty dimension"
    return None


# --- safetensors folders ----------------------------------------------------------------

# A safetensors header larger than this is damage, not a model.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes are in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path, fix: str) -> list[tuple[str, StoredTensor]]:
    """The tensors of a safetensors file in storage order, checked against the file's size."""
    damaged = f"{path} is truncated or corrupt"
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < header_size <= min(size - 8, _MAX_HEADER_BYTES):
            raise ConversionError(f"{damaged} (no valid header): download it again")
        try:
            header = parse_json(f.read(header_size))
        except UnsafeInput as error:
            raise ConversionError(f"{damaged} (header: {error}): download it again") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{damaged} (its header is not a JSON object): download it again")
    entries = []
    data_start = 8 + header_size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(
                f"{path} stores {name[:60]!r} in a form this converter does not read: {fix}"
            ) from None
        problem = tensor_problem(name, shape)
        if problem is not None:
            raise ConversionError(f"{path}: {problem}: {fix}")
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or data_start + end > size:
            raise ConversionError(f"{damaged} ({name} lies outside the file): download it again")
        entries.append((name, StoredTensor(path, dtype, shape, data_start + begin)))
    return sorted(entries, key=lambda entry: entry[1].offset)


class SafetensorsFolder:
    """The tensors of a (sharded) safetensors checkpoint, read a block of rows at a time.

    `tensors` maps each name to where it is stored, in storage order (by file,
    then by offset), so reading them in that order reads each file front to
    back. Rows are read with pread into a caller's buffer: no memory map (whose
    pages would count as resident memory until the file is closed) and no fresh
    allocation per block.
    """

    def __init__(self, folder: Path, fix: str):
        self.folder = folder
        self.files = self._list_files(fix)
        self.tensors: dict[str, StoredTensor] = {}
        for file in self.files:
            for name, stored in read_safetensors_header(file, fix):
                if name in self.tensors:
                    raise ConversionError(f"tensor {name} is stored twice in {folder}: {fix}")
                self.tensors[name] = stored
        self._descriptors: dict[Path, int] = {}

    def _list_files(self, fix: str) -> list[Path]:
        index_path = self.folder / INDEX_NAME
        if index_path.exists():
            check_readable(index_path, fix)
            try:
                weight_map = load_json(index_path)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map is not an object of file names")
            except (UnsafeInput, KeyError, TypeError) as error:
                raise ConversionError(f"{index_path} is not a safetensors index ({_short(error)}): {fix}") from None
            names = dict.fromkeys(weight_map.values())
            outside = [name for name in names if Path(name).name != name or name.startswith(".")]
            if outside:
                raise ConversionError(f"{index_path} names {outside[0][:60]!r}, not a file of {self.folder}: {fix}")
            files = [self.folder / name for name in names]
        elif (self.folder / "model.safetensors").exists():
            files = [self.folder / "model.safetensors"]
        else:
            raise ConversionError(
                f"no safetensors weights in {self.folder} ({INDEX_NAME} or model.safetensors): {fix}"
            )
        for file in files:
            check_readable(file, fix)
        return files

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along the first dimension (a 0-d tensor whole), in `buffer` if given.

        `buffer` is a flat, contiguous tensor of the stored dtype with room for the rows.
        """
        stored = self.tensors[name]
        if not stored.shape:
            start, stop, row_shape = 0, 1, ()
        else:
            row_shape = stored.shape[1:]
        row_numel = math.prod(row_shape)
        numel = (stop - start) * row_numel
        values = torch.empty(numel, dtype=stored.dtype) if buffer is None else buffer[:numel]
        target = values.view(torch.uint8).numpy()
        offset = stored.offset + start * row_numel * stored.dtype.itemsize
        descriptor = self._descriptors.get(stored.file)
        if descriptor is None:
            descriptor = self._descriptors[stored.file] = os.open(stored.file, os.O_RDONLY)
        done = 0
        while done < target.nbytes:
            count = os.preadv(descriptor, [target[done:]], offset + done)
            if count == 0:
                raise ConversionError(f"{stored.file} ended while reading {name}: it was truncated; download it again")
            done += count
        return values.view(stop - start, *row_shape) if stored.shape else values.view(())

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()
