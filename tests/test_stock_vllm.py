"""`--target stock-vllm`: the export served by stock vLLM's FireRedASR2 model, without the plugin.

One stock engine runs in a subprocess (tests/stock_vllm_worker.py) with VLLM_PLUGINS
excluding this project's plugin; its greedy output must equal the reference
implementation's on the plugin-format conversion of the same release. The file-level
tests check what stock vLLM reads against the plugin export and the release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_safetensors
from tolerances import F32_EPS, fbank_atol
from transformers import AutoConfig, AutoTokenizer, Qwen2Config
from vllm_helpers import (
    CPU_ENGINE_ENV,
    NUM_LOGPROBS,
    PARITY_CLIP_SAMPLES,
    assert_top_logprobs_close,
    speech_embedding_count,
)

from fireredasr_converter import spec
from fireredasr_converter.cli import main
from fireredasr_converter.errors import ConversionError
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor, kaldi_fbank
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_converter.pipeline import convert
from fireredasr_converter.stock_vllm import STOCK_ARCHITECTURE, STOCK_AUDIO_TOKEN

WORKER = Path(__file__).with_name("stock_vllm_worker.py")
THIRTY_SECONDS = 30 * spec.SAMPLE_RATE
# The plugin's parity lengths (every residue of T mod 4, the shortest clip with one speech
# embedding, up to 20 s) and 30 s, whose 2998 frames fill the export's max_length exactly.
CLIP_SAMPLES = (*PARITY_CLIP_SAMPLES, THIRTY_SECONDS)
# Decoded together in one call, with audio of their own so no cache holds their encodings.
BATCHED_SAMPLES = (spec.min_samples_for_one_embedding(), 16000, 67120, THIRTY_SECONDS)
# Under 65 ms: the original has no speech embedding for it (T = 3 fbank frames).
NO_SPEECH_SAMPLES = 800
# Greedy tokens compared per clip (all of them when N is smaller). Where stock and the
# reference could differ is the prompt: its N speech embeddings all feed every step,
# so a few steps show it; decoding all N (374 at 30 s) would multiply the test's time.
MAX_TOKENS = 24


def max_tokens(num_samples: int) -> int:
    """The reference's default (N, at least 1), capped at MAX_TOKENS."""
    return min(MAX_TOKENS, max(1, speech_embedding_count(num_samples)))


@pytest.fixture(scope="module")
def stock_repo(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock") / "fireredasr-llm-tiny-stock-fp32"
    convert(tiny_release.model_dir, out, dtype="fp32", target="stock-vllm")
    return out


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    named = {f"solo-{n}": synthetic_speech(n, seed=i) for i, n in enumerate(CLIP_SAMPLES)}
    named |= {f"batched-{n}": synthetic_speech(n, seed=100 + i) for i, n in enumerate(BATCHED_SAMPLES)}
    named["no-speech"] = synthetic_speech(NO_SPEECH_SAMPLES, seed=200)
    return named


@pytest.fixture(scope="module")
def stock(stock_repo, clips, tmp_path_factory) -> dict:
    """What stock vLLM did with the export, from a process that loads no vLLM plugin."""
    folder = tmp_path_factory.mktemp("stock-run")
    np.savez(folder / "clips.npz", **clips)
    job = {
        "repo": str(stock_repo),
        "clips": str(folder / "clips.npz"),
        "max_tokens": {name: max_tokens(len(clip)) for name, clip in clips.items()},
        "solo": [name for name in clips if not name.startswith("batched-")],
        "batched": [name for name in clips if name.startswith("batched-")],
    }
    (folder / "job.json").write_text(json.dumps(job))
    env = {
        **os.environ,
        **CPU_ENGINE_ENV,
        # A plugin name list without `fireredasr_llm`: vLLM loads none of the installed plugins.
        "VLLM_PLUGINS": "",
        # The engine in this process: a spawned engine core would import vLLM twice more.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    completed = subprocess.run(
        [sys.executable, str(WORKER), str(folder / "job.json"), str(folder / "result.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((folder / "result.json").read_text())


def as_logprobs(step: dict[str, float]) -> dict[int, float]:
    return {int(token): value for token, value in step.items()}


def assert_matches_reference(output: dict, waveform: np.ndarray, reference) -> None:
    expected = reference.greedy_with_logprobs(
        waveform, num_logprobs=NUM_LOGPROBS, max_new_tokens=max_tokens(len(waveform))
    )
    assert output["token_ids"] == expected.token_ids
    assert len(output["logprobs"]) == len(expected.logprobs)
    for step, (stock_step, reference_step) in enumerate(zip(output["logprobs"], expected.logprobs)):
        assert_top_logprobs_close(as_logprobs(stock_step), reference_step, step)


def audio_token_id(repo: Path) -> int:
    return AutoTokenizer.from_pretrained(repo).convert_tokens_to_ids(STOCK_AUDIO_TOKEN)


# --- stock vLLM serving the export ------------------------------------------------------


@pytest.mark.vllm
def test_stock_vllm_serves_it_without_the_plugin(stock):
    assert stock["architecture"] == STOCK_ARCHITECTURE
    assert not stock["plugin_registered"] and not stock["plugin_imported"]
    # Stock's transcription prompt is the original's, with its own placeholder.
    assert stock["prompt"] == spec.transcription_prompt(STOCK_AUDIO_TOKEN)
    # The endpoint settings come from preprocessor_config.json.
    assert stock["max_audio_clip_s"] == 30 and stock["sample_rate"] == spec.SAMPLE_RATE
    assert stock["audio_tokens_per_second"] == spec.SAMPLE_RATE // spec.FRAME_SHIFT_SAMPLES


@pytest.mark.vllm
@pytest.mark.parametrize("num_samples", CLIP_SAMPLES)
def test_greedy_output_matches_reference(num_samples, stock, stock_repo, clips, reference):
    output = stock["solo"][f"solo-{num_samples}"]
    assert output["prompt_token_ids"].count(audio_token_id(stock_repo)) == speech_embedding_count(num_samples)
    assert_matches_reference(output, clips[f"solo-{num_samples}"], reference)


@pytest.mark.vllm
def test_batched_clips_match_reference(stock, clips, reference):
    for num_samples in BATCHED_SAMPLES:
        name = f"batched-{num_samples}"
        assert_matches_reference(stock["batched"][name], clips[name], reference)


@pytest.mark.vllm
def test_stock_gives_a_clip_without_speech_one_embedding(stock, stock_repo):
    # The difference the model card states: the original has N = 0 here, the plugin refuses the clip.
    assert speech_embedding_count(NO_SPEECH_SAMPLES) == 0
    assert stock["solo"]["no-speech"]["prompt_token_ids"].count(audio_token_id(stock_repo)) == 1


# --- the exported files -------------------------------------------------------------


def test_config_is_qwen2_with_stock_fields(stock_repo, tiny_release):
    config = AutoConfig.from_pretrained(stock_repo)
    shapes = tiny_release.shapes
    assert isinstance(config, Qwen2Config)
    assert config.architectures == [STOCK_ARCHITECTURE]
    assert config.audio_encoder_conf == {
        "idim": spec.NUM_MEL_BINS,
        "n_layers_enc": shapes.encoder_layers,
        "n_head": shapes.encoder_heads,
        "d_model": shapes.encoder_dim,
        "kernel_size": shapes.encoder_kernel,
        "pe_maxlen": spec.RELATIVE_POSITION_MAX_LEN,
    }
    assert config.encoder_downsample_rate == 2
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        shapes.llm_hidden,
        shapes.llm_layers,
        shapes.llm_vocab_rows,
    )
    assert config.dtype == torch.float32
    conversion = config.fireredasr_conversion
    assert conversion["options"]["target"] == "stock-vllm" and conversion["options"]["dtype"] == "fp32"


def load_weights(repo: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_safetensors(repo, shard))
    assert tensors.keys() == weight_map.keys()
    return tensors


def test_weights_are_the_plugin_weights_under_the_original_names(stock_repo, converted_fp32):
    stock_weights, plugin_weights = load_weights(stock_repo), load_weights(converted_fp32)
    renamed = {
        "llm." + name.removeprefix("language_model.") if name.startswith("language_model.") else name: tensor
        for name, tensor in plugin_weights.items()
    }
    assert stock_weights.keys() == renamed.keys()
    assert {name.split(".")[0] for name in stock_weights} == {"encoder", "encoder_projector", "llm"}
    assert "llm.model.embed_tokens.weight" in stock_weights and "llm.lm_head.weight" in stock_weights
    for name, tensor in stock_weights.items():
        assert torch.equal(tensor, renamed[name]), name


def test_tokenizer_has_the_stock_audio_token(stock_repo, converted_fp32):
    tokenizer = AutoTokenizer.from_pretrained(stock_repo)
    plugin_config = json.loads((converted_fp32 / "config.json").read_text())
    # The same free id as the plugin's <speech>: the tokenizer's length before the edit.
    assert audio_token_id(stock_repo) == plugin_config["speech_token_id"] == len(tokenizer) - 1
    assert STOCK_AUDIO_TOKEN in tokenizer.all_special_tokens
    assert spec.SPEECH_TOKEN not in tokenizer.get_vocab()
    prompt = spec.transcription_prompt(STOCK_AUDIO_TOKEN)
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"].count(audio_token_id(stock_repo)) == 1
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}]}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == prompt


def test_stock_feature_extractor_computes_the_plugin_features(stock_repo, converted_fp32):
    from vllm.transformers_utils.processors.fireredasr2 import FireRedASR2FeatureExtractor

    preprocessor = json.loads((stock_repo / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "FireRedASR2Processor"
    stock_extractor = FireRedASR2FeatureExtractor.from_pretrained(stock_repo)
    plugin_extractor = FireRedAsrFeatureExtractor.from_pretrained(converted_fp32)
    assert stock_extractor.means == plugin_extractor.cmvn_mean
    assert stock_extractor.inverse_std_variences == plugin_extractor.cmvn_istd
    assert (stock_extractor.chunk_length, stock_extractor.max_length) == (30, spec.max_fbank_frames(30))

    clip = synthetic_speech(16000, seed=9)
    stock_features = stock_extractor([clip], sampling_rate=spec.SAMPLE_RATE, return_tensors="pt")
    plugin_features = plugin_extractor.compute_features(torch.from_numpy(clip))
    num_frames = plugin_features.shape[0]
    # Stock pads every clip to max_length frames and counts the speech embeddings itself.
    assert stock_features["input_features"].shape == (1, stock_extractor.max_length, spec.NUM_MEL_BINS)
    assert stock_features["speech_lengths"].tolist() == [num_frames]
    assert stock_features["fake_token_lengths"].tolist() == [speech_embedding_count(len(clip))]
    # kaldi-native-fbank frame by frame against the vectorised fbank: float32 rounding apart
    # (fbank_atol), scaled by CMVN's inverse std, plus CMVN's own float32 roundings (the
    # mean and the difference, relative to the log-mel and mean sizes; the product).
    log_mel = kaldi_fbank(torch.from_numpy(clip)).numpy()
    mean, istd = np.asarray(plugin_extractor.cmvn_mean), np.asarray(plugin_extractor.cmvn_istd)
    cmvn_rounding = 2 * F32_EPS * (np.abs(log_mel) + np.abs(mean)) * istd + F32_EPS * plugin_features.abs().numpy()
    bound = fbank_atol(clip, log_mel) * istd + cmvn_rounding
    difference = (stock_features["input_features"][0, :num_frames] - plugin_features).abs().numpy()
    assert (difference <= bound).all()
    assert not stock_features["input_features"][0, num_frames:].any()


def test_model_card_names_the_stock_model_and_max_length(stock_repo):
    card = (stock_repo / "README.md").read_text(encoding="utf-8")
    assert STOCK_ARCHITECTURE in card and STOCK_AUDIO_TOKEN in card
    assert "fireredasr-convert SRC OUT --dtype fp32 --target stock-vllm" in card
    assert f"`max_length` = {spec.max_fbank_frames(30)} fbank frames" in card
    assert "EngineDeadError" in card


# --- the command line and bad input -------------------------------------------------------


def test_cli_dry_run_shows_the_stock_layout(tiny_release, tmp_path):
    result = CliRunner().invoke(
        main, [str(tiny_release.model_dir), str(tmp_path / "repo"), "--target", "stock-vllm", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "target: stock-vllm" in result.stdout
    assert f"tokenizer: {STOCK_AUDIO_TOKEN} added" in result.stdout and ".. llm.model." in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_unknown_target_and_pushing_a_stock_export(tiny_release, tmp_path):
    args = [str(tiny_release.model_dir), str(tmp_path / "repo")]
    unknown = CliRunner().invoke(main, [*args, "--target", "sglang"])
    assert unknown.exit_code == 2 and "'sglang' is not one of 'plugin', 'stock-vllm'" in unknown.output
    push = CliRunner().invoke(main, [*args, "--target", "stock-vllm", "--push-to-hub", "org/name"])
    assert push.exit_code == 2 and "drop --target stock-vllm" in push.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConversionError, match="unknown target 'sglang': use one of plugin, stock-vllm"):
        convert(tiny_release.model_dir, tmp_path / "repo", target="sglang")


def test_tokenizer_that_already_has_the_audio_token_is_refused(tiny_release, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(tiny_release.model_dir.parent, release, symlinks=True)
    tokenizer_path = release / tiny_release.llm_dir.name / "tokenizer.json"
    tokenizer = json.loads(tokenizer_path.read_text())
    next_id = max(token["id"] for token in tokenizer["added_tokens"]) + 1
    tokenizer["added_tokens"].append({"id": next_id, "content": STOCK_AUDIO_TOKEN, "special": True})
    tokenizer_path.write_text(json.dumps(tokenizer))
    model_dir = release / tiny_release.model_dir.name
    # The plugin format adds <speech> and does not mind; stock needs <|AUDIO|> as a new token.
    convert(model_dir, tmp_path / "plugin", dry_run=True)
    with pytest.raises(ConversionError, match=r"already has <\|AUDIO\|>"):
        convert(model_dir, tmp_path / "stock", target="stock-vllm")
    assert not (tmp_path / "stock").exists()
