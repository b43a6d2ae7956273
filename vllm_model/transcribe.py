"""`fireredasr-transcribe`: the original recipe's `speech2text.py` workflow on vLLM.

Audio files in (a Kaldi `wav.scp`, a folder, or paths), a Kaldi `text` file out
(`uttid<TAB>transcript` per line), decoded by the vLLM plugin (default) or by the
plain PyTorch reference implementation.

- Results are written in input order as soon as they and every earlier utterance
  are finished, one flushed line each, so an interrupted run keeps what it
  finished; `--resume` skips the utterances the output already holds (and drops
  an unfinished last line), so a resumed run ends with the same file as an
  uninterrupted one.
- Audio is read with soundfile at any rate and channel count, averaged to mono and
  resampled to 16 kHz with PyAV (as vLLM's own audio loader does). A file that
  cannot be read or that the model cannot take (too short, too long) is reported
  on stderr and skipped; the rest of the batch goes on.
- Exit status: 0 when the output holds every input utterance, 3 when it holds
  some, 1 when it holds none or on a fatal error (2 is a command-line error).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

import click
import numpy as np

from fireredasr_converter import spec

EXIT_COMPLETE = 0
EXIT_NOTHING = 1
# 2 is click's exit status for command-line errors.
EXIT_PARTIAL = 3

# Extensions --wav-dir collects: the formats libsndfile reads.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# Clips read ahead of the decoder by the loader thread.
READ_AHEAD = 16


class InputError(ValueError):
    """Bad input lists (duplicate ids, unreadable wav.scp): fatal, before any decoding."""


class AudioError(ValueError):
    """One utterance's audio cannot be transcribed; the utterance is skipped."""


@dataclass(frozen=True)
class Utterance:
    uttid: str
    path: str


# --- inputs -------------------------------------------------------------------


def _uttid_of(path: Path) -> str:
    return path.stem


def read_wav_scp(path: Path) -> list[Utterance]:
    """Kaldi `wav.scp`: `uttid path` per line; relative paths are relative to the working directory."""
    utterances = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read --wav-scp {path}: {error}") from None
    for line_number, line in enumerate(lines, 1):
        fields = line.strip().split(maxsplit=1)
        if not fields:
            continue
        if len(fields) == 1:
            raise InputError(f"{path}:{line_number}: {fields[0]!r} has no audio path; write `uttid path` per line")
        utterances.append(Utterance(fields[0], fields[1]))
    return utterances


def collect_utterances(
    wav_scp: Path | None = None, wav_dir: Path | None = None, paths: Sequence[Path] = ()
) -> list[Utterance]:
    """Every utterance the inputs name, in order: wav.scp lines, then the folder's
    audio files (sorted, searched recursively), then the paths. File names give
    the ids of the latter two (the name without its extension, as the recipe does)."""
    utterances = read_wav_scp(wav_scp) if wav_scp is not None else []
    if wav_dir is not None:
        if not wav_dir.is_dir():
            raise InputError(f"--wav-dir {wav_dir} is not a folder")
        found = sorted(p for p in wav_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        if not found:
            raise InputError(f"--wav-dir {wav_dir} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
        utterances += [Utterance(_uttid_of(p), str(p)) for p in found]
    utterances += [Utterance(_uttid_of(p), str(p)) for p in paths]

    first_path: dict[str, str] = {}
    for utterance in utterances:
        if any(c.isspace() for c in utterance.uttid):
            raise InputError(
                f"utterance id {utterance.uttid!r} (from {utterance.path}) contains whitespace, which a Kaldi "
                "text file cannot hold; rename the file or list it in a wav.scp"
            )
        if utterance.uttid in first_path:
            raise InputError(
                f"utterance id {utterance.uttid!r} is used twice ({first_path[utterance.uttid]} and "
                f"{utterance.path}); ids must be unique: rename one file or list them in a wav.scp"
            )
        first_path[utterance.uttid] = utterance.path
    return utterances


# --- audio --------------------------------------------------------------------


def load_audio(path: str) -> np.ndarray:
    """A file as 16 kHz mono float32 in [-1, 1], or AudioError naming the problem."""
    import soundfile

    if path.rstrip().endswith("|"):
        raise AudioError("Kaldi command pipes are not supported; write the audio to a file and list that file")
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file")
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, OSError) as error:
        raise AudioError(f"unreadable audio: {error}") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path} holds no samples")
    # [frames, channels] -> mono, as vLLM's audio parser downmixes.
    waveform = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != spec.SAMPLE_RATE:
        from vllm.multimodal.audio import resample_audio_pyav

        waveform = resample_audio_pyav(waveform, orig_sr=rate, target_sr=spec.SAMPLE_RATE)
    return np.ascontiguousarray(waveform, dtype=np.float32)


def read_ahead(utterances: Iterable[tuple[int, Utterance]], load) -> Iterator[tuple[int, Utterance, np.ndarray | AudioError]]:
    """Load clips on a background thread, a few ahead of the decoder, in input order."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="audio-reader") as pool:
        queued: deque[tuple[int, Utterance, Future]] = deque()
        source = iter(utterances)
        for index, utterance in source:
            queued.append((index, utterance, pool.submit(load, utterance.path)))
            if len(queued) >= READ_AHEAD:
                break
        while queued:
            index, utterance, future = queued.popleft()
            next_item = next(source, None)
            if next_item is not None:
                queued.append((*next_item, pool.submit(load, next_item[1].path)))
            try:
                yield index, utterance, future.result()
            except AudioError as error:
                yield index, utterance, error


# --- output -------------------------------------------------------------------


def kaldi_text(text: str) -> str:
    """A transcript as one Kaldi `text` field: whitespace runs (newlines included) become one space."""
    return " ".join(text.split())


def read_finished(output: Path) -> set[str]:
    """Utterance ids an earlier run wrote to `output`. An unfinished last line (the run
    was killed while writing it) is cut off the file, so appending continues cleanly."""
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(output, "r+b") as file:
            file.truncate(len(complete))
    lines = complete.decode("utf-8", errors="replace").splitlines()
    return {line.split(maxsplit=1)[0] for line in lines if line.strip()}


class OrderedWriter:
    """Writes results in input order as soon as every earlier utterance is settled."""

    def __init__(self, stream: TextIO, indices: Iterable[int]):
        self.stream = stream
        self._order = deque(indices)
        self._settled: dict[int, tuple[str, str] | None] = {}
        self.written = 0

    def settle(self, index: int, line: tuple[str, str] | None) -> None:
        """`line` is (uttid, text), or None for a skipped utterance."""
        self._settled[index] = line
        while self._order and self._order[0] in self._settled:
            result = self._settled.pop(self._order.popleft())
            if result is not None:
                uttid, text = result
                self.stream.write(f"{uttid}\t{kaldi_text(text)}\n")
                self.stream.flush()
                self.written += 1


# --- progress -----------------------------------------------------------------


class Progress:
    """Utterances/s and real-time factor on stderr: in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled
        self.done = self.failed = 0
        self.audio_seconds = 0.0
        self.start = time.monotonic()
        self._interactive = sys.stderr.isatty()
        self._last = self.start
        self._line_open = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rates(self) -> str:
        elapsed = max(self.elapsed, 1e-9)
        rtf = elapsed / self.audio_seconds if self.audio_seconds else float("nan")
        return f"{self.done / elapsed:.2f} utt/s, RTF {rtf:.4f}"

    def advance(self, audio_seconds: float | None) -> None:
        if audio_seconds is None:
            self.failed += 1
        else:
            self.done += 1
            self.audio_seconds += audio_seconds
        now = time.monotonic()
        finished = self.done + self.failed == self.total
        if self.enabled and (finished or now - self._last >= (0.2 if self._interactive else 10.0)):
            self._last = now
            line = (
                f"{self.done + self.failed}/{self.total} utterances ({self.failed} skipped), "
                f"{self.audio_seconds / 60:.1f} min of audio, {self.rates()}"
            )
            if self._interactive:
                click.echo("\r" + line + "\033[K", err=True, nl=False)
                self._line_open = True
            else:
                click.echo(line, err=True)

    def message(self, text: str) -> None:
        """A line of its own, even while the progress line is being redrawn."""
        if self._line_open:
            click.echo(err=True)
            self._line_open = False
        click.echo(text, err=True)

    def close(self) -> None:
        if self._line_open:
            click.echo(err=True)
            self._line_open = False


# --- backends -----------------------------------------------------------------

DTYPES = ("auto", "bfloat16", "float16", "float32")


class VllmBackend:
    def __init__(self, model: str, *, dtype: str, max_new_tokens: int | None, tensor_parallel_size: int, seed: int):
        from fireredasr_vllm.offline import DEFAULT_MAX_MODEL_LEN, create_engine

        # Room for the prompt, the longest clip and the requested number of new tokens.
        max_model_len = DEFAULT_MAX_MODEL_LEN + (max_new_tokens or 0)
        self.llm = create_engine(
            model, dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size, seed=seed
        )

    def close(self) -> None:
        from fireredasr_vllm.offline import shutdown_engine

        shutdown_engine(self.llm)

    def transcribe(self, clips, *, beam_size: int, max_new_tokens: int | None, batch_size: int):
        from fireredasr_vllm.offline import beam_search_transcriptions, stream_transcriptions

        if beam_size > 1:
            yield from beam_search_transcriptions(self.llm, clips, beam_size=beam_size, max_new_tokens=max_new_tokens)
        else:
            yield from stream_transcriptions(self.llm, clips, max_new_tokens=max_new_tokens, max_in_flight=batch_size)


class ReferenceBackend:
    def __init__(self, model: str, *, dtype: str):
        import torch

        from fireredasr_vllm.reference import ReferenceFireRedAsrLlm

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = ReferenceFireRedAsrLlm.from_pretrained(model, dtype=getattr(torch, dtype), device=device)

    def transcribe(self, clips, *, beam_size: int, max_new_tokens: int | None, batch_size: int):
        # The reference decodes one clip at a time, as the original does.
        for key, waveform in clips:
            try:
                (result,) = self.model.transcribe([waveform], max_new_tokens=max_new_tokens, num_beams=beam_size)
            except ValueError as error:
                yield key, error
                continue
            yield key, result


# --- the command --------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_NOTHING)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--model", "-m", required=True, help="A converted repo (`fireredasr-convert SRC OUT`).")
@click.option("--wav-scp", type=click.Path(path_type=Path, dir_okay=False), help="Kaldi wav.scp: `uttid path` per line.")
@click.option("--wav-dir", type=click.Path(path_type=Path, file_okay=False), help="A folder searched recursively for audio files.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Kaldi text file to write (default: stdout).")
@click.option("--resume", is_flag=True, help="Keep OUTPUT's results and transcribe only the utterances it lacks.")
@click.option("--overwrite", is_flag=True, help="Start OUTPUT afresh if it exists.")
@click.option("--backend", type=click.Choice(["vllm", "reference"]), default="vllm", show_default=True,
              help="vllm: the plugin in a vLLM engine; reference: plain PyTorch, one clip at a time.")
@click.option("--beam-size", type=click.IntRange(min=1), default=1, show_default=True, help="1 is greedy decoding.")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Tokens to generate at most per clip [default: one per speech embedding, as the original].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="vLLM: requests kept in the engine at once (continuous batching).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto is the dtype the repo was converted to.")
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True, help="vLLM: GPUs to shard over.")
@click.option("--seed", type=int, default=0, show_default=True, help="vLLM engine seed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line, only skipped utterances and the summary.")
def main(paths, model, wav_scp, wav_dir, output, resume, overwrite, backend, beam_size, max_new_tokens,
         batch_size, dtype, tensor_parallel_size, seed, quiet):
    """Transcribe audio files with FireRedASR-LLM into a Kaldi text file (`uttid<TAB>text`).

    Give the audio as --wav-scp, --wav-dir and/or PATHS. Exit status: 0 when the
    output holds every utterance, 3 when it holds some (the others are reported as
    skipped), 1 when it holds none.
    """  # fmt: skip
    if wav_scp is None and wav_dir is None and not paths:
        raise click.UsageError("give the audio as --wav-scp FILE, --wav-dir DIR or paths")
    if resume and output is None:
        raise click.UsageError("--resume needs --output: the file to continue")
    if resume and overwrite:
        raise click.UsageError("--resume keeps OUTPUT and --overwrite replaces it: choose one")
    try:
        utterances = collect_utterances(wav_scp, wav_dir, paths)
    except InputError as error:
        _fail(str(error))
    if not utterances:
        _fail(f"{wav_scp} lists no utterances")
    if output is not None and not output.parent.is_dir():
        _fail(f"the folder of --output {output} does not exist; create it first")

    finished: set[str] = set()
    if output is not None and output.exists() and output.stat().st_size > 0:
        if resume:
            finished = read_finished(output)
        elif not overwrite:
            _fail(f"{output} exists; pass --resume to continue it or --overwrite to start again")
    pending = [(i, u) for i, u in enumerate(utterances) if u.uttid not in finished]
    already = len(utterances) - len(pending)
    if already:
        click.echo(f"resuming: {already} of {len(utterances)} utterances already in {output}", err=True)
    if not pending:
        click.echo("nothing to do", err=True)
        sys.exit(EXIT_COMPLETE)

    # vLLM logs to stdout by default, where the transcripts may go; its engine
    # processes inherit this. INFO is for serving; a batch job shows warnings only.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from fireredasr_converter.configuration import FireRedAsrLlmConfig, register_with_transformers
    from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor

    try:
        register_with_transformers()
        config = FireRedAsrLlmConfig.from_pretrained(model)
        extractor = FireRedAsrFeatureExtractor.from_pretrained(model)
    except (OSError, ValueError) as error:
        _fail(f"cannot load {model}: {error}; pass a converted repo (`fireredasr-convert SRC OUT`)")
    downsample_rate = config.encoder_downsample_rate
    if dtype == "auto":
        # The converted weights' dtype: vLLM's own "auto" would run fp32 weights in half precision.
        dtype = str(config.dtype or "float32").removeprefix("torch.")

    def load(path: str) -> np.ndarray:
        waveform = load_audio(path)
        try:
            extractor.validate_waveform(waveform, downsample_rate)
        except ValueError as error:
            raise AudioError(f"{path}: {error}") from None
        return waveform

    load_start = time.monotonic()
    if backend == "vllm":
        decoder = VllmBackend(model, dtype=dtype, max_new_tokens=max_new_tokens,
                             tensor_parallel_size=tensor_parallel_size, seed=seed)  # fmt: skip
    else:
        if tensor_parallel_size > 1:
            raise click.UsageError("--tensor-parallel-size applies to --backend vllm only")
        decoder = ReferenceBackend(model, dtype=dtype)
    load_seconds = time.monotonic() - load_start

    stream = open(output, "a" if resume else "w", encoding="utf-8") if output is not None else sys.stdout
    writer = OrderedWriter(stream, (i for i, _ in pending))
    progress = Progress(len(pending), enabled=not quiet)
    durations: dict[int, float] = {}

    def clips():
        for index, utterance, audio in read_ahead(pending, load):
            if isinstance(audio, AudioError):
                progress.message(f"skipped {utterance.uttid}: {audio}")
                writer.settle(index, None)
                progress.advance(None)
                continue
            durations[index] = len(audio) / spec.SAMPLE_RATE
            yield index, audio

    uttids = dict(pending)
    interrupted = False
    try:
        for index, result in decoder.transcribe(clips(), beam_size=beam_size, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size):  # fmt: skip
            if isinstance(result, Exception):
                progress.message(f"skipped {uttids[index].uttid}: {result}")
                writer.settle(index, None)
                progress.advance(None)
            else:
                writer.settle(index, (uttids[index].uttid, result.text))
                progress.advance(durations.pop(index))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        if stream is not sys.stdout:
            stream.close()
        if isinstance(decoder, VllmBackend):
            decoder.close()

    in_output = already + writer.written
    click.echo(
        f"transcribed {progress.done} utterances ({progress.failed} skipped): "
        f"{progress.audio_seconds / 3600:.4f} h of audio in {progress.elapsed:.1f} s "
        f"({progress.rates()}; model load {load_seconds:.1f} s)",
        err=True,
    )
    where = str(output) if output is not None else "the output"
    click.echo(f"{in_output} of {len(utterances)} utterances are in {where}", err=True)
    if interrupted:
        click.echo(f"interrupted: rerun with --resume to finish {where}", err=True)
        sys.exit(130)
    sys.exit(EXIT_COMPLETE if in_output == len(utterances) else EXIT_PARTIAL if in_output else EXIT_NOTHING)


if __name__ == "__main__":
    main()
