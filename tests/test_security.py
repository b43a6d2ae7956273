"""The converter, the push and the transcriber under hostile and careless input (issue 23).

Each test is one reproduction of the review: an attacker who controls a release
folder, a wav.scp or an output folder, or a careless user. Every one must end in a
one-line refusal or a per-item report, with nothing published that is not the
release's, nothing deleted that the tool did not make, and the rest of a batch done.
No model is loaded: each refusal comes before one would be.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from conftest import load_release_pickle
from huggingface_hub.utils import filter_repo_objects

from fireredasr_converter import writer
from fireredasr_converter.cli import main as convert_main
from fireredasr_converter.errors import ConversionError
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.fixtures import TINY_SHAPES, build_release, synthetic_speech
from fireredasr_converter.hub import STALE_WEIGHT_PATTERNS, HubPushError, check_converted_repo, point_model_card_at
from fireredasr_converter.pipeline import convert
from fireredasr_converter.repo_format import INDEX_NAME
from fireredasr_converter.safe_io import sigterm_as_interrupt
from fireredasr_converter.writer import safetensors_header
from fireredasr_vllm.audio_input import AudioError, InputError, Utterance, collect_utterances, read_blocks
from fireredasr_vllm.recordings import FileFailed, segment_events
from fireredasr_vllm.segmenter import SegmenterSettings
from fireredasr_vllm.transcribe import EXIT_NOTHING, OrderedWriter
from fireredasr_vllm.transcribe import main as transcribe_main
from fireredasr_vllm.transcript_formats import (
    LineOutput,
    RecordingTranscript,
    SubtitleFolder,
    TimedText,
    jsonl_line,
)

SECRET = "hf_SecretTokenThatMustNeverBePublished0123"
# A real Qwen2 tokenizer.json nests 6 deep; this is what made json.loads raise RecursionError.
DEEP_JSON = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("pristine"), TINY_SHAPES, seed=7)


@pytest.fixture
def release(pristine, tmp_path):
    """A private copy of the tiny v1 release (relative Qwen2 symlink kept) to tamper with."""
    root = tmp_path / "release"
    shutil.copytree(pristine.model_dir.parent, root, symlinks=True)
    return root / pristine.model_dir.name


@pytest.fixture
def qwen2(release):
    return release.parent / "Qwen2-7B-Instruct"


@pytest.fixture
def secret(tmp_path):
    """A Hub token where `hf auth login` stores it, outside the release."""
    path = tmp_path / "home" / ".cache" / "huggingface" / "token"
    path.parent.mkdir(parents=True)
    path.write_text(SECRET)
    return path


@pytest.fixture
def repo(converted_fp32, tmp_path):
    """A private copy of the converted tiny repo, as if converted elsewhere and handed to the push."""
    return Path(shutil.copytree(converted_fp32, tmp_path / "converted"))


def tree_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(src, out, message, **kwargs) -> str:
    """convert() raises one line holding `message`, and writes nothing next to `out`."""
    before = sorted(out.parent.iterdir()) if out.parent.exists() else None
    with pytest.raises(ConversionError) as caught:
        convert(src, out, **kwargs)
    text = str(caught.value)
    assert message in text and "\n" not in text, text
    assert not out.exists()
    if before is not None:
        assert sorted(out.parent.iterdir()) == before
    return text


# --- 1. secrets are never published ----------------------------------------------


@pytest.mark.parametrize("name", ["merges.txt", "vocab.json", "special_tokens_map.json", "added_tokens.json"])
def test_side_file_linked_to_a_secret_is_refused(release, qwen2, secret, tmp_path, name):
    (qwen2 / name).unlink(missing_ok=True)
    (qwen2 / name).symlink_to(secret)
    text = refused(release, tmp_path / "out", f"{name} does not match tokenizer.json")
    assert SECRET not in text


def test_side_files_are_checked_not_trusted(release, qwen2, tmp_path):
    """A side file that parses but says something else than tokenizer.json is refused too."""
    vocab = json.loads((qwen2 / "vocab.json").read_text())
    vocab[next(iter(vocab))] = 10**6
    (qwen2 / "vocab.json").write_text(json.dumps(vocab))
    refused(release, tmp_path / "out", "its vocabulary differs from tokenizer.json's")
    (qwen2 / "vocab.json").unlink()
    (qwen2 / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|not-a-token|>"}))
    refused(release, tmp_path / "out", "which tokenizer.json does not have")


def test_push_refuses_a_side_file_linked_out_of_the_repo(repo, secret):
    (repo / "vocab.json").unlink()
    (repo / "vocab.json").symlink_to(secret)
    with pytest.raises(HubPushError, match="vocab.json is a symlink") as caught:
        check_converted_repo(repo)
    assert "\n" not in str(caught.value) and SECRET not in str(caught.value)


def test_push_refuses_a_side_file_that_does_not_match(repo, secret):
    shutil.copyfile(secret, repo / "merges.txt")
    with pytest.raises(HubPushError, match="merges.txt does not match tokenizer.json"):
        check_converted_repo(repo)


def test_push_refuses_a_shard_outside_the_repo(repo):
    index = json.loads((repo / INDEX_NAME).read_text())
    index["weight_map"] = {name: "../elsewhere.safetensors" for name in index["weight_map"]}
    (repo / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(HubPushError, match="not one the converter writes"):
        check_converted_repo(repo)


# --- 2. remote code does not ride along --------------------------------------------


def test_auto_map_in_the_source_never_reaches_the_repo(release, qwen2, tmp_path):
    remote = {"AutoTokenizer": ["attacker/repo--tokenization.EvilTokenizer", None]}
    for name in ("tokenizer_config.json", "config.json"):
        config = json.loads((qwen2 / name).read_text())
        config["auto_map"] = remote
        config["quantization_config"] = {"quant_method": "attacker"}
        (qwen2 / name).write_text(json.dumps(config))
    out = tmp_path / "out"
    convert(release, out, dtype="fp32")
    for path in out.glob("*.json"):
        assert "auto_map" not in path.read_text() and "attacker" not in path.read_text(), path.name
    check_converted_repo(out)


def test_push_refuses_remote_code_keys(repo):
    config = json.loads((repo / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["attacker/repo--x.Y", None]}
    (repo / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(HubPushError, match="tokenizer_config.json has auto_map"):
        check_converted_repo(repo)


def test_bad_values_in_the_qwen2_config_are_refused(release, qwen2, tmp_path):
    config = json.loads((qwen2 / "config.json").read_text())
    config["rms_norm_eps"] = "tiny"
    (qwen2 / "config.json").write_text(json.dumps(config))
    refused(release, tmp_path / "out", "gives rms_norm_eps as 'tiny'")


# --- 3. work is never destroyed ---------------------------------------------------


def test_overwrite_leaves_a_folder_it_did_not_make(release, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    result = CliRunner().invoke(convert_main, [str(release), str(notes), "--overwrite", "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "not a repo made by fireredasr-convert" in result.stderr
    assert tree_bytes(notes) == {Path("todo.txt"): b"my notes"}


def test_overwrite_replaces_an_earlier_conversion(release, tmp_path):
    out = tmp_path / "repo"
    convert(release, out, dtype="fp32")
    (out / "stale.txt").write_text("old")
    convert(release, out, dtype="fp32", overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_failed_conversion_keeps_what_another_job_put_in_the_folders_it_made(release, tmp_path, monkeypatch):
    shared = tmp_path / "jobs"
    other_repo = shared / "other-job" / "repo"
    real_write_tensor = writer.ShardWriter.write_tensor

    def write_tensor(self, name, blocks, then=None):
        if name.startswith("language_model."):
            # Meanwhile another job finishes its repo in the folder this run created.
            other_repo.mkdir(parents=True, exist_ok=True)
            (other_repo / "config.json").write_text("{}")
            raise RuntimeError("this conversion fails")
        real_write_tensor(self, name, blocks, then)

    monkeypatch.setattr(writer.ShardWriter, "write_tensor", write_tensor)
    with pytest.raises(RuntimeError):
        convert(release, shared / "mine" / "repo")
    assert (other_repo / "config.json").read_text() == "{}"
    assert sorted(p.name for p in shared.iterdir()) == ["other-job"]  # its own empty folders are gone


def test_transcribe_overwrite_keeps_the_old_output_when_the_model_fails(tmp_path):
    clip = tmp_path / "a.wav"
    sf.write(clip, synthetic_speech(16000, seed=1), 16000)
    previous = tmp_path / "prev.txt"
    previous.write_text("a\tthe earlier transcript\n", encoding="utf-8")
    result = CliRunner().invoke(
        transcribe_main, ["-m", str(tmp_path / "no-such-model"), str(clip), "-o", str(previous), "--overwrite", "-q"]
    )
    assert result.exit_code == EXIT_NOTHING
    assert previous.read_text(encoding="utf-8") == "a\tthe earlier transcript\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "prev.txt"]


def test_transcribe_overwrite_leaves_a_file_it_did_not_write(converted_fp32, tmp_path):
    clip = tmp_path / "a.wav"
    sf.write(clip, synthetic_speech(16000, seed=1), 16000)
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\nmilk\n", encoding="utf-8")
    result = CliRunner().invoke(
        transcribe_main, ["-m", str(converted_fp32), str(clip), "-o", str(notes), "--overwrite", "-q"]
    )
    assert result.exit_code == EXIT_NOTHING
    assert "not an output of fireredasr-transcribe" in result.output
    assert notes.read_text(encoding="utf-8") == "shopping list\nmilk\n"


def test_push_deletes_only_top_level_shards_it_names():
    remote = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "adapters/model-00001-of-00002.safetensors",
        "extra/weights.safetensors",
        "consolidated.safetensors",
    ]
    assert list(filter_repo_objects(remote, allow_patterns=STALE_WEIGHT_PATTERNS)) == remote[:2]


# --- 4. a run does not die part-way --------------------------------------------------


@pytest.mark.parametrize(
    ("uttid", "problem"),
    [
        ("utt\x00one", "U+0000"),
        ("utt\x1b[2Jone", "U+001B"),
        ("\ufeffutt", "U+FEFF"),
        ("utt\u2028one", "U+2028"),
        ("u" * 250, "250 bytes long"),
    ],
)
def test_ids_that_no_output_can_hold_are_refused_up_front(tmp_path, uttid, problem):
    scp = tmp_path / "wav.scp"
    scp.write_text(f"good {tmp_path / 'good.wav'}\n{uttid} {tmp_path / 'x.wav'}\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        collect_utterances(scp)
    assert problem in str(caught.value) and "\n" not in str(caught.value)
    assert "\x00" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_a_byte_order_mark_at_the_start_of_wav_scp_is_not_part_of_the_first_id(tmp_path):
    scp = tmp_path / "wav.scp"
    scp.write_bytes("\ufeffutt1 a.wav\r\nutt2 b.wav\r\n".encode())
    assert [(u.uttid, u.path) for u in collect_utterances(scp)] == [("utt1", "a.wav"), ("utt2", "b.wav")]


def transcript(uttid: str, text: str = "三七一") -> RecordingTranscript:
    return RecordingTranscript(uttid, 2.0, (TimedText(0.0, 2.0, text),))


def test_a_subtitle_that_cannot_be_written_is_reported_and_the_others_are_written(tmp_path):
    folder = SubtitleFolder("srt", tmp_path)
    (tmp_path / "blocked.srt").mkdir()  # the name is taken: its rename fails
    failures = []
    ordered = OrderedWriter(folder, range(4), lambda item, error: failures.append(item.uttid))
    for index, uttid in enumerate(["first", "blocked", "third", "fourth"]):
        ordered.settle(index, transcript(uttid))
    assert failures == ["blocked"] and ordered.written == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.srt", "first.srt", "fourth.srt", "third.srt"]


def test_resume_finds_jsonl_records_holding_unicode_line_separators(tmp_path):
    output = tmp_path / "out.jsonl"
    texts = {"a": "one\u2028two", "b": "three\u0085four", "c": "five\u2029six", "d": "seven"}
    output.write_text("".join(jsonl_line(transcript(u, t)) for u, t in texts.items()), encoding="utf-8")
    assert LineOutput.finished(output, "jsonl") == set(texts)
    assert output.read_text(encoding="utf-8").count("\n") == len(texts)


def test_sigterm_during_a_conversion_leaves_nothing_behind(release, tmp_path, monkeypatch):
    real_write_tensor = writer.ShardWriter.write_tensor

    def write_tensor(self, name, blocks, then=None):
        if name.startswith("language_model."):
            os.kill(os.getpid(), signal.SIGTERM)
        real_write_tensor(self, name, blocks, then)

    monkeypatch.setattr(writer.ShardWriter, "write_tensor", write_tensor)
    # whatever handler was there before (Ray's, when test_ray_transcription ran first) comes back
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_main, [str(release), str(out), "--quiet"])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_sigterm_is_raised_as_keyboard_interrupt_and_the_handler_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGTERM) == previous


# --- 5. bad numbers are stopped where they enter -------------------------------------


def rewrite_model_args(release, **args):
    path = release / "model.pth.tar"
    package = load_release_pickle(path)
    for name, value in args.items():
        setattr(package["args"], name, value)
    torch.save(package, path)


@pytest.mark.parametrize("value", [float("nan"), "thirty", 1e7, -5.0])
def test_input_length_max_must_be_a_sane_clip_limit(release, tmp_path, value):
    rewrite_model_args(release, input_length_max=value)
    refused(release, tmp_path / "out", "input_length_max in the args of")


@pytest.mark.parametrize("value", [float("nan"), "thirty", 1e7])
def test_a_repo_with_a_bad_clip_limit_is_refused_by_the_transcriber_and_the_push(repo, tmp_path, value):
    path = repo / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["max_audio_seconds"] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="max_audio_seconds"):
        FireRedAsrFeatureExtractor.from_pretrained(repo)
    with pytest.raises(HubPushError, match="preprocessor_config.json"):
        check_converted_repo(repo)
    clip = tmp_path / "a.wav"
    sf.write(clip, synthetic_speech(16000, seed=1), 16000)
    result = CliRunner().invoke(transcribe_main, ["-m", str(repo), str(clip), "-q"])
    assert result.exit_code == EXIT_NOTHING
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "max_audio_seconds" in error[0]


def test_nan_in_cmvn_statistics_is_refused(release, tmp_path):
    path = release / "cmvn.ark"
    data = bytearray(path.read_bytes())
    data[15:23] = np.float64(math.nan).tobytes()  # the first sum
    path.write_bytes(bytes(data))
    refused(release, tmp_path / "out", "NaN or infinite")


def test_a_tensor_with_an_empty_dimension_is_refused(release, qwen2, tmp_path):
    (qwen2 / "extra.safetensors").write_bytes(safetensors_header([("model.extra", (10**15, 0))], torch.float32))
    index = json.loads((qwen2 / INDEX_NAME).read_text())
    index["weight_map"]["model.extra"] = "extra.safetensors"
    (qwen2 / INDEX_NAME).write_text(json.dumps(index))
    refused(release, tmp_path / "out", "with an empty dimension")


def test_deeply_nested_json_is_a_one_line_refusal(release, qwen2, repo, tmp_path):
    (qwen2 / "config.json").write_text(DEEP_JSON)
    refused(release, tmp_path / "out", "nests deeper than")
    (repo / "generation_config.json").write_text(DEEP_JSON)
    with pytest.raises(HubPushError, match="nests deeper than"):
        check_converted_repo(repo)


def test_a_long_file_of_nan_is_reported_like_a_short_one(tmp_path):
    settings = SegmenterSettings(max_seconds=30.0)
    files = []
    for seconds in (5, 40):
        path = tmp_path / f"nan_{seconds}.wav"
        sf.write(path, np.full(seconds * 16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
        files.append((len(files), Utterance(path.stem, str(path))))
    events = list(segment_events(files, settings, "auto", lambda waveform: None))
    assert [type(e) for e in events] == [FileFailed, FileFailed]
    assert all("NaN or infinite samples" in str(e.error) for e in events)


def test_a_folder_given_as_audio_is_named_as_a_folder(tmp_path):
    with pytest.raises(AudioError, match="is a folder, not an audio file"):
        next(read_blocks(str(tmp_path)))


# --- 6. temporary names are never followed ------------------------------------------


def test_subtitle_write_ignores_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "subs"
    folder.mkdir()
    (folder / ".meeting.srt.partial").symlink_to(victim)  # the old fixed temporary name
    (folder / "meeting.srt").symlink_to(victim)  # and the final name
    SubtitleFolder("srt", folder).write(transcript("meeting"))
    assert victim.read_text() == "keep me"
    assert not (folder / "meeting.srt").is_symlink() and "三七一" in (folder / "meeting.srt").read_text()


def test_model_card_update_ignores_a_planted_symlink(repo, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (repo / ".README.md.tmp").symlink_to(victim)
    assert point_model_card_at(repo, "my-org/elsewhere")
    assert victim.read_text() == "keep me"
    assert "vllm serve my-org/elsewhere" in (repo / "README.md").read_text()


def test_a_repo_with_deeply_nested_json_is_one_line_for_the_transcriber(repo, tmp_path):
    (repo / "config.json").write_text(DEEP_JSON)
    clip = tmp_path / "a.wav"
    sf.write(clip, synthetic_speech(16000, seed=1), 16000)
    result = CliRunner().invoke(transcribe_main, ["-m", str(repo), str(clip), "-q"])
    assert result.exit_code == EXIT_NOTHING, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "cannot load" in error[0], result.output


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("encoder_downsample_rate", "two"),
        ("encoder_downsample_rate", 0),
        # An id no embedding row holds; heads that do not split the width.
        ("speech_token_id", 2**30),
        ("encoder_config.n_head", 7),
    ],
)
def test_a_repo_with_a_bad_size_in_its_config_is_one_line_for_the_transcriber(repo, tmp_path, key, value):
    config = json.loads((repo / "config.json").read_text())
    *parents, name = key.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    section[name] = value
    (repo / "config.json").write_text(json.dumps(config))
    clip = tmp_path / "a.wav"
    sf.write(clip, synthetic_speech(16000, seed=1), 16000)
    result = CliRunner().invoke(transcribe_main, ["-m", str(repo), str(clip), "-q", "--backend", "reference"])
    assert result.exit_code == EXIT_NOTHING, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and name in error[0], result.output
