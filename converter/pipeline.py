"""`convert()`: discover the release, plan the output, stream the tensors, verify, move into place.

Also the `--target` table and the progress lines. The contents of the small
files come from the target (`targets`, `stock_vllm`), `repo_configs`,
`tokenizer` and `provenance`; the command line is `cli`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from .aed_release import discover_aed_release, is_aed_release
from .aed_repo import (
    aed_provenance,
    check_aed_tokenizer,
    check_aed_tokenizer_files,
    describe_aed,
    plan_aed_tensors,
    write_aed_files,
)
from .errors import ConversionError
from .plan import (
    DEFAULT_MAX_SHARD_SIZE,
    BlockBuffers,
    ConversionPlan,
    build_plan,
    describe,
    format_size,
    parse_size,
    shard_plan,
)
from .release import Release, discover_release
from .provenance import PLUGIN_TARGET, ConversionOptions, InputHasher, provenance
from .repo_configs import write_generation_config
from .stock_vllm import StockVllmFormat
from .targets import OutputFormat, PluginFormat
from .tokenizer import check_tokenizer, write_tokenizer
from .verify import check_index_and_shards, check_tensor_values
from .writer import (
    WRITE_QUEUE_DEPTH,
    BackgroundWriter,
    ShardWriter,
    StagedOutput,
    check_output_location,
    output_error,
    write_index,
)

# The --target values: the plugin's format (docs/format.md) or stock vLLM's FireRedASR2 layout (docs/stock-vllm.md).
TARGETS: dict[str, OutputFormat] = {output.name: output for output in (PluginFormat(), StockVllmFormat())}
DEFAULT_TARGET = PLUGIN_TARGET


@dataclass(frozen=True)
class ConversionResult:
    out: Path
    dry_run: bool  # True: nothing was written
    plan: list[str]  # the plan, as --dry-run prints it
    num_tensors: int
    num_shards: int
    total_size: int  # bytes of tensor data
    speech_token_id: int | None  # None for FireRedASR-AED, which has no audio placeholder
    target: str


class _Progress:
    """Tensors and bytes written, on stderr: in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, plan: ConversionPlan, enabled: bool):
        self.enabled = enabled
        self._total_tensors = len(plan.tensors)
        self._total_bytes = plan.total_size
        self._tensors = self._bytes = 0
        self._interactive = sys.stderr.isatty()
        self._last = time.monotonic()

    def say(self, text: str) -> None:
        if self.enabled:
            click.echo(text, err=True)

    def advance(self, num_bytes: int) -> None:
        self._tensors += 1
        self._bytes += num_bytes
        done = self._tensors == self._total_tensors
        now = time.monotonic()
        if not self.enabled or not (done or now - self._last >= (0.2 if self._interactive else 10.0)):
            return
        self._last = now
        percent = 100 * self._bytes / max(1, self._total_bytes)
        line = (
            f"  {self._tensors}/{self._total_tensors} tensors, {format_size(self._bytes)} / "
            f"{format_size(self._total_bytes)} ({percent:.0f}%)"
        )
        if self._interactive:
            click.echo("\r" + line, err=True, nl=done)
        else:
            click.echo(line, err=True)


def convert(
    src: Path,
    out: Path,
    *,
    llm_dir: Path | None = None,
    dtype: str = "bf16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    dry_run: bool = False,
    lora_alpha: int | None = None,
    quiet: bool = True,
    target: str = DEFAULT_TARGET,
) -> ConversionResult:
    """Convert the FireRedASR-LLM or FireRedASR-AED release in `src` into a self-contained repo at `out`.

    A folder with `dict.txt` and no `asr_encoder.pth.tar` is a FireRedASR-AED release
    (plugin target only, no Qwen2 folder or LoRA options; docs/format.md).

    `target` picks the output format: "plugin" (docs/format.md, served by this
    project's vLLM plugin) or "stock-vllm" (stock vLLM's built-in
    FireRedASR2ForConditionalGeneration, docs/stock-vllm.md). Raises
    ConversionError (one line naming the problem and the fix) with `out` left
    as it was. `dry_run` only checks the release and returns the plan.
    """
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    if is_aed_release(Path(src)):
        return _convert_aed(
            Path(src), Path(out), llm_dir=llm_dir, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
            dry_run=dry_run, lora_alpha=lora_alpha, quiet=quiet, target=target,
        )  # fmt: skip
    output_format = TARGETS[target]
    inputs = [Path(p).resolve() for p in (src, llm_dir) if p is not None]
    out = check_output_location(Path(out), inputs, overwrite)
    options = ConversionOptions(
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        lora_alpha=lora_alpha,
        llm_dir_given=llm_dir is not None,
        target=target,
    )
    release = discover_release(Path(src), llm_dir, lora_alpha)
    try:
        # The Qwen2 folder is only known now (a symlink may lead anywhere).
        out = check_output_location(out, [release.model_dir, release.llm.path], overwrite)
        output_format.check_release(release)
        plan = build_plan(release, dtype, options.max_shard_size, output_format.language_model_prefix)
        result = ConversionResult(
            out=out,
            dry_run=dry_run,
            plan=[f"target: {target}, {output_format.summary}", *describe(release, plan, output_format.speech_token)],
            num_tensors=len(plan.tensors),
            num_shards=len(plan.shards),
            total_size=plan.total_size,
            speech_token_id=release.llm.tokenizer.speech_token_id,
            target=target,
        )
        if not dry_run:
            _check_free_space(out, plan)
            _write_repo(
                release.input_files, plan, out, overwrite, _Progress(plan, enabled=not quiet),
                small_files=functools.partial(_write_llm_files, release=release, plan=plan, options=options,
                                              output_format=output_format),
                check_small_files=lambda folder: check_tokenizer(
                    folder, release.llm.tokenizer.speech_token_id, output_format.speech_token
                ),
            )  # fmt: skip
        return result
    finally:
        release.llm.weights.close()


def _check_free_space(out: Path, plan: ConversionPlan) -> None:
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < plan.total_size:
        raise ConversionError(
            f"not enough free space for {out}: the weights need {format_size(plan.total_size)}, "
            f"{format_size(free)} are free; free some space or choose another output folder"
        )


def _write_repo(
    input_files: list,
    plan: ConversionPlan,
    out: Path,
    overwrite: bool,
    progress: _Progress,
    small_files: Callable[[Path, dict[Path, str]], None],
    check_small_files: Callable[[Path], None],
) -> None:
    """Stage, stream the weights, write the format's small files, verify, then put the repo at `out`.

    The same for every release kind; `small_files(folder, input_hashes)` writes the
    tokenizer, configs and card, `check_small_files(folder)` checks what it wrote after
    the shards are checked against the plan.
    """
    hasher = InputHasher(input_files)
    try:
        with StagedOutput(out, overwrite) as staged:
            progress.say(f"writing {len(plan.tensors)} tensors to {out}")
            with _one_core_left_free():
                _write_weights(staged.path, plan, progress)
            small_files(staged.path, hasher.result())
            progress.say("verifying")
            check_index_and_shards(staged.path, plan)
            check_tensor_values(staged.path, plan)
            check_small_files(staged.path)
            staged.commit()
        progress.say(f"done: {out} ({len(plan.shards)} shard(s), {format_size(plan.total_size)})")
    except OSError as error:
        raise output_error(error, out.parent) from None
    finally:
        hasher.cancel()


@contextlib.contextmanager
def _one_core_left_free():
    """Run torch on all cores but one while streaming: the input hashing and the
    write thread need one, and torch's spinning worker threads slow everything
    down when they compete with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_weights(folder: Path, plan: ConversionPlan, progress: _Progress) -> None:
    buffers = BlockBuffers(slots=WRITE_QUEUE_DEPTH + 2)
    background = BackgroundWriter(WRITE_QUEUE_DEPTH)
    try:
        for shard in plan.shards:
            writer = ShardWriter(folder / shard.filename, shard, plan.dtype, background)
            try:
                for tensor in shard.tensors:
                    blocks = tensor.blocks(plan.dtype, plan.lora_scale, buffers)
                    writer.write_tensor(tensor.name, blocks, then=tensor.source.done)
                    progress.advance(tensor.nbytes(plan.dtype))
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        background.close()
    write_index(folder, plan.total_size, plan.weight_map())


def _write_llm_files(
    folder: Path, input_hashes: dict[Path, str], release: Release, plan: ConversionPlan, options: ConversionOptions,
    output_format: OutputFormat,
) -> None:
    write_tokenizer(release.llm.tokenizer, folder, output_format.speech_token)
    write_generation_config(release, folder)
    conversion = provenance(release, plan, options, input_hashes)
    output_format.write_files(folder, release, plan, options, conversion)


# --- FireRedASR-AED -----------------------------------------------------------------------


def _convert_aed(
    src: Path,
    out: Path,
    *,
    llm_dir: Path | None,
    dtype: str,
    max_shard_size: str | int,
    overwrite: bool,
    dry_run: bool,
    lora_alpha: int | None,
    quiet: bool,
    target: str,
) -> ConversionResult:
    """`convert` for a FireRedASR-AED release: the same staging, streaming and checks, its own files."""
    for given, option in ((llm_dir, "--llm-dir"), (lora_alpha, "--lora-alpha")):
        if given is not None:
            raise ConversionError(f"{src} is a FireRedASR-AED release, which has no Qwen2 LLM: leave out {option}")
    if target != DEFAULT_TARGET:
        raise ConversionError(
            f"{src} is a FireRedASR-AED release: --target {target} exports FireRedASR-LLM only; use --target plugin"
        )
    out = check_output_location(out, [src.resolve()], overwrite)
    options = ConversionOptions(
        dtype=dtype, max_shard_size=parse_size(max_shard_size), lora_alpha=None, llm_dir_given=False, target=target
    )
    release = discover_aed_release(src)
    check_aed_tokenizer_files(release)
    plan = shard_plan(plan_aed_tensors(release), dtype, options.max_shard_size)
    result = ConversionResult(
        out=out,
        dry_run=dry_run,
        plan=[f"target: {target}, {TARGETS[target].summary}", *describe_aed(release, plan)],
        num_tensors=len(plan.tensors),
        num_shards=len(plan.shards),
        total_size=plan.total_size,
        speech_token_id=None,
        target=target,
    )
    if not dry_run:
        _check_free_space(out, plan)
        _write_repo(
            release.input_files, plan, out, overwrite, _Progress(plan, enabled=not quiet),
            small_files=lambda folder, input_hashes: write_aed_files(
                folder, release, plan, options, aed_provenance(release, options, input_hashes)
            ),
            check_small_files=lambda folder: check_aed_tokenizer(folder, release),
        )
    return result
