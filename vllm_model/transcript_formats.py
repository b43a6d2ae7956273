"""A recording's transcript and the outputs it is written to: Kaldi text, JSON lines, SRT, WebVTT.

A clip's `Transcript` is what a decoder gives back. A recording is transcribed segment by segment (`fireredasr_vllm.segmenter`); its
transcript is the segments' texts joined the way the two languages are written:
no space between two Chinese characters, one space otherwise. `text` and
`jsonl` are one line per recording in one file (or stdout); `srt` and `vtt` are
one subtitle file per recording in a folder. Every output knows which
recordings it already holds, for `--resume`, and whether a file is one this
tool wrote, for `--overwrite` (`foreign_content`). Does not decide what to transcribe.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fireredasr_converter.safe_io import UnsafeInput, parse_json, temporary_prefix, write_atomically

# CJK Unified Ideographs (and extension A), CJK punctuation, full-width forms: written without spaces.
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


@dataclass(frozen=True)
class Transcript:
    """One clip's transcript, as a decoder (the engine's or the reference's) gives it back."""

    text: str
    # Generated ids, including <|im_end|> when decoding stopped on it.
    token_ids: list[int]


@dataclass(frozen=True)
class TimedText:
    """One segment's transcript: its span in seconds from the start of the recording, its text
    and the ids the model generated for it (with `<|im_end|>` when decoding stopped on it)."""

    start: float
    end: float
    text: str
    # Not written by any output format; empty where they were not kept (a Ray run's rows).
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RecordingTranscript:
    uttid: str
    duration: float  # seconds
    segments: tuple[TimedText, ...]

    @property
    def text(self) -> str:
        return join_texts([s.text for s in self.segments])


def join_texts(texts: list[str]) -> str:
    """Segment texts as one transcript: no space between two CJK characters, one space otherwise."""
    joined = ""
    for text in (t.strip() for t in texts):
        if not text:
            continue
        if joined and not (_CJK.fullmatch(joined[-1]) and _CJK.fullmatch(text[0])):
            joined += " "
        joined += text
    return joined


def kaldi_text(text: str) -> str:
    """A transcript as one Kaldi `text` field: whitespace runs (newlines included) become one space."""
    return " ".join(text.split())


def kaldi_line(transcript: RecordingTranscript) -> str:
    return f"{transcript.uttid}\t{kaldi_text(transcript.text)}\n"


def jsonl_line(transcript: RecordingTranscript) -> str:
    record = {
        "uttid": transcript.uttid,
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
        "segments": [{"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text} for s in transcript.segments],
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


def _timestamp(seconds: float, separator: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, milliseconds = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{separator}{milliseconds:03d}"


def _cues(transcript: RecordingTranscript) -> list[TimedText]:
    # A cue without text is not a subtitle: segments the model found nothing in are left out.
    return [s for s in transcript.segments if s.text.strip()]


def srt(transcript: RecordingTranscript) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    blocks = [
        f"{number}\n{_timestamp(cue.start, ',')} --> {_timestamp(cue.end, ',')}\n{cue.text.strip()}\n"
        for number, cue in enumerate(_cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def vtt(transcript: RecordingTranscript) -> str:
    """WebVTT: the `WEBVTT` header, then cues with `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    blocks = [
        f"{_timestamp(cue.start, '.')} --> {_timestamp(cue.end, '.')}\n{cue.text.strip()}\n"
        for cue in _cues(transcript)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


# --- outputs --------------------------------------------------------------------

LINE_FORMATS = {"text": kaldi_line, "jsonl": jsonl_line}
SUBTITLE_FORMATS = {"srt": srt, "vtt": vtt}
FORMATS = (*LINE_FORMATS, *SUBTITLE_FORMATS)


def _uttid_of_line(line: str, format: str) -> str | None:
    """The id a complete output line is for; None for a line no run of this tool writes."""
    if format == "jsonl":
        try:
            record = parse_json(line)
        except UnsafeInput:
            return None
        uttid = record.get("uttid") if isinstance(record, dict) else None
        return uttid if isinstance(uttid, str) and isinstance(record.get("text"), str) else None
    uttid, tab, _ = line.partition("\t")
    return uttid if tab and uttid and not any(c.isspace() for c in uttid) else None


def _complete_lines(data: bytes) -> list[str]:
    # Lines end at "\n" only: a transcript may hold U+2028 or U+0085, which splitlines() would cut at.
    return data.decode("utf-8", errors="replace").split("\n")[:-1]


def foreign_content(path: Path, format: str) -> str | None:
    """What shows that `path` is not a `format` output of this tool; None if it may be one.

    `--overwrite` replaces only files this tool could have written: a folder's
    notes or someone's subtitles under the same name are refused, not lost.
    """
    with open(path, "rb") as file:
        data = file.read()
    if format in LINE_FORMATS:
        # An unfinished last line is what a killed run leaves: only complete lines are judged.
        lines = _complete_lines(data)
        if data and not lines:
            return "holds no complete transcript line"
        for number, line in enumerate(lines, 1):
            if line and _uttid_of_line(line, format) is None:
                return f"line {number} is not a {format} transcript line"
        return None
    text = data.decode("utf-8", errors="replace")
    if format == "vtt" and not text.startswith("WEBVTT"):
        return "does not start with WEBVTT"
    if format == "srt" and text and not (text.startswith("1\n") and " --> " in text):
        return "is not a SubRip file"
    return None


class LineOutput:
    """`text` or `jsonl`: one flushed line per recording, to a file or a stream."""

    def __init__(self, format: str, stream: TextIO):
        self.render = LINE_FORMATS[format]
        self.stream = stream

    def write(self, transcript: RecordingTranscript) -> None:
        self.stream.write(self.render(transcript))
        self.stream.flush()

    @staticmethod
    def finished(path: Path, format: str) -> set[str]:
        """Recordings an earlier run wrote to `path`. An unfinished last line (the run was
        killed while writing it) is cut off the file, so appending continues cleanly."""
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(path, "r+b") as file:
                file.truncate(len(complete))
        return {uttid for line in _complete_lines(complete) if (uttid := _uttid_of_line(line, format)) is not None}


class SubtitleFolder:
    """`srt` or `vtt`: one file per recording, `FOLDER/<uttid>.<format>`, each written whole
    (to a unique temporary name, then renamed) so a file that exists is complete."""

    def __init__(self, format: str, folder: Path):
        self.render = SUBTITLE_FORMATS[format]
        self.format = format
        self.folder = folder

    def path(self, uttid: str) -> Path:
        return self.folder / f"{uttid}.{self.format}"

    def write(self, transcript: RecordingTranscript) -> None:
        write_atomically(self.path(transcript.uttid), self.render(transcript))

    def existing(self, uttids: Iterable[str]) -> set[str]:
        """Which of `uttids` already have their file.

        Leftovers of a killed run's writes for these ids (their temporary names,
        `write_atomically`'s) are removed; no other file is touched.
        """
        uttids = list(uttids)
        for uttid in uttids:
            pattern = glob.escape(temporary_prefix(self.path(uttid).name)) + "*.partial"
            for leftover in self.folder.glob(pattern):
                if leftover.is_symlink() or leftover.is_file():
                    leftover.unlink()
        return {uttid for uttid in uttids if self.path(uttid).is_file()}
