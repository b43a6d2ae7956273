"""`fireredasr-transcribe`: the original recipe's `speech2text.py` workflow on vLLM, for audio of any length.

Audio files in (a Kaldi `wav.scp`, a folder, or paths), transcripts out: a Kaldi
`text` file (`uttid<TAB>transcript` per line), JSON lines with segment times,
or one SRT / WebVTT subtitle file per recording. Decoded by the vLLM plugin
(default: one engine in this process; `--engine ray`: replicas on a Ray
cluster, `fireredasr_vllm.ray_transcription`) or by the plain PyTorch
reference implementation.

A client of the Python API (`fireredasr_vllm.FireRedAsr.transcribe_many`, which
decodes; `api.py`): `run(utterances, Job(...))` transcribes, writes and reports,
and returns the exit status; `main` is the click command around it (options to
a `Job`, errors to exit statuses).

- A recording of at most the model's clip limit (30 s) is decoded whole, as the
  original does; a longer one is cut by a voice activity detector into segments
  the model takes (`fireredasr_vllm.segmenter`), silence left out, and its
  transcript is the segments' texts joined (`fireredasr_vllm.recordings`).
- Every file's segments share one engine batch (continuous batching across files).
- Results are written in input order as soon as they and every earlier recording
  are finished, one flushed line (or one whole subtitle file) each; `--resume`
  keeps what an interrupted run wrote, so a resumed run ends with the same output.
- A file that cannot be read or transcribed is reported on stderr and skipped;
  the rest of the batch goes on. Exit status: 0 when the output holds every
  input recording, 3 when it holds some, 1 when it holds none or on a fatal error
  (2 is a command-line error).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from fireredasr_converter.repo_format import DTYPE_NAMES
from fireredasr_converter.safe_io import StagedFile, sigterm_as_interrupt

from .api import FireRedAsr, FrontEnd
from .audio_input import Utterance, collect_utterances, duration_seconds
from .decoders import ReferenceBackend, VllmBackend  # noqa: F401  (importable from here, as before)
from .decoding import AED_RECIPE, ORIGINAL_RECIPE, AedDecoding, Decoding
from .engine import create_engine, engine_settings, quiet_vllm_logs, shutdown_engine
from .errors import InputError, TranscriptionError, TranscriptionFailed
from .job import Job, JobError
from .recordings import QUEUED_SEGMENTS, SEGMENT_MODES, Finished, decode_recordings  # noqa: F401
from .segmenter import PLANNING_SECONDS
from .transcript_formats import (
    FORMATS,
    SUBTITLE_FORMATS,
    LineOutput,
    RecordingTranscript,
    SubtitleFolder,
    foreign_content,
)

EXIT_COMPLETE = 0
EXIT_NOTHING = 1
# 2 is click's exit status for command-line errors.
EXIT_PARTIAL = 3


class OrderedWriter:
    """Writes recordings in input order as soon as every earlier one is settled.

    A recording whose transcript cannot be written (a full disk, a name the
    filesystem refuses) goes to `on_write_error`; the run goes on with the others.
    """

    def __init__(
        self,
        output,
        indices: Iterable[int],
        on_write_error: Callable[[RecordingTranscript, OSError], None] = lambda transcript, error: None,
    ):
        self.output = output
        self._order = deque(indices)
        self._settled: dict[int, RecordingTranscript | None] = {}
        self._on_write_error = on_write_error
        self.written = 0

    def settle(self, index: int, transcript: RecordingTranscript | None) -> None:
        """`transcript` is None for a skipped recording."""
        self._settled[index] = transcript
        while self._order and self._order[0] in self._settled:
            transcript = self._settled.pop(self._order.popleft())
            if transcript is None:
                continue
            try:
                self.output.write(transcript)
            except OSError as error:
                self._on_write_error(transcript, error)
                continue
            self.written += 1

    @property
    def waiting(self) -> int:
        """Transcribed recordings not written yet: an earlier recording is still unsettled."""
        return sum(transcript is not None for transcript in self._settled.values())


# --- progress -----------------------------------------------------------------


class Progress:
    """Audio seconds done / total and the real-time factor on stderr: in place on a
    terminal, a line every 10 s otherwise."""

    def __init__(self, files: int, audio_seconds: float, enabled: bool):
        self.files = files
        self.total_seconds = audio_seconds
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
        return f"{self.done / elapsed:.2f} files/s, RTF {rtf:.4f}"

    def audio(self, seconds: float) -> None:
        self.audio_seconds += seconds
        self._show()

    def file(self, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self._show()

    def _show(self) -> None:
        now = time.monotonic()
        finished = self.done + self.failed == self.files
        if not self.enabled or not (finished or now - self._last >= (0.2 if self._interactive else 10.0)):
            return
        self._last = now
        line = (
            f"{self.done + self.failed}/{self.files} files ({self.failed} skipped), "
            f"{self.audio_seconds:.1f}/{self.total_seconds:.1f} s of audio, {self.rates()}"
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


# --- the run ------------------------------------------------------------------

DTYPES = ("auto", *DTYPE_NAMES.values())
ENGINES = ("vllm", "ray")


def _refuse_foreign(path: Path, format: str) -> None:
    """--overwrite replaces only what this tool wrote."""
    problem = foreign_content(path, format)
    if problem is not None:
        raise TranscriptionFailed(
            f"{path} {problem}, so it is not an output of fireredasr-transcribe and --overwrite leaves it alone; "
            "move it away yourself or choose another --output"
        )


def _open_output(job: Job, uttids: list[str]):
    """The output to write to, the recordings it already holds (with --resume) and the stream to
    close: a `StagedFile` when an existing output is replaced (renamed onto it at the end)."""
    format, output = job.format, job.output
    if format in SUBTITLE_FORMATS:
        if output.exists() and not output.is_dir():
            raise TranscriptionFailed(f"--output {output} is a file; --format {format} writes into a folder")
        output.mkdir(parents=True, exist_ok=True)
        folder = SubtitleFolder(format, output)
        present = folder.existing(uttids)
        if present and not (job.resume or job.overwrite):
            raise TranscriptionFailed(f"{output} already holds {len(present)} of these {format} files; pass "
                                      "--resume to keep them or --overwrite to write them again")  # fmt: skip
        if job.overwrite:
            for uttid in sorted(present):
                _refuse_foreign(folder.path(uttid), format)
        return folder, present if job.resume else set(), None
    if output is None:
        return LineOutput(format, sys.stdout), set(), None
    if not output.parent.is_dir():
        raise TranscriptionFailed(f"the folder of --output {output} does not exist; create it first")
    if output.is_dir():
        raise TranscriptionFailed(f"--output {output} is a folder; --format {format} writes one file")
    finished: set[str] = set()
    if output.exists() and output.stat().st_size > 0:
        if job.resume:
            finished = LineOutput.finished(output, format)
        elif not job.overwrite:
            raise TranscriptionFailed(f"{output} exists; pass --resume to continue it or --overwrite to start again")
        else:
            # Never emptied first: the old output stays until the new one replaces it at the end.
            _refuse_foreign(output, format)
            staged = StagedFile(output)
            return LineOutput(format, staged.stream), finished, staged
    # Nothing to lose: written in place, so a killed run leaves what --resume continues.
    stream = open(output, "a" if job.resume else "w", encoding="utf-8")
    return LineOutput(format, stream), finished, stream


class LocalTranscription:
    """One decoder in this process, through the API (`FireRedAsr.transcribe_many`): files read and
    segmented on a background thread, every file's segments in one continuous batch."""

    def __init__(self, job: Job, front_end: FrontEnd):
        self.job = job
        self.llm = None
        if job.backend == "vllm":
            # Built here with the API's settings, and handed to it: the engine is this run's to end.
            settings = engine_settings(job.decoding, dtype=front_end.dtype(job.dtype),
                                       tensor_parallel_size=job.tensor_parallel_size, seed=job.seed)  # fmt: skip
            self.llm = create_engine(job.model, **settings)
            try:
                self.asr = FireRedAsr(self.llm, decoding=job.decoding, batch_size=job.batch_size)
            except BaseException:
                shutdown_engine(self.llm)
                raise
        else:
            self.asr = FireRedAsr(job.model, decoding=job.decoding, dtype=job.dtype, batch_size=job.batch_size,
                                  backend="reference")  # fmt: skip

    def run(self, pending: list[tuple[int, Utterance]], on_finished, on_audio) -> None:
        uttids = {i: u.uttid for i, u in pending}
        results = self.asr.transcribe_many({i: u.path for i, u in pending}, segment=self.job.segment,
                                           ordered=False, on_audio=on_audio)  # fmt: skip
        try:
            for index, result in results:
                if isinstance(result, TranscriptionError):
                    on_finished(Finished(index, error=result))
                else:
                    on_finished(Finished(index, RecordingTranscript(uttids[index], result.info.duration, result.segments)))
        finally:
            # Interrupted: the reading thread stops and the requests leave the engine before it is shut down.
            results.close()

    def close(self) -> None:
        if self.llm is not None:
            shutdown_engine(self.llm)

    @staticmethod
    def load_note(seconds: float) -> str:
        return f"model load {seconds:.1f} s"


def run(utterances: list[Utterance], job: Job) -> int:
    """Transcribe `utterances` as `job` says, reporting on stderr; returns the exit status.

    Raises TranscriptionFailed when nothing can be done (model or output unusable).
    """
    if not utterances:
        raise TranscriptionFailed("no utterances to transcribe")
    sink, finished, stream = _open_output(job, [u.uttid for u in utterances])
    try:
        status = _transcribe(utterances, job, sink, finished)
    except BaseException:
        if isinstance(stream, StagedFile):
            stream.discard()  # the model or the run failed: the old output is kept as it was
        raise
    finally:
        if stream is not None and not isinstance(stream, StagedFile):
            stream.close()
    if isinstance(stream, StagedFile):
        if stream.stream.tell() > 0:
            stream.commit()
        else:
            stream.discard()
            click.echo(f"nothing was transcribed: {job.output} is left as it was", err=True)
    return status


def _transcribe(utterances: list[Utterance], job: Job, sink, finished: set[str]) -> int:
    pending = [(i, u) for i, u in enumerate(utterances) if u.uttid not in finished]
    already = len(utterances) - len(pending)
    if already:
        click.echo(f"resuming: {already} of {len(utterances)} recordings already in {job.output}", err=True)
    if not pending:
        click.echo("nothing to do", err=True)
        return EXIT_COMPLETE

    quiet_vllm_logs()
    front_end = FrontEnd.load(job.model)

    load_start = time.monotonic()
    if job.engine == "ray":
        from .ray_transcription import RayTranscription

        transcription = RayTranscription(job, front_end.dtype(job.dtype), front_end.segmenter_settings, front_end.validate)
    else:
        transcription = LocalTranscription(job, front_end)
    load_seconds = time.monotonic() - load_start

    def write_failed(transcript: RecordingTranscript, error: OSError) -> None:
        where = error.filename or job.output or "the output"
        progress.message(f"skipped {transcript.uttid}: cannot write its transcript to {where}: {error.strerror or error}")

    writer = OrderedWriter(sink, (i for i, _ in pending), write_failed)
    audio_total = sum(duration_seconds(u.path) or 0.0 for _, u in pending)
    progress = Progress(len(pending), audio_total, enabled=not job.quiet)
    uttids = {i: u.uttid for i, u in pending}

    def report(result: Finished) -> None:
        uttid = uttids[result.file]
        if result.error is not None:
            progress.message(f"skipped {uttid}: {result.error}")
        elif not result.transcript.segments:
            progress.message(f"no speech found in {uttid} ({result.transcript.duration:.1f} s): empty transcript")
        writer.settle(result.file, result.transcript)
        progress.file(result.error is None)

    interrupted = False
    try:
        transcription.run(pending, report, progress.audio)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        transcription.close()

    in_output = already + writer.written
    click.echo(
        f"transcribed {progress.done} recordings ({progress.failed} skipped): "
        f"{progress.audio_seconds / 3600:.4f} h of audio in {progress.elapsed:.1f} s "
        f"({progress.rates()}; {transcription.load_note(load_seconds)})",
        err=True,
    )
    where = str(job.output) if job.output is not None else "the output"
    # Written in input order: a transcript finished after an interruption waits for every earlier one.
    held = f" ({writer.waiting} more transcribed, not written: an earlier recording was unfinished)" if writer.waiting else ""
    click.echo(f"{in_output} of {len(utterances)} recordings are in {where}{held}", err=True)
    if interrupted:
        click.echo(f"interrupted: rerun with --resume to finish {where}", err=True)
        return 130
    return EXIT_COMPLETE if in_output == len(utterances) else EXIT_PARTIAL if in_output else EXIT_NOTHING


# --- the command --------------------------------------------------------------


def _decoding(recipe, beam_size, repetition_penalty, length_penalty, max_new_tokens, model) -> Decoding | AedDecoding:
    chosen = {"--beam-size": beam_size, "--repetition-penalty": repetition_penalty, "--length-penalty": length_penalty}
    if recipe == "original":
        given = [name for name, value in chosen.items() if value is not None]
        if given:
            raise click.UsageError(f"--recipe original sets {', '.join(chosen)} itself; drop {', '.join(given)}")
        # The model's own recipe: FireRedASR-AED's is another search than FireRedASR-LLM's (its repo's config says which).
        return dataclasses.replace(FrontEnd.load(model).original_recipe, max_new_tokens=max_new_tokens)
    return Decoding(
        beam_size=beam_size or 1,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        length_penalty=1.0 if length_penalty is None else length_penalty,
        max_new_tokens=max_new_tokens,
    )


MEMORY_NOTE = (
    f"Memory for audio stays bounded whatever a file's length: at most (--batch-size + {QUEUED_SEGMENTS}) "
    f"segments of at most 30 s, plus about {PLANNING_SECONDS / 60 + 1:.0f} min of voice-activity look-ahead, "
    "at 16 kHz float32 (64 kB/s): about 180 MB at the defaults. With --engine ray it stays bounded the same "
    "way: a recording's segments stream from its read task in chunks and spread over the replicas, each "
    "holding at most its batch and half again plus one chunk; no process holds a whole file."
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=MEMORY_NOTE)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--model", "-m", required=True, help="A converted repo (`fireredasr-convert SRC OUT`).")
@click.option("--wav-scp", type=click.Path(path_type=Path, dir_okay=False), help="Kaldi wav.scp: `uttid path` per line; relative paths are taken from the current directory.")
@click.option("--wav-dir", type=click.Path(path_type=Path, file_okay=False), help="A folder searched recursively for audio files.")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="text/jsonl: the file to write (default: stdout); srt/vtt: the folder for one file per recording.")
@click.option("--format", "-f", "format_", type=click.Choice(FORMATS), default="text", show_default=True,
              help="text: Kaldi `uttid<TAB>transcript`; jsonl: per recording uttid, duration, text and timed "
                   "segments; srt/vtt: subtitles with one cue per segment, OUTPUT/<uttid>.srt|.vtt.")
@click.option("--resume", is_flag=True, help="Keep the recordings OUTPUT already holds and transcribe only the others.")
@click.option("--overwrite", is_flag=True, help="Start OUTPUT afresh if it exists (srt/vtt: rewrite existing files).")
@click.option("--segment", type=click.Choice(SEGMENT_MODES), default="auto", show_default=True,
              help="auto: recordings up to the model's limit (30 s) are decoded whole, as the original does, longer "
                   "ones are cut by a voice activity detector (Silero VAD) into segments of at most 30 s, silence "
                   "left out; always: every recording goes through the detector (no speech: an empty transcript).")
@click.option("--backend", type=click.Choice(["vllm", "reference"]), default="vllm", show_default=True,
              help="vllm: the plugin in a vLLM engine; reference: plain PyTorch, one clip at a time.")
@click.option("--engine", type=click.Choice(ENGINES), default="vllm", show_default=True,
              help="vllm: one vLLM engine in this process; ray: --num-replicas engines on a Ray cluster, audio "
                   "read by Ray tasks (`pip install 'fireredasr-vllm[ray]'` on every node).")
@click.option("--num-replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine ray: vLLM engines, each on --tensor-parallel-size GPUs (one CPU without GPUs).")
@click.option("--ray-address", help="--engine ray: the cluster to join (`auto`: the one `ray start` runs here); "
                                    "default: a local cluster for this run.")
@click.option("--recipe", type=click.Choice(["original"]),
              help=f"original: the original's published decoding, --beam-size {ORIGINAL_RECIPE.beam_size} "
                   f"--repetition-penalty {ORIGINAL_RECIPE.repetition_penalty:g} --length-penalty "
                   f"{ORIGINAL_RECIPE.length_penalty:g} (transformers' beam search, reproduced exactly); for a "
                   f"FireRedASR-AED repo its own: the original's batch beam search, beam {AED_RECIPE.beam_size}, "
                   f"softmax smoothing {AED_RECIPE.softmax_smoothing:g}, length penalty {AED_RECIPE.length_penalty:g}, "
                   f"EOS penalty {AED_RECIPE.eos_penalty:g}.")
@click.option("--beam-size", type=click.IntRange(min=1),
              help="Beams; 1 is greedy decoding (FireRedASR-AED: 1 only, or --recipe original).  [default: 1]")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
              help="transformers' repetition penalty on the tokens each transcript has generated (not vLLM's, "
                   "which also penalises the prompt).  [default: 1.0, none]")
@click.option("--length-penalty", type=float,
              help="Beam search: a hypothesis scores its summed log-probabilities / length ** this.  [default: 1.0]")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Tokens to generate at most per segment [default: one per speech embedding (FireRedASR-AED: per "
                   "encoder frame), as the original].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="vLLM: requests kept in the engine at once (continuous batching, across files; beam search "
                   "counts one per beam).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto is the dtype the repo was converted to.")
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vLLM: GPUs to shard each engine over.")
@click.option("--seed", type=int, default=0, show_default=True, help="vLLM engine seed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line, only skipped recordings and the summary.")
def main(paths, model, wav_scp, wav_dir, output, format_, resume, overwrite, segment, backend, engine, num_replicas,
         ray_address, recipe, beam_size, repetition_penalty, length_penalty, max_new_tokens, batch_size, dtype,
         tensor_parallel_size, seed, quiet):
    """Transcribe audio files of any length with FireRedASR-LLM or FireRedASR-AED.

    Give the audio as --wav-scp, --wav-dir and/or PATHS. Exit status: 0 when the
    output holds every recording, 3 when it holds some (the others are reported as
    skipped), 1 when it holds none.
    """  # fmt: skip
    if wav_scp is None and wav_dir is None and not paths:
        raise click.UsageError("give the audio as --wav-scp FILE, --wav-dir DIR or paths")
    with sigterm_as_interrupt():
        _main(paths, model, wav_scp, wav_dir, output, format_, resume, overwrite, segment, backend, engine,
              num_replicas, ray_address, recipe, beam_size, repetition_penalty, length_penalty, max_new_tokens,
              batch_size, dtype, tensor_parallel_size, seed, quiet)  # fmt: skip


def _main(paths, model, wav_scp, wav_dir, output, format_, resume, overwrite, segment, backend, engine, num_replicas,
          ray_address, recipe, beam_size, repetition_penalty, length_penalty, max_new_tokens, batch_size, dtype,
          tensor_parallel_size, seed, quiet):
    """`main` with SIGTERM handled as Ctrl-C: the run stops, reports and keeps what it wrote."""  # fmt: skip
    try:
        try:
            job = Job(
                model=model, output=output, format=format_, resume=resume, overwrite=overwrite, segment=segment,
                backend=backend, engine=engine,
                decoding=_decoding(recipe, beam_size, repetition_penalty, length_penalty, max_new_tokens, model),
                batch_size=batch_size, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed,
                num_replicas=num_replicas, ray_address=ray_address, quiet=quiet,
            )  # fmt: skip
        except JobError as error:
            raise click.UsageError(str(error)) from None
        utterances = collect_utterances(wav_scp, wav_dir, paths)
        if not utterances:
            raise TranscriptionFailed(f"{wav_scp} lists no utterances")
        status = run(utterances, job)
    except (InputError, TranscriptionFailed) as error:
        click.echo(f"error: {error}", err=True)
        status = EXIT_NOTHING
    except KeyboardInterrupt:
        # Before transcription started (while the model loaded): nothing was written or replaced.
        click.echo("interrupted: nothing was written", err=True)
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    main()
