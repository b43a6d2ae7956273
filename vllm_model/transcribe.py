"""`fireredasr-transcribe`: the original recipe's `speech2text.py` workflow on vLLM, for audio of any length.

Audio files in (a Kaldi `wav.scp`, a folder, or paths), transcripts out: a Kaldi
`text` file (`uttid<TAB>transcript` per line), JSON lines with segment times,
or one SRT / WebVTT subtitle file per recording. Decoded by the vLLM plugin
(default: one engine in this process; `--engine ray`: replicas on a Ray
cluster, `fireredasr_vllm.ray_transcription`) or by the plain PyTorch
reference implementation.

`run(utterances, Job(...))` is the API: it transcribes, writes and reports, and
returns the exit status; `main` is the click command around it (options to a
`Job`, errors to exit statuses).

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
import functools
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from fireredasr_converter.errors import first_line
from fireredasr_converter.repo_format import DTYPE_NAMES
from fireredasr_converter.safe_io import StagedFile, sigterm_as_interrupt

from .audio_input import InputError, Utterance, collect_utterances, duration_seconds
from .decoding import GREEDY, ORIGINAL_RECIPE, Decoding
from .offline import (
    DEFAULT_MAX_MODEL_LEN,
    create_engine,
    shutdown_engine,
    transcriptions,
)
from .recordings import QUEUED_SEGMENTS, SEGMENT_MODES, Assembler, Finished, in_background, segment_events
from .segmenter import PLANNING_SECONDS, SegmenterSettings
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

    def count_audio(self, seconds: float) -> None:
        """Audio that arrives with a whole file (a Ray row): drawn with that file, not as a line without it."""
        self.audio_seconds += seconds

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


# --- backends -----------------------------------------------------------------

DTYPES = ("auto", *DTYPE_NAMES.values())
ENGINES = ("vllm", "ray")


def quiet_vllm_logs() -> None:
    """vLLM logs to stdout by default, where the transcripts may go; its engine
    processes inherit this. INFO is for serving; a batch job shows warnings only."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class VllmBackend:
    def __init__(self, model: str, *, dtype: str, decoding: Decoding, tensor_parallel_size: int, seed: int):
        # Room for the prompt, the longest clip and the requested number of new tokens.
        max_model_len = DEFAULT_MAX_MODEL_LEN + (decoding.max_new_tokens or 0)
        self.llm = create_engine(
            model,
            penalty_processor=decoding.needs_penalty_processor,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
        )

    def close(self) -> None:
        shutdown_engine(self.llm)

    def transcribe(self, clips, decoding, *, batch_size: int):
        # --batch-size counts requests; beam search keeps `beam_size` of them per clip.
        clips_in_flight = max(1, batch_size // decoding.beam_size)
        yield from transcriptions(self.llm, clips, decoding, max_in_flight=clips_in_flight)


class ReferenceBackend:
    def __init__(self, model: str, *, dtype: str):
        import torch

        from fireredasr_vllm.reference import ReferenceFireRedAsrLlm

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = ReferenceFireRedAsrLlm.from_pretrained(model, dtype=getattr(torch, dtype), device=device)

    def close(self) -> None:
        """Nothing to end: the model is freed with the object."""

    def transcribe(self, clips, decoding, *, batch_size: int):
        # The reference decodes one clip at a time with transformers' `generate`, as the original does.
        for key, waveform in clips:
            try:
                (result,) = self.model.transcribe(
                    [waveform],
                    max_new_tokens=decoding.max_new_tokens,
                    num_beams=decoding.beam_size,
                    repetition_penalty=decoding.repetition_penalty,
                    length_penalty=decoding.length_penalty,
                )
            except ValueError as error:
                yield key, error
                continue
            yield key, result


def decode_recordings(
    decoder,
    events: Iterable,
    uttids: dict[int, str],
    decoding: Decoding,
    batch_size: int,
    on_finished: Callable[[Finished], None],
    on_audio: Callable[[float], None] = lambda seconds: None,
) -> None:
    """Every file's segments (`recordings.segment_events`) through `decoder` in one
    continuous batch; each file goes to `on_finished` as soon as it is settled.

    The one decoding loop of the single engine and of every Ray replica."""
    assembler = Assembler(uttids, on_audio=on_audio)

    def settle() -> None:
        for finished_file in assembler.take_settled():
            on_finished(finished_file)

    def clips():
        for clip in assembler.clips(events):
            yield clip
            settle()
        settle()

    for key, outcome in decoder.transcribe(clips(), decoding, batch_size=batch_size):
        assembler.result(key, outcome)
        settle()
    settle()


# --- the run ------------------------------------------------------------------


class JobError(ValueError):
    """Options that do not go together (the command's usage errors)."""


class TranscriptionFailed(Exception):
    """Nothing can be transcribed (the model or the output cannot be opened): exit status 1."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What to transcribe into and how: the command's options (see `main --help`).

    `dtype` "auto" is the repo's dtype; `engine` "ray" runs `num_replicas` vLLM
    engines on the Ray cluster at `ray_address` (None: a local one).
    """

    model: str
    output: Path | None = None
    format: str = "text"
    resume: bool = False
    overwrite: bool = False
    segment: str = "auto"
    backend: str = "vllm"
    engine: str = "vllm"
    decoding: Decoding = GREEDY
    batch_size: int = 64
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    seed: int = 0
    num_replicas: int = 1
    ray_address: str | None = None
    quiet: bool = False

    def __post_init__(self):
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        if self.resume and self.output is None:
            raise JobError("--resume needs --output: the file or folder to continue")
        if self.resume and self.overwrite:
            raise JobError("--resume keeps OUTPUT and --overwrite replaces it: choose one")
        if self.format in SUBTITLE_FORMATS and self.output is None:
            raise JobError(f"--format {self.format} writes one file per recording: give the folder as --output DIR")
        if self.backend == "reference" and self.tensor_parallel_size > 1:
            raise JobError("--tensor-parallel-size applies to --backend vllm only")
        if self.backend == "reference" and self.engine == "ray":
            raise JobError("--engine ray runs vLLM engines: drop --backend reference")
        if self.engine != "ray" and (self.num_replicas != 1 or self.ray_address is not None):
            raise JobError("--num-replicas and --ray-address apply to --engine ray only")


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


def _front_end(model: str):
    """The repo's config and feature extractor: what checks a clip before it reaches an engine."""
    from fireredasr_converter.configuration import FireRedAsrLlmConfig, register_with_transformers
    from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor

    try:
        register_with_transformers()
        return FireRedAsrLlmConfig.from_pretrained(model), FireRedAsrFeatureExtractor.from_pretrained(model)
    except (OSError, ValueError, RecursionError) as error:
        # A repo's JSON is data from elsewhere: too deeply nested is refused like any other damage.
        reason = "a JSON file nests too deeply" if isinstance(error, RecursionError) else first_line(error) or type(error).__name__
        raise TranscriptionFailed(
            f"cannot load {model}: {reason}; pass a converted repo (`fireredasr-convert SRC OUT`)"
        ) from None


class LocalTranscription:
    """One decoder in this process; files read and segmented on a background thread."""

    def __init__(self, job: Job, dtype: str, settings: SegmenterSettings, validate):
        self.job, self.settings, self.validate = job, settings, validate
        if job.backend == "vllm":
            self.decoder = VllmBackend(job.model, dtype=dtype, decoding=job.decoding,
                                       tensor_parallel_size=job.tensor_parallel_size, seed=job.seed)  # fmt: skip
        else:
            self.decoder = ReferenceBackend(job.model, dtype=dtype)

    def run(self, pending: list[tuple[int, Utterance]], on_finished, on_audio) -> None:
        events = in_background(segment_events(pending, self.settings, self.job.segment, self.validate))
        try:
            uttids = {i: u.uttid for i, u in pending}
            decode_recordings(self.decoder, events, uttids, self.job.decoding, self.job.batch_size, on_finished, on_audio)
        finally:
            events.close()

    def close(self) -> None:
        self.decoder.close()

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
    config, extractor = _front_end(job.model)
    # The converted weights' dtype: vLLM's own "auto" would run fp32 weights in half precision.
    dtype = str(config.dtype or "float32").removeprefix("torch.") if job.dtype == "auto" else job.dtype
    settings = SegmenterSettings(max_seconds=extractor.max_audio_seconds)
    # A partial, not a closure: Ray ships it to the tasks that read the audio.
    validate = functools.partial(extractor.validate_waveform, downsample_rate=config.encoder_downsample_rate)

    load_start = time.monotonic()
    if job.engine == "ray":
        from .ray_transcription import RayTranscription

        transcription = RayTranscription(job, dtype, settings, validate)
    else:
        transcription = LocalTranscription(job, dtype, settings, validate)
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
        transcription.run(pending, report, progress.count_audio if job.engine == "ray" else progress.audio)
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


def _decoding(recipe, beam_size, repetition_penalty, length_penalty, max_new_tokens) -> Decoding:
    chosen = {"--beam-size": beam_size, "--repetition-penalty": repetition_penalty, "--length-penalty": length_penalty}
    if recipe == "original":
        given = [name for name, value in chosen.items() if value is not None]
        if given:
            raise click.UsageError(f"--recipe original sets {', '.join(chosen)} itself; drop {', '.join(given)}")
        return dataclasses.replace(ORIGINAL_RECIPE, max_new_tokens=max_new_tokens)
    return Decoding(
        beam_size=beam_size or 1,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        length_penalty=1.0 if length_penalty is None else length_penalty,
        max_new_tokens=max_new_tokens,
    )


MEMORY_NOTE = (
    f"Memory for audio stays bounded whatever a file's length: at most (--batch-size + {QUEUED_SEGMENTS}) "
    f"segments of at most 30 s, plus about {PLANNING_SECONDS / 60 + 1:.0f} min of voice-activity look-ahead, "
    "at 16 kHz float32 (64 kB/s): about 180 MB at the defaults. With --engine ray a recording's segments "
    "travel together: each file must fit in a Ray worker's memory (1 h is 230 MB)."
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
              help="original: the original's published decoding, --beam-size 3 --repetition-penalty 3.0 "
                   "--length-penalty 1.0 (transformers' beam search, reproduced exactly).")
@click.option("--beam-size", type=click.IntRange(min=1), help="Beams; 1 is greedy decoding.  [default: 1]")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
              help="transformers' repetition penalty on the tokens each transcript has generated (not vLLM's, "
                   "which also penalises the prompt).  [default: 1.0, none]")
@click.option("--length-penalty", type=float,
              help="Beam search: a hypothesis scores its summed log-probabilities / length ** this.  [default: 1.0]")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Tokens to generate at most per segment [default: one per speech embedding, as the original].")
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
    """Transcribe audio files of any length with FireRedASR-LLM.

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
        job = Job(
            model=model, output=output, format=format_, resume=resume, overwrite=overwrite, segment=segment,
            backend=backend, engine=engine,
            decoding=_decoding(recipe, beam_size, repetition_penalty, length_penalty, max_new_tokens),
            batch_size=batch_size, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed,
            num_replicas=num_replicas, ray_address=ray_address, quiet=quiet,
        )  # fmt: skip
    except JobError as error:
        raise click.UsageError(str(error)) from None
    try:
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
