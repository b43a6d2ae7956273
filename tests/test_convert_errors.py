"""fireredasr-convert on bad input: one clear error, and the output folder untouched."""

import argparse
import errno
import json
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_release_pickle
from tolerances import F32_EPS, F64_EPS

from fireredasr_converter import pipeline, plan, sources, writer
from fireredasr_converter.cli import main
from fireredasr_converter.errors import ConversionError
from fireredasr_converter.fixtures import TINY_SHAPES, build_release
from fireredasr_converter.pipeline import convert

LORA_B = "llm.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("pristine"), TINY_SHAPES, seed=5)


@pytest.fixture
def release(pristine, tmp_path):
    """A private copy of the tiny v1 release (relative symlink kept) to damage."""
    root = tmp_path / "release"
    shutil.copytree(pristine.model_dir.parent, root, symlinks=True)
    return root / pristine.model_dir.name


# What marks a folder as a repo of an earlier conversion: --overwrite may replace only such a folder.
EARLIER_CONFIG = json.dumps({"fireredasr_conversion": {"converter": "fireredasr-convert"}})


@pytest.fixture
def out(tmp_path):
    """An earlier conversion's output folder, with content that must survive every failure."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text(EARLIER_CONFIG)
    (folder / "keep.txt").write_text("previous content")
    return folder


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(src, out, message, **kwargs):
    """convert() raises one line containing `message`; OUT and its parent are as they were."""
    before, siblings = snapshot(out), sorted(out.parent.iterdir())
    with pytest.raises(ConversionError) as caught:
        convert(src, out, overwrite=True, **kwargs)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert snapshot(out) == before
    assert sorted(out.parent.iterdir()) == siblings


def rewrite_model(release, edit):
    path = release / "model.pth.tar"
    package = load_release_pickle(path)
    edit(package)
    torch.save(package, path)


def test_missing_model_checkpoint(release, out):
    (release / "model.pth.tar").unlink()
    assert_refused(release, out, "missing")


def test_unreadable_cmvn(release, out, monkeypatch):
    # Root ignores file modes, so the refusal the OS would give is simulated.
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if pathlib.Path(path).name == "cmvn.ark":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources, "open", guarded_open, raising=False)
    assert_refused(release, out, "cannot read")


def test_src_is_not_a_folder(tmp_path, out):
    assert_refused(tmp_path / "nowhere", out, "is not a folder")


def test_broken_qwen2_symlink(release, out):
    shutil.rmtree(release.parent / "Qwen2-7B-Instruct")
    assert_refused(release, out, "broken symlink")
    assert_refused(release, out, "ln -sfn")


def test_missing_qwen2_folder(release, out):
    (release / "Qwen2-7B-Instruct").unlink()
    assert_refused(release, out, "or pass --llm-dir")


class NotAllowed:
    pass


def test_pickle_needing_more_than_namespace(release, out):
    rewrite_model(release, lambda package: package["args"].__setattr__("encoder_path", pathlib.PurePosixPath("/x")))
    assert_refused(release, out, "needs pathlib.PurePosixPath to unpickle")


def test_pickle_with_arbitrary_code(release, out):
    torch.save({"args": argparse.Namespace(), "model_state_dict": {}, "hook": NotAllowed()}, release / "model.pth.tar")
    assert_refused(release, out, f"needs {__name__}.NotAllowed to unpickle")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_model_checkpoint(release, out, damage):
    path = release / "model.pth.tar"
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    path.write_bytes(damaged)
    assert_refused(release, out, "truncated or corrupt")


def test_wrong_projector_shape(release, out):
    def edit(package):
        state = package["model_state_dict"]
        state["encoder_projector.linear1.weight"] = state["encoder_projector.linear1.weight"][:, :-1].clone()

    rewrite_model(release, edit)
    assert_refused(release, out, "encoder_projector.linear1.weight")
    assert_refused(release, out, "expected [128, 128]")


def test_encoder_layers_disagree_with_args(release, out):
    path = release / "asr_encoder.pth.tar"
    package = load_release_pickle(path)
    package["args"].n_layers_enc = 3
    torch.save(package, path)
    assert_refused(release, out, "holds 2 encoder layers, its args say n_layers_enc=3")


def test_wrong_lora_shape(release, out):
    def edit(package):
        state = package["model_state_dict"]
        state[LORA_B] = state[LORA_B][:, :-1].clone()

    rewrite_model(release, edit)
    assert_refused(release, out, "lora_B of model.layers.1.mlp.down_proj.weight has shape")


def test_incomplete_lora_pair(release, out):
    rewrite_model(release, lambda package: package["model_state_dict"].pop(LORA_B))
    assert_refused(release, out, "incomplete LoRA pair for model.layers.1.mlp.down_proj.weight")


def test_unknown_checkpoint_key(release, out):
    rewrite_model(release, lambda package: package["model_state_dict"].__setitem__("decoder.bias", torch.zeros(2)))
    assert_refused(release, out, "unknown tensor decoder.bias")


def test_non_finite_merge(release, out):
    def edit(package):
        package["model_state_dict"][LORA_B][3, 0] = float("inf")

    rewrite_model(release, edit)
    assert_refused(release, out, "NaN or infinite values after merging its LoRA factors")


def write_binary_matrix(path, matrix, token=b"DM "):
    rows, cols = matrix.shape
    header = b"\0B" + token + b"\x04" + struct.pack("<i", rows) + b"\x04" + struct.pack("<i", cols)
    path.write_bytes(header + matrix.astype("<f8" if token == b"DM " else "<f4").tobytes())


def cmvn_stats(release):
    return np.frombuffer((release / "cmvn.ark").read_bytes()[15:], dtype="<f8").reshape(2, -1).copy()


def test_cmvn_wrong_magic(release, out):
    (release / "cmvn.ark").write_bytes(b"\0BXM " + b"\0" * 64)
    assert_refused(release, out, "not an uncompressed DM/FM matrix")
    (release / "cmvn.ark").write_bytes(b"PK\x03\x04 not kaldi")
    assert_refused(release, out, "is not a Kaldi matrix")


def test_cmvn_wrong_shape(release, out):
    write_binary_matrix(release / "cmvn.ark", cmvn_stats(release)[:, :41])
    assert_refused(release, out, "holds a 2 x 41 matrix, expected 2 x 81")


def test_cmvn_truncated(release, out):
    path = release / "cmvn.ark"
    path.write_bytes(path.read_bytes()[:-8])
    assert_refused(release, out, "declares a 2 x 81 matrix")


def test_cmvn_zero_count(release, out):
    stats = cmvn_stats(release)
    stats[0, -1] = 0
    write_binary_matrix(release / "cmvn.ark", stats)
    assert_refused(release, out, "frame count must be >= 1")


def test_cmvn_text_and_float_forms_convert(release, tmp_path):
    stats = cmvn_stats(release)
    rows = "\n".join("  " + " ".join(repr(float(v)) for v in row) for row in stats)
    (release / "cmvn.ark").write_text(f" [\n{rows} ]\n")
    text_repo = tmp_path / "text"
    convert(release, text_repo, dtype="fp32")
    write_binary_matrix(release / "cmvn.ark", stats, token=b"FM ")
    float_repo = tmp_path / "float"
    convert(release, float_repo, dtype="fp32")
    text_config = json.loads((text_repo / "preprocessor_config.json").read_text())
    float_config = json.loads((float_repo / "preprocessor_config.json").read_text())
    assert text_config["cmvn_frame_count"] == float_config["cmvn_frame_count"] == stats[0, -1]
    # repr() round-trips every float64 bit and the converter divides the same way: identical.
    np.testing.assert_array_equal(text_config["cmvn_mean"], stats[0, :-1] / stats[0, -1])
    # "FM " stores the sums in float32 (half an ulp, eps / 2 relative; the count is an exact
    # integer) and the division rounds once more in float64.
    np.testing.assert_allclose(float_config["cmvn_mean"], text_config["cmvn_mean"], rtol=F32_EPS / 2 + F64_EPS, atol=0)


def test_tokenizer_without_qwen2_special_tokens(release, out):
    path = release.parent / "Qwen2-7B-Instruct" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|im_start|>"]
    path.write_text(json.dumps(tokenizer))
    assert_refused(release, out, "lacks the Qwen2 special token(s) <|im_start|>")


def test_output_equal_to_or_inside_source(release):
    with pytest.raises(ConversionError, match="inside the input folder"):
        convert(release, release, overwrite=True)
    with pytest.raises(ConversionError, match="inside the input folder"):
        convert(release, release / "converted")
    # The Qwen2 folder behind the symlink counts as input too.
    qwen2 = release.parent / "Qwen2-7B-Instruct"
    before = snapshot(qwen2)
    with pytest.raises(ConversionError, match="inside the input folder"):
        convert(release, qwen2 / "converted")
    # And --overwrite never replaces it: it is not a converted repo.
    with pytest.raises(ConversionError, match="not a repo made by fireredasr-convert"):
        convert(release, qwen2, overwrite=True)
    assert snapshot(qwen2) == before
    assert not (release / "converted").exists()


def test_non_empty_output_needs_overwrite(release, out):
    before = snapshot(out)
    with pytest.raises(ConversionError, match="is not empty: pass --overwrite"):
        convert(release, out)
    assert snapshot(out) == before


class FillingFile:
    """A file on a disk that fills up after `capacity` bytes."""

    def __init__(self, file, capacity):
        self._file, self._capacity = file, capacity

    def write(self, data):
        self._capacity -= memoryview(data).nbytes
        if self._capacity < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_disk_full_while_writing(release, out, monkeypatch):
    monkeypatch.setattr(writer, "open", lambda path, mode: FillingFile(open(path, mode), 500_000), raising=False)
    assert_refused(release, out, "disk full")


def test_not_enough_free_space(release, out, monkeypatch):
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    assert_refused(release, out, "not enough free space")


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing_behind(release, out, monkeypatch, interruption):
    real_write_tensor = writer.ShardWriter.write_tensor

    def write_tensor(self, name, blocks, then=None):
        if name.startswith("language_model."):
            raise interruption()
        real_write_tensor(self, name, blocks, then)

    monkeypatch.setattr(writer.ShardWriter, "write_tensor", write_tensor)
    before, siblings = snapshot(out), sorted(out.parent.iterdir())
    with pytest.raises(interruption):
        convert(release, out, overwrite=True)
    assert snapshot(out) == before
    assert sorted(out.parent.iterdir()) == siblings
    fresh = out.parent / "new" / "nested" / "repo"
    with pytest.raises(interruption):
        convert(release, fresh)
    assert not (out.parent / "new").exists()


def test_failed_swap_keeps_the_old_output(release, out, monkeypatch):
    real_rename = os.rename

    def rename(source, target):
        if ".partial-" in str(source):
            raise OSError(errno.EIO, "Input/output error", str(source))
        real_rename(source, target)

    monkeypatch.setattr(writer.os, "rename", rename)
    assert_refused(release, out, "Input/output error")


def test_verification_catches_a_wrong_merge(release, out, monkeypatch):
    real_merge = plan.merge_rows_
    monkeypatch.setattr(plan, "merge_rows_", lambda rows, b, a, scale: real_merge(rows, b, a, scale * 1.01))
    assert_refused(release, out, "verification of the written repo failed", dtype="fp32")


def test_cli_errors_are_one_line_on_stderr(release, out):
    (release / "cmvn.ark").write_bytes(b"garbage")
    result = CliRunner().invoke(main, [str(release), str(out), "--overwrite"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "cmvn.ark" in result.stderr
    assert snapshot(out) == {pathlib.Path("keep.txt"): b"previous content", pathlib.Path("config.json"): EARLIER_CONFIG.encode()}


def test_cli_usage_errors_stay_clicks(release, out):
    for args in (["--dtype", "int8"], ["--max-shard-size", "lots"], ["--lora-alpha", "0"]):
        result = CliRunner().invoke(main, [str(release), str(out), *args])
        assert result.exit_code == 2, args
        assert "Usage:" in result.stderr
