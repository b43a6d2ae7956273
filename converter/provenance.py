"""How a converted repo was made: the user's options, the sha256 of the inputs, the provenance record.

`ConversionOptions` is what the user chose; `InputHasher` hashes the input files
on a background thread while the tensors stream; `provenance` is the record
stored in `config.json` under `PROVENANCE_KEY`; `command_line` spells the options
as the command that made the repo (for the model card). Writing the files that
carry them is not here (`repo_configs`, `model_card`).
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .plan import DEFAULT_MAX_SHARD_SIZE, ConversionPlan, parse_size
from .release import Release
from .safe_io import UnsafeInput, load_json

CONVERTER = "fireredasr-convert"
PROVENANCE_KEY = "fireredasr_conversion"
HASH_BLOCK_BYTES = 16 << 20
PLUGIN_TARGET = "plugin"


@dataclass(frozen=True)
class ConversionOptions:
    """What the user chose; recorded in the provenance and the model card."""

    dtype: str
    max_shard_size: int
    lora_alpha: float | None
    llm_dir_given: bool
    target: str = PLUGIN_TARGET


class InputHasher:
    """sha256 of the input files, computed on a background thread while the tensors stream.

    hashlib and file reads release the GIL, so hashing overlaps the conversion
    instead of adding a second pass over ~17 GB. `cancel()` stops it early.
    """

    def __init__(self, files: list[Path]):
        self._files = files
        self._stop = threading.Event()
        self._result: Future = Future()
        self._thread = threading.Thread(target=self._run, name="fireredasr-hash-inputs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            hashes = {}
            buffer = bytearray(HASH_BLOCK_BYTES)
            view = memoryview(buffer)
            for path in self._files:
                digest = hashlib.sha256()
                with open(path, "rb", buffering=0) as f:
                    while not self._stop.is_set() and (count := f.readinto(buffer)):
                        digest.update(view[:count])
                hashes[path] = digest.hexdigest()
            self._result.set_result(hashes)
        except BaseException as error:  # handed to the caller of result()
            self._result.set_exception(error)

    def result(self) -> dict[Path, str]:
        return self._result.result()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


def _input_name(release: Release, path: Path) -> str:
    """A file's name relative to the release (or Qwen2) folder: no absolute paths in the output."""
    if path.parent == release.model_dir:
        return path.name
    return f"{release.llm.path.name}/{path.name}"


def provenance(release: Release, plan: ConversionPlan, options: ConversionOptions, hashes: dict[Path, str]) -> dict:
    lora = release.lora
    return {
        "converter": CONVERTER,
        "converter_version": __version__,
        "release_layout": release.layout,
        "options": {
            "target": options.target,
            "dtype": options.dtype,
            "max_shard_size": options.max_shard_size,
            "lora_alpha": options.lora_alpha,
            "llm_dir_given": options.llm_dir_given,
        },
        "encoder_source": release.encoder_source.path.name,
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "merged_weights": len(lora.pairs)},
        "inputs": {
            _input_name(release, path): {"size": path.stat().st_size, "sha256": hashes[path]}
            for path in release.input_files
        },
    }


def made_by_converter(folder: Path) -> bool:
    """True if `folder` holds a repo this converter wrote: a config.json (a file, not a link)
    carrying its provenance record. What `--overwrite` may replace."""
    config = Path(folder) / "config.json"
    if config.is_symlink() or not config.is_file():
        return False
    try:
        record = load_json(config).get(PROVENANCE_KEY)
    except (OSError, UnsafeInput):
        return False
    return isinstance(record, dict) and record.get("converter") == CONVERTER


def command_line(options: ConversionOptions) -> str:
    """The options as a command line (defaults left out)."""
    words = [CONVERTER, "SRC", "OUT"]
    if options.llm_dir_given:
        words += ["--llm-dir", "QWEN2_DIR"]
    if options.dtype != "bf16":
        words += ["--dtype", options.dtype]
    if options.lora_alpha is not None:
        words += ["--lora-alpha", f"{options.lora_alpha:g}"]
    if options.max_shard_size != parse_size(DEFAULT_MAX_SHARD_SIZE):
        words += ["--max-shard-size", str(options.max_shard_size)]
    if options.target != PLUGIN_TARGET:
        words += ["--target", options.target]
    return " ".join(words)
