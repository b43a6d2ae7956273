"""Long-recording transcripts as Kaldi text, JSON lines, SRT and WebVTT, checked with standard parsers."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
import srt as srt_parser
import webvtt

from fireredasr_vllm.transcript_formats import (
    RecordingTranscript,
    TimedText,
    join_texts,
    jsonl_line,
    kaldi_line,
    srt,
    vtt,
)

TRANSCRIPT = RecordingTranscript(
    uttid="meeting-01",
    duration=3725.5,
    segments=(
        TimedText(0.48, 2.85, "three seven one"),
        TimedText(5.63, 9.38, "三七一"),
        TimedText(12.0, 13.2, ""),  # nothing recognised
        TimedText(17.18, 18.88, "五八"),
        TimedText(3600.0, 3601.2346, "nine"),
    ),
)


@pytest.mark.parametrize(
    ("texts", "joined"),
    [
        (["三七一", "五八"], "三七一五八"),
        (["three seven", "one"], "three seven one"),
        (["三七一", "four"], "三七一 four"),
        (["four", "五八"], "four 五八"),
        (["  ", "", "三", " 七 "], "三七"),
        ([], ""),
    ],
)
def test_texts_join_without_spaces_only_between_chinese_characters(texts, joined):
    assert join_texts(texts) == joined


def test_kaldi_and_jsonl_hold_the_same_transcript():
    assert kaldi_line(TRANSCRIPT) == "meeting-01\tthree seven one 三七一五八 nine\n"
    record = json.loads(jsonl_line(TRANSCRIPT))
    assert record["text"] == TRANSCRIPT.text
    assert record["duration"] == 3725.5
    assert [(s["start"], s["end"], s["text"]) for s in record["segments"]] == [
        (0.48, 2.85, "three seven one"), (5.63, 9.38, "三七一"), (12.0, 13.2, ""), (17.18, 18.88, "五八"),
        (3600.0, 3601.235, "nine"),
    ]  # fmt: skip


def test_srt_parses_with_the_srt_package():
    cues = list(srt_parser.parse(srt(TRANSCRIPT)))
    assert [c.index for c in cues] == [1, 2, 3, 4]
    assert [c.content for c in cues] == ["three seven one", "三七一", "五八", "nine"]
    assert cues[0].start == timedelta(seconds=0.48) and cues[0].end == timedelta(seconds=2.85)
    assert cues[-1].start == timedelta(hours=1) and cues[-1].end == timedelta(hours=1, seconds=1.235)


def test_vtt_parses_with_webvtt():
    captions = webvtt.from_buffer(io.StringIO(vtt(TRANSCRIPT))).captions
    assert [c.text for c in captions] == ["three seven one", "三七一", "五八", "nine"]
    assert [c.start for c in captions] == ["00:00:00.480", "00:00:05.630", "00:00:17.180", "01:00:00.000"]
    assert captions[-1].end == "01:00:01.235"


def test_a_recording_without_speech_gives_empty_but_valid_files():
    silent = RecordingTranscript(uttid="silence", duration=20.0, segments=())
    assert kaldi_line(silent) == "silence\t\n"
    assert json.loads(jsonl_line(silent))["segments"] == []
    assert list(srt_parser.parse(srt(silent))) == []
    assert webvtt.from_buffer(io.StringIO(vtt(silent))).captions == []
