"""Recordings of any length through `fireredasr-transcribe`, with the shipped demo model.

A three-minute recording of real speech pieces (clean espeak-ng digit strings
between silences and noise), a 40 s stereo 44.1 kHz FLAC, a short clip, a long
silence and broken files go through one wav.scp. The reference backend runs
in-process for every output format; one vLLM run (the CLI's Python entry on the
suite's shared demo engine) must give the reference's JSON lines byte for byte.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import srt
import webvtt
from click.testing import CliRunner
from conftest import CLEAN_SPEECH, speech_recording

from fireredasr_converter import spec
from fireredasr_vllm.audio_input import load_audio
from fireredasr_vllm.scoring import read_kaldi_text, score
from fireredasr_vllm.segmenter import SegmenterSettings, segment
from fireredasr_vllm.transcribe import EXIT_PARTIAL, main
from fireredasr_vllm.transcript_formats import join_texts, kaldi_text

GOOD = ["long", "short", "silence", "long_44k"]
BROKEN = {
    "corrupt": "unreadable audio",
    "broken_flac": "the audio stream breaks off at",
    "cut_off_wav": "but its header declares",
    "empty": "unreadable audio",
}
SCP_ORDER = ["long", "corrupt", "short", "silence", "broken_flac", "long_44k", "cut_off_wav", "empty"]

# Times are written rounded to the millisecond (half of it at most), and seconds up to
# hours carry float64 rounding far below 1e-9 s.
MILLISECOND_ROUNDING = 5e-4 + 1e-9


@pytest.fixture(scope="session")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recordings")
    paths = {uttid: folder / f"{uttid}.wav" for uttid in SCP_ORDER}
    long, _, _ = speech_recording(180.0, seed=1)
    sf.write(paths["long"], long, spec.SAMPLE_RATE, subtype="FLOAT")
    sf.write(paths["short"], load_audio(str(CLEAN_SPEECH / "clean00004-en.wav")), spec.SAMPLE_RATE, subtype="FLOAT")
    sf.write(paths["silence"], np.zeros(45 * spec.SAMPLE_RATE, dtype=np.float32), spec.SAMPLE_RATE)
    paths["corrupt"].write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    paths["empty"].write_bytes(b"")

    other, _, _ = speech_recording(40.0, seed=2)
    stereo = np.stack([other, 0.5 * other], axis=1)
    paths["long_44k"] = folder / "long_44k.flac"
    sf.write(paths["long_44k"], _resample(stereo, spec.SAMPLE_RATE, 44100), 44100)
    # A FLAC stream and a WAV cut off in the middle (a copy interrupted, a recorder killed).
    paths["broken_flac"] = folder / "broken_flac.flac"
    sf.write(paths["broken_flac"], other, spec.SAMPLE_RATE)
    paths["broken_flac"].write_bytes(paths["broken_flac"].read_bytes()[: paths["broken_flac"].stat().st_size // 2])
    sf.write(paths["cut_off_wav"], other, spec.SAMPLE_RATE, subtype="PCM_16")
    paths["cut_off_wav"].write_bytes(paths["cut_off_wav"].read_bytes()[: paths["cut_off_wav"].stat().st_size // 2])

    scp = folder / "wav.scp"
    scp.write_text("".join(f"{uttid} {paths[uttid]}\n" for uttid in SCP_ORDER), encoding="utf-8")
    return scp, paths


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    positions = np.arange(int(len(samples) * target / rate)) * rate / target
    return np.stack([np.interp(positions, np.arange(len(samples)), channel) for channel in samples.T], axis=1)


# Every clip the reference backend decoded in this module's CLI runs: (samples, decoding) -> result.
DECODED = {}


def run(model, scp, output, *extra):
    """The CLI with the reference backend, each distinct clip decoded once (DECODED).

    The format, resume and refusal tests need decoded results, not more runs of the
    model: the JSON lines run decodes every segment (~220 s of audio, one clip at a
    time); the text, SRT and VTT runs and the resumes get the very results it decoded.
    """
    from fireredasr_vllm.transcribe import ReferenceBackend

    decode = ReferenceBackend.transcribe

    def transcribe(self, clips, decoding, *, batch_size):
        for key, waveform in clips:
            clip = (np.ascontiguousarray(waveform).tobytes(), repr(decoding))
            if clip not in DECODED:
                ((_, DECODED[clip]),) = decode(self, [(key, waveform)], decoding, batch_size=batch_size)
            yield key, DECODED[clip]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReferenceBackend, "transcribe", transcribe)
        return CliRunner().invoke(
            main, ["-m", str(model), "--wav-scp", str(scp), "-o", str(output), "--backend", "reference", "-q", *extra]
        )


# Session scope: conftest runs the vLLM test below with the other tests on the shared demo
# engine, after this module's others; these would otherwise be made again for it.
@pytest.fixture(scope="session")
def reference_outputs(demo_fp32, recordings, tmp_path_factory):
    scp, _ = recordings
    folder = tmp_path_factory.mktemp("outputs")
    results = {}
    for format in ("jsonl", "text", "srt", "vtt"):
        output = folder / (format if format in ("srt", "vtt") else f"out.{format}")
        results[format] = (run(demo_fp32, scp, output, "--format", format), output)
    return results


def records(path) -> dict[str, dict]:
    return {record["uttid"]: record for record in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_good_recordings_are_written_in_order_and_broken_ones_reported(reference_outputs):
    result, output = reference_outputs["jsonl"]
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert list(records(output)) == GOOD
    for uttid, message in BROKEN.items():
        line = next(line for line in result.output.splitlines() if line.startswith(f"skipped {uttid}:"))
        assert message in line
    assert "no speech found in silence (45.0 s): empty transcript" in result.output
    assert f"{len(GOOD)} of {len(SCP_ORDER)} recordings are in" in result.output


def test_segments_respect_the_limits_and_match_the_segmenter(reference_outputs, recordings):
    _, paths = recordings
    transcripts = records(reference_outputs["jsonl"][1])
    settings = SegmenterSettings()
    for uttid in ("long", "long_44k"):
        audio = load_audio(str(paths[uttid]))
        planned = [seg for seg, _ in segment(audio, settings)]
        got = transcripts[uttid]["segments"]
        assert len(got) == len(planned) > 3
        for record, seg in zip(got, planned):
            # JSON lines hold times rounded to the millisecond: within 0.5 ms, plus float64's last bit.
            assert record["start"] == pytest.approx(seg.start_seconds, abs=MILLISECOND_ROUNDING)
            assert record["end"] == pytest.approx(seg.end_seconds, abs=MILLISECOND_ROUNDING)
            assert spec.min_samples_for_one_embedding() <= seg.num_samples <= settings.max_seconds * spec.SAMPLE_RATE
        assert transcripts[uttid]["duration"] == pytest.approx(len(audio) / spec.SAMPLE_RATE, abs=MILLISECOND_ROUNDING)
        assert transcripts[uttid]["text"] == join_texts([r["text"] for r in got])
    # A clip within the model's limit is decoded whole, as the original does.
    short = transcripts["short"]
    assert [(s["start"], s["end"]) for s in short["segments"]] == [(0.0, short["duration"])]
    assert transcripts["silence"]["segments"] == [] and transcripts["silence"]["text"] == ""


def test_each_segment_reads_as_its_samples_transcribed_alone(reference_outputs, recordings, demo_reference):
    _, paths = recordings
    reference = demo_reference
    transcripts = records(reference_outputs["jsonl"][1])
    audio = load_audio(str(paths["long"]))
    segments = list(segment(audio))
    alone = reference.transcribe([samples for _, samples in segments])
    assert [r["text"] for r in transcripts["long"]["segments"]] == [r.text for r in alone]


def test_segments_holding_one_reading_are_recognised(reference_outputs):
    # The demo model was trained on single digit strings: segments holding one are its home ground.
    _, spans, names = speech_recording(180.0, seed=1)
    texts = read_kaldi_text(CLEAN_SPEECH / "text")
    references, hypotheses = {}, {}
    for number, record in enumerate(records(reference_outputs["jsonl"][1])["long"]["segments"]):
        start, end = record["start"] * spec.SAMPLE_RATE, record["end"] * spec.SAMPLE_RATE
        held = [name for (a, b), name in zip(spans, names) if a < end and start < b]
        if len(held) == 1:
            references[str(number)], hypotheses[str(number)] = texts[held[0]], record["text"]
    assert len(references) >= 10
    assert score(references, hypotheses).total.error_rate < 10.0


def test_text_srt_and_vtt_agree_with_the_json_lines(reference_outputs):
    transcripts = records(reference_outputs["jsonl"][1])
    text_result, text_file = reference_outputs["text"]
    assert text_result.exit_code == EXIT_PARTIAL, text_result.output
    assert text_file.read_text(encoding="utf-8") == "".join(
        f"{uttid}\t{kaldi_text(transcripts[uttid]['text'])}\n" for uttid in GOOD
    )
    for format in ("srt", "vtt"):
        result, folder = reference_outputs[format]
        assert result.exit_code == EXIT_PARTIAL, result.output
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{uttid}.{format}" for uttid in GOOD)
        for uttid in GOOD:
            path = folder / f"{uttid}.{format}"
            if format == "srt":
                cues = [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in srt.parse(path.read_text())]
            else:
                cues = [(c.start_in_seconds + c.start_time.milliseconds / 1000, c.end_in_seconds
                         + c.end_time.milliseconds / 1000, c.text) for c in webvtt.read(str(path))]  # fmt: skip
            expected = [(s["start"], s["end"], s["text"]) for s in transcripts[uttid]["segments"] if s["text"]]
            assert len(cues) == len(expected)
            for (start, end, text), (want_start, want_end, want_text) in zip(cues, expected):
                # Subtitles and JSON lines each round the same times to the millisecond: 1 ms apart at most.
                assert (start, end, text) == (pytest.approx(want_start, abs=2 * MILLISECOND_ROUNDING),
                                              pytest.approx(want_end, abs=2 * MILLISECOND_ROUNDING), want_text)  # fmt: skip


def test_resume_finishes_an_interrupted_jsonl_and_subtitle_folder(reference_outputs, recordings, demo_fp32, tmp_path):
    scp, _ = recordings
    _, complete = reference_outputs["jsonl"]
    data = complete.read_bytes()
    interrupted = tmp_path / "out.jsonl"
    interrupted.write_bytes(data[: data.index(b"\n") + 40])  # the first recording and part of the second
    result = run(demo_fp32, scp, interrupted, "--format", "jsonl", "--resume")
    assert "resuming: 1 of" in result.output
    assert interrupted.read_bytes() == data

    _, full_folder = reference_outputs["srt"]
    folder = tmp_path / "srt"
    folder.mkdir()
    (folder / "long.srt").write_bytes((full_folder / "long.srt").read_bytes())
    (folder / ".short.srt.q3x7k2m9.partial").write_text("1\n00:00:00,000 --> 00:00:01")  # killed while writing
    result = run(demo_fp32, scp, folder, "--format", "srt", "--resume")
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {p.name: p.read_bytes() for p in full_folder.iterdir()}


def test_subtitles_need_a_folder_and_existing_files_need_resume_or_overwrite(reference_outputs, recordings, demo_fp32):
    scp, _ = recordings
    _, folder = reference_outputs["vtt"]
    again = run(demo_fp32, scp, folder, "--format", "vtt")
    assert again.exit_code == 1 and "pass --resume to keep them or --overwrite" in again.output
    to_stdout = CliRunner().invoke(main, ["-m", str(demo_fp32), "--wav-scp", str(scp), "--format", "srt"])
    assert to_stdout.exit_code == 2 and "give the folder as --output DIR" in to_stdout.output


@pytest.mark.vllm
def test_vllm_gives_the_reference_json_lines(demo_fp32, recordings, reference_outputs, tmp_path, demo_llm,
                                             shared_engines):  # fmt: skip
    # The CLI's Python entry on the suite's demo engine (the settings the CLI asks for by default).
    scp, _ = recordings
    output = tmp_path / "vllm.jsonl"
    result = CliRunner().invoke(main, ["-m", str(demo_fp32), "--wav-scp", str(scp), "-o", str(output),
                                       "--format", "jsonl", "--batch-size", "8"])  # fmt: skip
    assert result.exit_code == EXIT_PARTIAL, result.output[-3000:]
    assert output.read_bytes() == reference_outputs["jsonl"][1].read_bytes()
    assert "s of audio" in result.output and "RTF" in result.output


def test_segment_always_sends_short_recordings_through_the_detector(demo_fp32, tmp_path):
    rng = np.random.default_rng(3)
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, (0.003 * rng.standard_normal(10 * spec.SAMPLE_RATE)).astype(np.float32), spec.SAMPLE_RATE)
    outputs = {}
    for mode in ("auto", "always"):
        outputs[mode] = tmp_path / f"{mode}.jsonl"
        result = CliRunner().invoke(main, ["-m", str(demo_fp32), str(quiet), "-o", str(outputs[mode]), "-q",
                                           "--backend", "reference", "-f", "jsonl", "--segment", mode])  # fmt: skip
        assert result.exit_code == 0, result.output
    # auto: a 10 s clip is decoded whole, as the original would; always: the detector finds no speech.
    assert records(outputs["auto"])["quiet"]["segments"] == [
        {"start": 0.0, "end": 10.0, "text": records(outputs["auto"])["quiet"]["text"]}
    ]
    assert records(outputs["always"])["quiet"] == {"uttid": "quiet", "duration": 10.0, "text": "", "segments": []}
    assert "no speech found in quiet" in result.output
