"""A long recording's transcript and the files it is written as: Kaldi text, JSON lines, SRT, WebVTT.

A recording is transcribed segment by segment (`fireredasr_vllm.segmenter`); its
transcript is the segments' texts joined the way the two languages are written:
no space between two Chinese characters, one space otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# CJK Unified Ideographs (and extension A), CJK punctuation, full-width forms: written without spaces.
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


@dataclass(frozen=True)
class TimedText:
    start: float  # seconds from the start of the recording
    end: float
    text: str


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


def kaldi_line(transcript: RecordingTranscript) -> str:
    return f"{transcript.uttid}\t{transcript.text}\n"


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
