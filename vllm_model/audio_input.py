"""Audio files in: the lists that name them and their samples as 16 kHz mono float32.

Holds the input side of `fireredasr-transcribe` and the offline helpers: Kaldi
`wav.scp` lists, folders and paths become `Utterance`s; a file becomes samples
either whole (`load_audio`) or block by block (`read_blocks`), so a recording
of hours is never held in memory at once. Does not segment or decode audio.

Audio is read with soundfile (libsndfile: WAV, FLAC, OGG, MP3) at any rate and
channel count, averaged to mono and resampled to 16 kHz with PyAV, the
resampler vLLM's own audio loader uses; block-wise resampling keeps the
resampler's state between blocks, so the samples equal a one-shot resample.
"""

from __future__ import annotations

import math
import os
import re
import struct
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fireredasr_converter import spec

from .errors import AudioError, InputError

# Extensions a folder input collects: the formats libsndfile reads.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# Source frames read at once by `read_blocks`.
BLOCK_SECONDS = 10.0
# An utterance id names its subtitle file (`<uttid>.srt`) and that file's temporary
# name: within the 255 bytes most filesystems allow a name, with room for both.
MAX_UTTID_BYTES = 200
# Unicode categories no id may hold: control and format characters (NUL, ESC, a BOM,
# bidi overrides), unpaired surrogates (undecodable file-name bytes), unassigned and
# private-use code points, line and paragraph separators.
_FORBIDDEN_ID_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
# Kaldi separates fields with ASCII blanks only.
_SCP_FIELDS = re.compile(r"[ \t]+")


@dataclass(frozen=True, eq=False)
class Waveform:
    """Audio held in memory: `samples` (1-D, floating point, in [-1, 1]) at `rate` Hz.

    Read like a file (`read_blocks`): averaged nowhere (it must be mono already),
    resampled to 16 kHz with the files' resampler. `name` stands for it in messages.
    """

    samples: np.ndarray
    rate: int
    name: str = "the audio array"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Utterance:
    uttid: str
    # A file, or audio already in memory (`FireRedAsr.transcribe_many`).
    path: str | Waveform


# --- lists of files -----------------------------------------------------------


def read_wav_scp(path: Path) -> list[Utterance]:
    """Kaldi `wav.scp`: `uttid path` per line; relative paths are relative to the working directory."""
    utterances = []
    try:
        # utf-8-sig: an editor's byte-order mark at the start is not part of the first id.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read --wav-scp {path}: {error}") from None
    # Lines end at "\n" only: splitlines() would also cut at U+2028, U+0085 and other separators.
    for line_number, line in enumerate(text.split("\n"), 1):
        fields = _SCP_FIELDS.split(line.strip(" \t\r"), maxsplit=1)
        if fields == [""]:
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
        utterances += [Utterance(p.stem, str(p)) for p in found]
    utterances += [Utterance(p.stem, str(p)) for p in paths]

    first_path: dict[str, str] = {}
    for utterance in utterances:
        problem = uttid_problem(utterance.uttid)
        if problem is not None:
            raise InputError(
                f"utterance id {_shown(utterance.uttid)} (from {_shown(utterance.path)}) {problem}; "
                "rename the file or give it a plain id in a wav.scp"
            )
        if any(c.isspace() for c in utterance.uttid):
            raise InputError(
                f"utterance id {utterance.uttid!r} (from {utterance.path}) contains whitespace, which a Kaldi "
                "text file cannot hold; rename the file or list it in a wav.scp"
            )
        if "/" in utterance.uttid or utterance.uttid in (".", ".."):
            raise InputError(
                f"utterance id {utterance.uttid!r} (from {utterance.path}) cannot name a subtitle file; "
                "use ids without '/'"
            )
        if utterance.uttid in first_path:
            raise InputError(
                f"utterance id {utterance.uttid!r} is used twice ({first_path[utterance.uttid]} and "
                f"{utterance.path}); ids must be unique: rename one file or list them in a wav.scp"
            )
        first_path[utterance.uttid] = utterance.path
    return utterances


def _shown(text: str) -> str:
    """`text` for a one-line message: escaped (no control characters), at most about 60 characters."""
    shown = ascii(text[:60])
    return shown if len(text) <= 60 else shown[:-1] + "..." + shown[-1]


def uttid_problem(uttid: str) -> str | None:
    """Why `uttid` cannot name a transcript line or a subtitle file; None if it can."""
    forbidden = next((c for c in uttid if unicodedata.category(c) in _FORBIDDEN_ID_CATEGORIES), None)
    if forbidden is not None:
        return f"contains the character U+{ord(forbidden):04X}, which an output file cannot hold"
    size = len(uttid.encode("utf-8"))
    if size > MAX_UTTID_BYTES:
        return f"is {size} bytes long; ids of at most {MAX_UTTID_BYTES} bytes can name a subtitle file"
    return None


# --- samples ------------------------------------------------------------------


def _open(path: str):
    import soundfile

    if path.rstrip().endswith("|"):
        raise AudioError("Kaldi command pipes are not supported; write the audio to a file and list that file")
    if os.path.isdir(path):
        raise AudioError(f"{path} is a folder, not an audio file; give the files in it (or the folder as --wav-dir)")
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise AudioError(f"{path} is not a regular file; give an audio file")
    try:
        return soundfile.SoundFile(path)
    except (soundfile.SoundFileError, OSError) as error:
        raise AudioError(f"unreadable audio: {error}") from None


def duration_seconds(path: str) -> float | None:
    """A file's length from its header, or None when the header cannot be read."""
    try:
        with _open(path) as file:
            return file.frames / file.samplerate
    except AudioError:
        return None


def declared_wav_frames(path: str) -> int | None:
    """Frames a RIFF WAV header's `data` chunk declares, or None for other files.

    libsndfile quietly reads a truncated WAV (a recording cut off while being
    written) up to where its data stops; this tells that the stream ended early.
    """
    with open(path, "rb") as file:
        header = file.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        block_align = None
        while True:
            chunk = file.read(8)
            if len(chunk) < 8:
                return None
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                fmt = file.read(size)
                block_align = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else None
                size = 0
            elif name == b"data":
                return size // block_align if block_align and size != 0xFFFFFFFF else None
            file.seek(size + (size & 1), os.SEEK_CUR)


class _Resampler:
    """PyAV's resampler fed block by block; its output equals resampling the whole at once."""

    def __init__(self, rate: int):
        import av

        self.rate = rate
        self.resampler = av.AudioResampler(format="fltp", layout="mono", rate=spec.SAMPLE_RATE)
        self.samples_in = self.samples_out = 0

    def _run(self, frame) -> np.ndarray:
        frames = self.resampler.resample(frame)
        return np.concatenate([f.to_ndarray()[0] for f in frames]) if frames else np.zeros(0, np.float32)

    def __call__(self, block: np.ndarray) -> np.ndarray:
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, dtype=np.float32)[None], format="fltp", layout="mono")
        frame.sample_rate = self.rate
        self.samples_in += len(block)
        out = self._run(frame)
        self.samples_out += len(out)
        return out

    def flush(self) -> np.ndarray:
        # Cut (or pad) to ceil(in * 16000 / rate) samples, the length vLLM's one-shot resampling gives.
        expected = math.ceil(self.samples_in * spec.SAMPLE_RATE / self.rate) - self.samples_out
        out = self._run(None)[: max(expected, 0)]
        return np.pad(out, (0, max(expected - len(out), 0))).astype(np.float32)


def read_blocks(path: str | Waveform, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """The file (or the audio in memory) as consecutive blocks of 16 kHz mono float32 samples in [-1, 1].

    Raises AudioError before the first block when the file cannot be opened or
    holds no samples, and while reading when its stream is corrupt or ends
    before its header says.
    """
    import soundfile

    if isinstance(path, Waveform):
        yield from _waveform_blocks(path, block_seconds)
        return
    with _open(path) as file:
        if file.frames == 0:
            raise AudioError(f"{path} holds no samples")
        resample = _Resampler(file.samplerate) if file.samplerate != spec.SAMPLE_RATE else None
        read = 0
        try:
            for block in file.blocks(max(1, int(block_seconds * file.samplerate)), dtype="float32", always_2d=True):
                read += len(block)
                # [frames, channels] -> mono, as vLLM's audio parser downmixes.
                mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
                # Checked on every block, not only on clips the model takes whole: a long
                # file of NaN would otherwise pass the voice detector as silence.
                if not np.isfinite(mono).all():
                    raise AudioError(
                        f"{path} holds NaN or infinite samples (from {(read - len(block)) / file.samplerate:.2f} s "
                        "on); repair or re-export the file"
                    )
                out = resample(mono) if resample else mono
                if len(out):
                    yield np.ascontiguousarray(out, dtype=np.float32)
        except (soundfile.SoundFileError, RuntimeError) as error:
            raise AudioError(f"{path}: the audio stream breaks off at {read / file.samplerate:.2f} s: {error}") from None
        if resample:
            tail = resample.flush()
            if len(tail):
                yield tail
    declared = declared_wav_frames(path)
    if declared is not None and declared > read:
        raise AudioError(
            f"{path}: the audio stream ends at {read / file.samplerate:.2f} s but its header declares "
            f"{declared / file.samplerate:.2f} s (a cut-off recording); repair or re-export the file"
        )


def load_audio(path: str) -> np.ndarray:
    """A whole file as 16 kHz mono float32 in [-1, 1], or AudioError naming the problem."""
    return np.concatenate(list(read_blocks(path)))


def _waveform_blocks(waveform: Waveform, block_seconds: float) -> Iterator[np.ndarray]:
    samples, rate = waveform.samples, waveform.rate
    if not isinstance(samples, np.ndarray) or samples.ndim != 1:
        raise AudioError(f"{waveform}: give mono samples as a 1-D numpy array, got {_shape_of(samples)}; downmix it first")
    if not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"{waveform}: give floating-point samples in [-1, 1], got {samples.dtype} (int16: divide by 32768)")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"{waveform}: the sampling rate must be a positive integer (Hz), got {rate!r}")
    if len(samples) == 0:
        raise AudioError(f"{waveform} holds no samples")
    step = max(1, int(block_seconds * rate))
    resample = _Resampler(int(rate)) if rate != spec.SAMPLE_RATE else None
    for start in range(0, len(samples), step):
        block = samples[start : start + step]
        if not np.isfinite(block).all():
            raise AudioError(f"{waveform} holds NaN or infinite samples (from {start / rate:.2f} s on)")
        out = resample(block) if resample else np.ascontiguousarray(block, dtype=np.float32)
        if len(out):
            yield np.ascontiguousarray(out, dtype=np.float32)
    if resample:
        tail = resample.flush()
        if len(tail):
            yield tail


def _shape_of(samples) -> str:
    shape = getattr(samples, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(samples).__name__
