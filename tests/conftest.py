"""Session-wide fixtures: one tiny release in the original layout, converted once."""

import pytest

from fireredasr_converter.fixtures import TINY_SHAPES, build_release
from fireredasr_converter.pipeline import convert


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """A tiny FireRedASR-LLM-L v1 release (relative Qwen2 symlink), random weights."""
    return build_release(tmp_path_factory.mktemp("release"), TINY_SHAPES, variant="v1", seed=0)


@pytest.fixture(scope="session")
def converted_fp32(tiny_release, tmp_path_factory):
    """`tiny_release` converted with --dtype fp32: the repo the parity tests load."""
    out = tmp_path_factory.mktemp("converted") / "fireredasr-llm-tiny-fp32"
    convert(tiny_release.model_dir, out, dtype="fp32")
    return out
