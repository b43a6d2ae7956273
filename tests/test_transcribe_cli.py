"""`fireredasr-transcribe` on the tiny converted fixture.

One run through the vLLM backend (the CLI's entry in this process, on the suite's
shared tiny engine; test_setup_script runs the console script in its own process)
over a wav.scp with good clips at several rates and channel counts, a corrupt file, a clip too
short to transcribe and a missing file. A second run resumes a copy of its output
cut in the middle of a line, through the reference backend in-process, and must
end with the very same file. The input and output handling runs on its own,
without a model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from tolerances import F32_EPS
from vllm_helpers import share_engines

from fireredasr_converter import spec
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_vllm.audio_input import InputError, collect_utterances, load_audio
from fireredasr_vllm.transcribe import EXIT_PARTIAL, main
from fireredasr_vllm.transcript_formats import kaldi_text

# uttid -> (file name, sampling rate, channels, seconds); soundfile picks the format from the extension.
GOOD_CLIPS = {
    "clip_16k": ("clip_16k.wav", 16000, 1, 1.0),
    "clip_flac": ("clip_flac.flac", 16000, 1, 2.5),
    "clip_stereo_44k": ("clip_stereo_44k.wav", 44100, 2, 1.5),
    "clip_8k": ("clip_8k.wav", 8000, 1, 3.2),
}
CORRUPT, TOO_SHORT, MISSING = "corrupt", "too_short", "missing"
# Good and bad mixed, so results must be written around the gaps in input order.
SCP_ORDER = ["clip_16k", CORRUPT, "clip_flac", TOO_SHORT, "clip_stereo_44k", MISSING, "clip_8k"]


@pytest.fixture(scope="module")
def wav_scp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    paths = {}
    for seed, (uttid, (name, rate, channels, seconds)) in enumerate(GOOD_CLIPS.items()):
        mono = synthetic_speech(int(seconds * rate), seed=seed)
        samples = np.stack([mono, 0.5 * mono], axis=1) if channels == 2 else mono
        sf.write(folder / name, samples, rate)
        paths[uttid] = folder / name
    paths[CORRUPT] = folder / "corrupt.wav"
    paths[CORRUPT].write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    paths[TOO_SHORT] = folder / "too_short.wav"
    sf.write(paths[TOO_SHORT], synthetic_speech(spec.min_samples_for_one_embedding() - 1), spec.SAMPLE_RATE)
    paths[MISSING] = folder / "missing.wav"
    scp = folder / "wav.scp"
    scp.write_text("".join(f"{uttid} {paths[uttid]}\n" for uttid in SCP_ORDER), encoding="utf-8")
    return scp


@pytest.fixture(scope="module")
def expected_text(reference, wav_scp):
    """The reference implementation's transcript of every good clip, read as the CLI reads it."""
    paths = dict(line.split(maxsplit=1) for line in wav_scp.read_text(encoding="utf-8").splitlines())
    return {
        uttid: kaldi_text(reference.transcribe([load_audio(paths[uttid])])[0].text)
        for uttid in SCP_ORDER
        if uttid in GOOD_CLIPS
    }


@pytest.fixture(scope="module")
def vllm_run(converted_fp32, wav_scp, tmp_path_factory, engines, tiny_llm):
    output = tmp_path_factory.mktemp("vllm-run") / "text"
    with share_engines(engines):  # the CLI's own settings: it gets the live tiny_llm engine
        result = CliRunner().invoke(main, ["--model", str(converted_fp32), "--wav-scp", str(wav_scp), "--output", str(output)])
    assert engines.engine is tiny_llm, "the CLI asked for other engine settings than create_engine's defaults"
    return result, output


@pytest.mark.vllm
def test_vllm_backend_transcribes_good_clips_and_reports_bad_ones(vllm_run, expected_text):
    completed, output = vllm_run
    assert completed.exit_code == EXIT_PARTIAL, completed.stderr[-3000:]
    lines = output.read_text(encoding="utf-8").splitlines()
    # In input order, only the good ones, each equal to the reference's transcript.
    assert [line.split("\t", 1)[0] for line in lines] == list(expected_text)
    assert dict(line.split("\t", 1) for line in lines) == expected_text

    skipped = {line.split(":", 1)[0] for line in completed.stderr.splitlines() if line.startswith("skipped ")}
    assert skipped == {f"skipped {uttid}" for uttid in (CORRUPT, TOO_SHORT, MISSING)}
    assert "audio is too short" in completed.stderr
    assert f"{len(GOOD_CLIPS)} of {len(SCP_ORDER)} recordings are in {output}" in completed.stderr
    assert "RTF" in completed.stderr


@pytest.mark.vllm
def test_resume_after_interruption_gives_the_uninterrupted_file(vllm_run, converted_fp32, wav_scp, tmp_path):
    _, complete_output = vllm_run
    data = complete_output.read_bytes()
    second_line_end = data.index(b"\n", data.index(b"\n") + 1)
    # Killed while writing the second line: one finished line and half of the next.
    interrupted = tmp_path / "text"
    interrupted.write_bytes(data[: second_line_end - 3])

    result = CliRunner().invoke(
        main,
        ["--model", str(converted_fp32), "--wav-scp", str(wav_scp), "--output", str(interrupted),
         "--resume", "--backend", "reference", "--quiet"],
    )  # fmt: skip

    assert result.exit_code == EXIT_PARTIAL, result.output
    assert f"resuming: 1 of {len(SCP_ORDER)} recordings already in" in result.output
    assert interrupted.read_bytes() == data


def test_existing_output_needs_resume_or_overwrite(converted_fp32, wav_scp, tmp_path):
    output = tmp_path / "text"
    output.write_text("clip_16k\tsomething\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["--model", str(converted_fp32), "--wav-scp", str(wav_scp), "-o", str(output)])
    assert result.exit_code == 1
    assert "pass --resume to continue it or --overwrite" in result.output
    assert output.read_text(encoding="utf-8") == "clip_16k\tsomething\n"


def test_usage_errors(converted_fp32, wav_scp):
    runner = CliRunner()
    no_audio = runner.invoke(main, ["--model", str(converted_fp32)])
    assert no_audio.exit_code == 2 and "--wav-scp FILE, --wav-dir DIR or paths" in no_audio.output
    resume_to_stdout = runner.invoke(main, ["--model", str(converted_fp32), "--wav-scp", str(wav_scp), "--resume"])
    assert resume_to_stdout.exit_code == 2 and "--resume needs --output" in resume_to_stdout.output


def test_inputs_from_scp_folder_and_paths(tmp_path):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    for path in (audio / "b.wav", audio / "sub" / "a.flac", audio / "notes.txt"):
        path.write_bytes(b"")
    scp = tmp_path / "wav.scp"
    scp.write_text("utt1 /data/with space/x.wav\n\nutt2 rel/y.wav\n", encoding="utf-8")

    utterances = collect_utterances(scp, audio, [tmp_path / "c.wav"])

    assert [(u.uttid, u.path) for u in utterances] == [
        ("utt1", "/data/with space/x.wav"),
        ("utt2", "rel/y.wav"),
        ("b", str(audio / "b.wav")),
        ("a", str(audio / "sub" / "a.flac")),
        ("c", str(tmp_path / "c.wav")),
    ]


@pytest.mark.parametrize(
    ("scp_text", "paths", "message"),
    [
        ("utt1 a.wav\nutt1 b.wav\n", [], "'utt1' is used twice"),
        ("", ["one/x.wav", "two/x.wav"], "'x' is used twice"),
        ("", ["my clip.wav"], "contains whitespace"),
        ("utt1\n", [], "has no audio path"),
    ],
)
def test_bad_inputs_are_refused_before_decoding(tmp_path, scp_text, paths, message):
    scp = tmp_path / "wav.scp"
    scp.write_text(scp_text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        collect_utterances(scp, None, [tmp_path / p for p in paths])


def test_audio_is_downmixed_and_resampled_to_16k_mono(tmp_path):
    seconds = 1.5
    mono = synthetic_speech(int(seconds * 44100), seed=3)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1), 44100, subtype="FLOAT")

    waveform = load_audio(str(path))

    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(len(waveform) - seconds * spec.SAMPLE_RATE) <= 1
    # The channel average of a 0.5-scaled copy is 0.75 x the left channel, resampled.
    left_only = tmp_path / "left.wav"
    sf.write(left_only, 0.75 * mono, 44100, subtype="FLOAT")
    # The float32 downmix (x + 0.5 x) / 2 and the file's 0.75 x differ by an ulp; libswresample's
    # FIR (default 32 taps per side, widened by the 44.1 -> 16 kHz ratio; gain sum|h| < 2)
    # carries that through and rounds its own sums of up to `taps` terms on each side.
    taps = 2 * 32 * math.ceil(44100 / spec.SAMPLE_RATE)
    scale = 0.75 * np.abs(mono).max()
    np.testing.assert_allclose(waveform, load_audio(str(left_only)), rtol=0, atol=(2 * taps + 1) * F32_EPS * 2 * scale)


# --- the original's decoding recipe ----------------------------------------------


def _demo_wav_scp(folder, count: int = 12):
    from fireredasr_vllm import demo

    scp = folder / "wav.scp"
    scp.write_text("".join(f"{uttid} {path}\n" for uttid, path, _ in demo.heldout_clips()[:count]), encoding="utf-8")
    return scp


def test_recipe_original_is_a_shorthand_that_takes_no_overrides(demo_fp32, demo_reference, tmp_path):
    scp = _demo_wav_scp(tmp_path, count=3)
    mixed = CliRunner().invoke(main, ["-m", str(demo_fp32), "--wav-scp", str(scp), "--recipe", "original",
                                      "--beam-size", "4"])  # fmt: skip
    assert mixed.exit_code == 2 and "drop --beam-size" in mixed.output

    output = tmp_path / "text"
    result = CliRunner().invoke(main, ["-m", str(demo_fp32), "--wav-scp", str(scp), "-o", str(output), "-q",
                                       "--backend", "reference", "--recipe", "original"])  # fmt: skip
    assert result.exit_code == 0, result.output
    paths = dict(line.split(maxsplit=1) for line in scp.read_text(encoding="utf-8").splitlines())
    expected = {
        uttid: kaldi_text(demo_reference.transcribe([load_audio(path)], num_beams=3, repetition_penalty=3.0,
                                               length_penalty=1.0)[0].text)  # fmt: skip
        for uttid, path in paths.items()
    }
    assert dict(line.split("\t", 1) for line in output.read_text(encoding="utf-8").splitlines()) == expected


@pytest.mark.vllm
def test_vllm_recipe_gives_the_reference_transcripts(demo_fp32, tmp_path, recipe_llm, shared_engines):
    # Both backends through the CLI's Python entry; the vLLM one on the suite's engine with the
    # penalty processor, the one the CLI asks create_engine for (same model and settings).
    scp = _demo_wav_scp(tmp_path)
    outputs = {}
    for backend in ("reference", "vllm"):
        outputs[backend] = tmp_path / f"{backend}.text"
        result = CliRunner().invoke(main, ["-m", str(demo_fp32), "--wav-scp", str(scp), "-o", str(outputs[backend]),
                                           "--backend", backend, "--recipe", "original", "-q"])  # fmt: skip
        assert result.exit_code == 0, result.output[-3000:]
    assert outputs["vllm"].read_text(encoding="utf-8") == outputs["reference"].read_text(encoding="utf-8")
    assert len(outputs["vllm"].read_text(encoding="utf-8").splitlines()) == 12


def test_transcripts_held_back_by_an_earlier_recording_are_counted_and_the_progress_line_sums_the_segments_audio(capsys):
    """After Ctrl-C the summary says how many transcribed recordings wait for an earlier one (the
    output keeps input order); the progress line adds up the audio reported segment by segment
    (either engine reports it per segment)."""
    from fireredasr_vllm.transcribe import OrderedWriter, Progress

    written = []
    writer = OrderedWriter(type("Sink", (), {"write": lambda self, t: written.append(t)})(), [0, 1, 2])
    writer.settle(2, "third")
    writer.settle(1, None)  # skipped: nothing to write, nothing waiting
    assert (writer.written, writer.waiting) == (0, 1)
    writer.settle(0, "first")
    assert (written, writer.written, writer.waiting) == (["first", "third"], 2, 0)

    progress = Progress(files=1, audio_seconds=5.0, enabled=True)
    progress.audio(2.0)
    progress.audio(3.0)
    progress.file(True)
    assert capsys.readouterr().err.startswith("1/1 files (0 skipped), 5.0/5.0 s of audio")
