"""The benchmark scripts run end to end at toy sizes and check what they claim to check.

Only behaviour is asserted (exit status, the rows printed, the token counts the
serving benchmark enforces); the timings they print are not.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fireredasr_converter import spec
from fireredasr_converter.fixtures import AED_L_SHAPES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def serve_benchmark():
    module_spec = importlib.util.spec_from_file_location("serve_benchmark", BENCHMARKS / "serve.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_serve_benchmark_generates_n_tokens_per_clip_by_default(serve_benchmark):
    durations = [1.0, 6.37, 19.8]
    assert serve_benchmark.tokens_per_clip(durations, None, 2) == [
        spec.speech_embedding_count_for_samples(int(d * spec.SAMPLE_RATE), 2) for d in durations
    ]
    # 1 s: 98 fbank frames -> 25 encoder frames -> 12 embeddings.
    assert serve_benchmark.tokens_per_clip([1.0], None, 2) == [12]
    assert serve_benchmark.tokens_per_clip(durations, 32, 2) == [32, 32, 32]


@pytest.mark.parametrize("value", ["0", "-3", "many", ""])
def test_serve_benchmark_rejects_a_bad_output_length(serve_benchmark, value):
    with pytest.raises(click.BadParameter, match="'n'"):
        serve_benchmark.parse_output_tokens(None, None, value)


def test_serve_benchmark_aed_scales_keep_aed_l_head_size_and_vocabulary(serve_benchmark):
    def vocabulary(shapes):
        return shapes.chinese_chars + shapes.spm_vocab_size

    for name in ("eighth", "quarter", "aed-l"):
        shapes = serve_benchmark.AED_SCALES[name]
        assert shapes.encoder_head_dim == AED_L_SHAPES.encoder_head_dim
        assert vocabulary(shapes) == vocabulary(AED_L_SHAPES)
    eighth = serve_benchmark.AED_SCALES["eighth"]
    assert (eighth.encoder_layers, eighth.encoder_dim, eighth.decoder_layers) == (2, 128, 2)
    # Refused before anything is built: stock vLLM has no AED model; a scale of the other model.
    for args, message in ((["--backends", "reference,stock"], "drop stock"), (["--scale", "medium"], "not medium")):
        refused = CliRunner().invoke(serve_benchmark.main, ["--model", "aed", *args])
        assert refused.exit_code == 2 and message in refused.output


def run_serve_benchmark(serve_benchmark, *args: str):
    """serve.py's command with its driver in this process (the script's start-up is seconds); each
    backend still runs in a worker process of its own, as the script runs it."""
    result = CliRunner().invoke(serve_benchmark.main, list(args))
    assert result.exit_code == 0, result.output[-6000:] + repr(result.exception)
    return result.output


@pytest.mark.vllm
def test_serve_benchmark_compares_all_three_backends(serve_benchmark, tmp_path):
    # Exit 0 also means every backend generated exactly N tokens for every clip.
    output = run_serve_benchmark(
        serve_benchmark, "--scale", "tiny", "--clips", "3", "--latency-clips", "1", "--workdir", str(tmp_path)
    )
    lines = output.splitlines()
    for backend in ("reference", "plugin", "stock"):
        assert any(line.split()[:1] == [backend] for line in lines), output
    assert any(line.startswith("plugin / reference utterances/s:") for line in lines)
    assert any(line.startswith("plugin vs stock:") for line in lines)
    assert "3 clips" in output and "generated tokens (N per clip)" in output


@pytest.mark.vllm
def test_serve_benchmark_recipe_mode_gives_the_reference_token_ids(serve_benchmark, tmp_path):
    output = run_serve_benchmark(
        serve_benchmark, "--scale", "tiny", "--clips", "3", "--latency-clips", "1", "--decoding", "recipe",
        "--backends", "reference,plugin", "--workdir", str(tmp_path),
    )  # fmt: skip
    assert "decoding: recipe" in output
    assert "plugin: 3 of 3 clips give the reference's token ids" in output
    # Refused before anything is built (in this process: the script's own start-up is seconds).
    refused = CliRunner().invoke(serve_benchmark.main, ["--decoding", "recipe", "--backends", "reference,stock"])
    assert refused.exit_code == 2 and "drop stock" in refused.output


@pytest.mark.slow
def test_convert_benchmark_reports_the_ratio_and_peak_memory():
    result = run_script("convert.py", "--scale", "0.01")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "time ratio conversion / best copy:" in result.stdout
    assert "peak RSS of the conversion:" in result.stdout


@pytest.mark.slow
def test_frontend_benchmark_features_match_the_per_frame_loop():
    # Exit 1 would mean the vectorised features left the tolerance.
    result = run_script("frontend.py", "--seconds", "4", "--clips", "2", "--repeats", "1")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "speed-up:" in result.stdout
