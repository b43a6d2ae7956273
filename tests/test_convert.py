"""fireredasr-convert on tiny releases: the converted repo against independent recomputations."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_release_pickle, load_safetensors
from safetensors import safe_open
from tolerances import F32_EPS
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from fireredasr_converter import spec
from fireredasr_converter.cli import main
from fireredasr_converter.configuration import ARCHITECTURE, FireRedAsrLlmConfig, register_with_transformers
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.fixtures import TINY_SHAPES, build_release
from fireredasr_converter.pipeline import convert

LORA_KEY = "llm.base_model.model.{target}.lora_{factor}.default.weight"


def load_repo(repo: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(repo, "model-*.safetensors")


def expected_tensors(release, lora_alpha: float = spec.LORA_DEFAULT_ALPHA, encoder_from: str = "model.pth.tar"):
    """The converted repo's tensors in fp32, recomputed from the release files (merges in float64)."""
    return recompute(release, lora_alpha, encoder_from)[0]


def recompute(release, lora_alpha: float = spec.LORA_DEFAULT_ALPHA, encoder_from: str = "model.pth.tar"):
    """`expected_tensors`, and for each merged weight the size of its terms: |W| + scale * |B| @ |A|."""
    model_state = load_release_pickle(release.model_dir / "model.pth.tar")["model_state_dict"]
    encoder_state = load_release_pickle(release.model_dir / encoder_from)["model_state_dict"]
    expected = {k: v.float() for k, v in encoder_state.items() if k.startswith("encoder.")}
    expected.update({k: v.float() for k, v in model_state.items() if k.startswith("encoder_projector.")})
    term_sizes = {}
    scale = lora_alpha / release.shapes.lora_rank
    for name, weight in load_safetensors(release.llm_dir).items():
        target = name.removesuffix(".weight")
        lora_a = model_state.get(LORA_KEY.format(target=target, factor="A"))
        if lora_a is not None:
            lora_b = model_state[LORA_KEY.format(target=target, factor="B")]
            term_sizes[f"language_model.{name}"] = weight.double().abs() + scale * (lora_b.double().abs() @ lora_a.double().abs())
            weight = weight.double() + scale * (lora_b.double() @ lora_a.double())
        expected[f"language_model.{name}"] = weight.float()
    return expected, term_sizes


def merged_names(release) -> set[str]:
    return {
        f"language_model.model.layers.{layer}.{module}.weight"
        for layer in range(release.shapes.llm_layers)
        for module in spec.LORA_TARGET_MODULES
    }


def assert_matches_recomputation(repo: Path, release, **expected_kwargs) -> None:
    converted = load_repo(repo)
    expected, term_sizes = recompute(release, **expected_kwargs)
    assert converted.keys() == expected.keys()
    merged = merged_names(release)
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32, name
        if name in merged:
            # The converter merges W + s * B @ A in float32 (a rank-r sum, the scaling and
            # the add: r + 2 roundings of at most eps times the terms' size); the
            # recomputation in float64 rounds once more to float32 (half an ulp).
            bound = (release.shapes.lora_rank + 3) * F32_EPS * term_sizes[name]
            assert ((tensor.double() - expected[name].double()).abs() <= bound).all(), name
        else:
            assert torch.equal(tensor, expected[name]), name


@pytest.fixture(scope="module")
def v2_release(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("release-v2"), TINY_SHAPES, variant="v2", seed=1)


@pytest.fixture(scope="module")
def converted_v2_fp32(v2_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted-v2") / "repo"
    convert(v2_release.model_dir, out, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def converted_bf16_sharded(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted-bf16") / "repo"
    result = convert(tiny_release.model_dir, out, max_shard_size="1MB")
    assert result.num_shards > 1
    return out


def test_v1_fp32_tensors_equal_independent_recomputation(tiny_release, converted_fp32):
    assert_matches_recomputation(converted_fp32, tiny_release)


def test_v2_fp32_tensors_equal_independent_recomputation(v2_release, converted_v2_fp32):
    assert not (v2_release.model_dir / "Qwen2-7B-Instruct").is_symlink()
    assert_matches_recomputation(converted_v2_fp32, v2_release)


def test_bf16_output_is_the_fp32_merge_cast_once(converted_fp32, converted_bf16_sharded):
    fp32 = load_repo(converted_fp32)
    bf16 = load_repo(converted_bf16_sharded)
    assert bf16.keys() == fp32.keys()
    for name, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, fp32[name].to(torch.bfloat16)), name


def test_shards_and_index_follow_the_format(converted_bf16_sharded):
    index = json.loads((converted_bf16_sharded / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(weight_map)
    shards = sorted(converted_bf16_sharded.glob("model-*.safetensors"))
    count = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(weight_map.values()) == {s.name for s in shards}
    shard_sizes = []
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            shard_sizes.append(0)
            for name in f.keys():
                assert weight_map[name] == shard.name
                tensor = f.get_tensor(name)
                shard_sizes[-1] += tensor.numel() * tensor.element_size()
            # --max-shard-size 1MB bounds a shard's tensor bytes, unless one tensor alone is larger.
            assert shard_sizes[-1] <= 1_000_000 or len(f.keys()) == 1
    assert index["metadata"]["total_size"] == sum(shard_sizes)


def test_lora_alpha_option_changes_the_scale(tiny_release, tmp_path):
    out = tmp_path / "repo"
    convert(tiny_release.model_dir, out, dtype="fp32", lora_alpha=32)
    assert_matches_recomputation(out, tiny_release, lora_alpha=32)
    conversion = json.loads((out / "config.json").read_text())["fireredasr_conversion"]
    assert conversion["lora"]["alpha"] == 32 and conversion["options"]["lora_alpha"] == 32


def test_config_values_equal_fixture_parameters(tiny_release, converted_fp32):
    register_with_transformers()
    config = AutoConfig.from_pretrained(converted_fp32)
    shapes = tiny_release.shapes
    assert isinstance(config, FireRedAsrLlmConfig)
    assert config.architectures == [ARCHITECTURE]
    encoder = config.encoder_config
    assert (encoder.idim, encoder.n_layers, encoder.n_head, encoder.d_model, encoder.kernel_size) == (
        shapes.idim,
        shapes.encoder_layers,
        shapes.encoder_heads,
        shapes.encoder_dim,
        shapes.encoder_kernel,
    )
    assert encoder.relative_position_max_len == spec.RELATIVE_POSITION_MAX_LEN
    text = config.text_config
    assert text.model_type == "qwen2"
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        shapes.llm_hidden,
        shapes.llm_layers,
        shapes.llm_heads,
        shapes.llm_kv_heads,
    )
    assert (text.intermediate_size, text.vocab_size) == (shapes.llm_intermediate, shapes.llm_vocab_rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_release.llm_dir)
    assert text.pad_token_id == tokenizer.convert_tokens_to_ids(spec.PAD_TOKEN)
    assert text.bos_token_id == tokenizer.convert_tokens_to_ids(spec.BOS_TOKEN)
    assert text.eos_token_id == tokenizer.convert_tokens_to_ids(spec.EOS_TOKEN)
    assert config.speech_token_id == len(tokenizer) == shapes.bpe_vocab_size + len(spec.QWEN2_SPECIAL_TOKENS)
    assert config.encoder_downsample_rate == 2
    assert config.dtype == torch.float32


def test_provenance_records_inputs_and_options(tiny_release, converted_fp32):
    conversion = json.loads((converted_fp32 / "config.json").read_text())["fireredasr_conversion"]
    model_checkpoint = tiny_release.model_dir / "model.pth.tar"
    assert conversion["inputs"]["model.pth.tar"] == {
        "size": model_checkpoint.stat().st_size,
        "sha256": hashlib.sha256(model_checkpoint.read_bytes()).hexdigest(),
    }
    for shard in tiny_release.llm_dir.glob("*.safetensors"):
        entry = conversion["inputs"][f"Qwen2-7B-Instruct/{shard.name}"]
        assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert {"asr_encoder.pth.tar", "cmvn.ark", "Qwen2-7B-Instruct/tokenizer.json"} <= conversion["inputs"].keys()
    assert conversion["options"]["dtype"] == "fp32"
    assert conversion["converter_version"] == "0.1.0"
    assert conversion["lora"] == {"rank": tiny_release.shapes.lora_rank, "alpha": 16, "merged_weights": 14}
    assert str(tiny_release.model_dir) not in (converted_fp32 / "config.json").read_text()


def test_tokenizer_round_trips_the_prompt(tiny_release, converted_fp32):
    register_with_transformers()
    tokenizer = AutoTokenizer.from_pretrained(converted_fp32)
    speech_id = tokenizer.convert_tokens_to_ids(spec.SPEECH_TOKEN)
    assert speech_id == len(tokenizer) - 1
    assert spec.SPEECH_TOKEN in tokenizer.all_special_tokens
    prompt = spec.transcription_prompt()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(speech_id) == 1
    assert tokenizer.decode(ids) == prompt
    assert spec.SPEECH_TOKEN not in tokenizer.decode(ids, skip_special_tokens=True)
    # Chat completions render a user turn holding audio as exactly the original prompt.
    for content in ([{"type": "audio"}], [{"type": "audio"}, {"type": "text", "text": "ignored"}], "<speech>"):
        messages = [{"role": "user", "content": content}]
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt


def test_tokenizer_files_copied_or_extended(tiny_release, converted_fp32):
    for name in ("vocab.json", "merges.txt"):
        assert (converted_fp32 / name).read_bytes() == (tiny_release.llm_dir / name).read_bytes()
    source = json.loads((tiny_release.llm_dir / "tokenizer.json").read_text())
    written = json.loads((converted_fp32 / "tokenizer.json").read_text())
    speech_id = written["added_tokens"][-1]["id"]
    assert written["added_tokens"][:-1] == source["added_tokens"]
    assert written["added_tokens"][-1]["content"] == spec.SPEECH_TOKEN and written["added_tokens"][-1]["special"]
    assert {k: v for k, v in written.items() if k != "added_tokens"} == {
        k: v for k, v in source.items() if k != "added_tokens"
    }
    source_config = json.loads((tiny_release.llm_dir / "tokenizer_config.json").read_text())
    written_config = json.loads((converted_fp32 / "tokenizer_config.json").read_text())
    assert written_config["additional_special_tokens"] == source_config["additional_special_tokens"] + ["<speech>"]
    assert written_config["added_tokens_decoder"][str(speech_id)]["content"] == spec.SPEECH_TOKEN
    # The embedding keeps its rows: <speech> uses a spare one.
    assert load_repo(converted_fp32)["language_model.model.embed_tokens.weight"].shape[0] > speech_id


def test_preprocessor_and_generation_configs(tiny_release, converted_fp32):
    # Read the binary Kaldi matrix by hand: "\0B" "DM " then two (size byte, int32) dims.
    data = (tiny_release.model_dir / "cmvn.ark").read_bytes()
    stats = np.frombuffer(data[15:], dtype="<f8").reshape(2, spec.NUM_MEL_BINS + 1)
    count = stats[0, -1]
    mean = stats[0, :-1] / count
    istd = 1 / np.sqrt(np.maximum(stats[1, :-1] / count - mean**2, 1e-20))
    extractor = FireRedAsrFeatureExtractor.from_pretrained(converted_fp32)
    # The converter does these float64 operations in the same order, each correctly rounded
    # (IEEE 754) on every CPU, and JSON keeps every bit: identical.
    np.testing.assert_array_equal(extractor.cmvn_mean, mean)
    np.testing.assert_array_equal(extractor.cmvn_istd, istd)
    assert extractor.cmvn_frame_count == count
    assert extractor.sampling_rate == spec.SAMPLE_RATE and extractor.max_audio_seconds == 30.0

    generation = GenerationConfig.from_pretrained(converted_fp32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_release.llm_dir)
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids(spec.EOS_TOKEN)
    assert generation.pad_token_id == tokenizer.convert_tokens_to_ids(spec.PAD_TOKEN)
    assert generation.bos_token_id == tokenizer.convert_tokens_to_ids(spec.BOS_TOKEN)
    assert generation.do_sample is False and generation.num_beams == 1


def test_model_card(converted_fp32, converted_v2_fp32):
    text = (converted_fp32 / "README.md").read_text()
    _, front_matter, body = text.split("---\n", 2)
    card = yaml.safe_load(front_matter)
    assert card["license"] == "apache-2.0"
    assert card["pipeline_tag"] == "automatic-speech-recognition"
    assert card["library_name"] == "vllm"
    assert card["base_model"] == ["Qwen/Qwen2-7B-Instruct", "FireRedTeam/FireRedASR-LLM-L"]
    assert set(card["language"]) == {"zh", "en"}
    assert {"fireredasr", "vllm", "speech-recognition"} <= set(card["tags"])
    assert "| AISHELL-1 test | 0.76 |" in body and "vllm serve" in body and "--dtype fp32" in body
    v2_card = (converted_v2_fp32 / "README.md").read_text()
    assert "FireRedTeam/FireRedASR2-LLM" in v2_card and "| AISHELL-1 test | 0.64 |" in v2_card


def test_encoder_comes_from_model_checkpoint_despite_decoy_weights(tmp_path):
    release = build_release(tmp_path / "release", TINY_SHAPES, asr_encoder_weights=True, seed=2)
    decoy = load_release_pickle(release.model_dir / "asr_encoder.pth.tar")["model_state_dict"]
    out = tmp_path / "repo"
    convert(release.model_dir, out, dtype="fp32")
    assert_matches_recomputation(out, release)
    converted = load_repo(out)
    name = "encoder.layer_stack.0.mhsa.w_qs.weight"
    assert not torch.equal(converted[name], decoy[name])


def test_encoder_comes_from_asr_encoder_when_model_checkpoint_lacks_it(tmp_path):
    release = build_release(tmp_path / "release", TINY_SHAPES, encoder_source="asr_encoder", seed=3)
    assert not any(
        k.startswith("encoder.") for k in load_release_pickle(release.model_dir / "model.pth.tar")["model_state_dict"]
    )
    out = tmp_path / "repo"
    convert(release.model_dir, out, dtype="fp32")
    assert_matches_recomputation(out, release, encoder_from="asr_encoder.pth.tar")
    assert not any(name.startswith("decoder.") for name in load_repo(out))


def test_release_without_lora_keeps_qwen2_weights(tiny_release, tmp_path):
    root = tmp_path / "release"
    shutil.copytree(tiny_release.model_dir.parent, root, symlinks=True)
    src = root / tiny_release.model_dir.name
    package = load_release_pickle(src / "model.pth.tar")
    package["model_state_dict"] = {k: v for k, v in package["model_state_dict"].items() if not k.startswith("llm.")}
    package["args"].freeze_llm = 1  # the original then leaves Qwen2 as released
    torch.save(package, src / "model.pth.tar")
    out = tmp_path / "repo"
    result = convert(src, out, dtype="fp32")
    assert "LoRA: none" in "\n".join(result.plan)
    converted = load_repo(out)
    for name, weight in load_safetensors(root / "Qwen2-7B-Instruct").items():
        assert torch.equal(converted[f"language_model.{name}"], weight.float()), name
    assert json.loads((out / "config.json").read_text())["fireredasr_conversion"]["lora"] is None


def test_llm_dir_option_replaces_the_symlink(tiny_release, tmp_path):
    src = tmp_path / "release"
    src.mkdir()
    for path in tiny_release.model_dir.iterdir():
        if not path.is_symlink():
            os.symlink(path, src / path.name)
    out = tmp_path / "repo"
    convert(src, out, llm_dir=tiny_release.llm_dir, dtype="fp32")
    assert load_repo(out).keys() == expected_tensors(tiny_release).keys()
    assert json.loads((out / "config.json").read_text())["fireredasr_conversion"]["options"]["llm_dir_given"]


def test_dry_run_writes_nothing(tiny_release, tmp_path):
    out = tmp_path / "repo"
    result = convert(tiny_release.model_dir, out, dry_run=True, max_shard_size="1MB")
    assert result.dry_run and result.num_shards > 1
    assert list(tmp_path.iterdir()) == []
    plan = "\n".join(result.plan)
    assert "model-00001-of-" in plan and "bfloat16" in plan and "LoRA: rank 8" in plan


def test_cli_dry_run_prints_the_plan(tiny_release, tmp_path):
    result = CliRunner().invoke(
        main, [str(tiny_release.model_dir), str(tmp_path / "repo"), "--dry-run", "--dtype", "fp16"]
    )
    assert result.exit_code == 0, result.output
    assert "output: float16" in result.stdout and "dry run: nothing written" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_overwrite_replaces_a_previous_repo(tiny_release, tmp_path):
    out = tmp_path / "repo"
    args = [str(tiny_release.model_dir), str(out), "--quiet", "--max-shard-size", "2MB"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (out / "stale.txt").write_text("old")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "pass --overwrite" in refused.stderr
    replaced = CliRunner().invoke(main, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert replaced.stderr == ""


@pytest.mark.slow
def test_console_script_in_a_real_process(tiny_release, tmp_path):
    script = Path(sys.executable).parent / "fireredasr-convert"
    out = tmp_path / "repo"
    completed = subprocess.run(
        [str(script), str(tiny_release.model_dir), str(out), "--dtype", "fp32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "tensors" in completed.stderr and "done:" in completed.stderr
    assert_matches_recomputation(out, tiny_release)
