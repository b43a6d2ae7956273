"""The synthetic release builder writes the original FireRedASR-LLM layout faithfully."""

import argparse
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_release_pickle, load_safetensors
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from fireredasr_converter import fixtures, spec
from fireredasr_converter.fixtures.cli import main as fixtures_main
from fireredasr_converter.fixtures.layout import qwen2_config
from fireredasr_converter.fixtures import (
    LLM_L_SHAPES,
    TINY_SHAPES,
    ReleaseShapes,
    ReleaseWeights,
    build_release,
    scaled_shapes,
    synthetic_speech,
)

SHAPES = TINY_SHAPES
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def read_kaldi_binary_matrix(data: bytes) -> np.ndarray:
    """An independent reader of Kaldi's binary double matrix (no key)."""
    assert data[:2] == b"\0B", "binary marker"
    assert data[2:5] == b"DM ", "double matrix token"
    assert data[5] == 4 and data[10] == 4, "int32 size markers"
    rows = int.from_bytes(data[6:10], "little", signed=True)
    cols = int.from_bytes(data[11:15], "little", signed=True)
    body = data[15:]
    assert len(body) == rows * cols * 8
    return np.frombuffer(body, dtype="<f8").reshape(rows, cols)


def conformer_block_shapes(d: int, heads: int, kernel: int) -> dict[str, tuple[int, ...]]:
    """One `encoder.layer_stack.{i}` block of the original, as the reference lists it."""
    d_k = d // heads
    shapes = {}
    for ffn in ("ffn1", "ffn2"):
        shapes |= {
            f"{ffn}.net.0.weight": (d,),
            f"{ffn}.net.0.bias": (d,),
            f"{ffn}.net.1.weight": (4 * d, d),
            f"{ffn}.net.1.bias": (4 * d,),
            f"{ffn}.net.4.weight": (d, 4 * d),
            f"{ffn}.net.4.bias": (d,),
        }
    shapes |= {
        "mhsa.pos_bias_u": (heads, d_k),
        "mhsa.pos_bias_v": (heads, d_k),
        "mhsa.w_qs.weight": (d, d),
        "mhsa.w_ks.weight": (d, d),
        "mhsa.w_vs.weight": (d, d),
        "mhsa.fc.weight": (d, d),
        "mhsa.linear_pos.weight": (d, d),
        "conv.pointwise_conv1.weight": (4 * d, d, 1),
        "conv.depthwise_conv.weight": (2 * d, 1, kernel),
        "conv.batch_norm.weight": (2 * d,),
        "conv.batch_norm.bias": (2 * d,),
        "conv.pointwise_conv2.weight": (d, 2 * d, 1),
    }
    for norm in ("mhsa.layer_norm_q", "mhsa.layer_norm_k", "mhsa.layer_norm_v", "conv.pre_layer_norm", "layer_norm"):
        shapes |= {f"{norm}.weight": (d,), f"{norm}.bias": (d,)}
    return shapes


def expected_encoder_shapes(shapes: ReleaseShapes) -> dict[str, tuple[int, ...]]:
    d = shapes.encoder_dim
    expected = {
        "encoder.input_preprocessor.conv.0.weight": (32, 1, 3, 3),
        "encoder.input_preprocessor.conv.0.bias": (32,),
        "encoder.input_preprocessor.conv.2.weight": (32, 32, 3, 3),
        "encoder.input_preprocessor.conv.2.bias": (32,),
        "encoder.input_preprocessor.out.weight": (d, 32 * 19),
        "encoder.input_preprocessor.out.bias": (d,),
        "encoder.positional_encoding.pe": (1, 2 * 5000 - 1, d),
    }
    block = conformer_block_shapes(d, shapes.encoder_heads, shapes.encoder_kernel)
    for layer in range(shapes.encoder_layers):
        expected |= {f"encoder.layer_stack.{layer}.{name}": shape for name, shape in block.items()}
    return expected


@pytest.fixture(scope="module")
def v1_release(tmp_path_factory):
    return build_release(tmp_path_factory.mktemp("v1"), SHAPES, variant="v1", seed=0)


@pytest.fixture(scope="module")
def v1_package(v1_release):
    return load_release_pickle(v1_release.model_dir / "model.pth.tar")


@pytest.fixture(scope="module")
def qwen2_tokenizer(v1_release):
    return AutoTokenizer.from_pretrained(v1_release.model_dir / "Qwen2-7B-Instruct")


# --- layout ----------------------------------------------------------------------


def test_v1_layout_has_relative_qwen2_symlink(v1_release, tmp_path):
    model_dir, llm_dir = v1_release.model_dir, v1_release.llm_dir
    assert model_dir.name == "FireRedASR-LLM-L"
    assert {p.name for p in model_dir.iterdir()} == {
        "model.pth.tar",
        "asr_encoder.pth.tar",
        "cmvn.ark",
        "cmvn.txt",
        "config.yaml",
        "Qwen2-7B-Instruct",
    }
    link = model_dir / "Qwen2-7B-Instruct"
    assert link.is_symlink() and str(link.readlink()) == "../Qwen2-7B-Instruct"
    assert link.resolve() == llm_dir.resolve() == (model_dir.parent / "Qwen2-7B-Instruct").resolve()
    assert not llm_dir.is_symlink()
    assert (model_dir / "config.yaml").read_text() == ""
    assert {p.name for p in llm_dir.iterdir()} == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    }
    # Relative, so it stays valid wherever the release is copied.
    copy = shutil.copytree(model_dir.parent, tmp_path / "copy", symlinks=True)
    assert (copy / "FireRedASR-LLM-L" / "Qwen2-7B-Instruct").resolve() == (copy / "Qwen2-7B-Instruct").resolve()


def test_v2_layout_bundles_qwen2_and_args_only_asr_encoder(tmp_path):
    release = build_release(tmp_path, SHAPES, variant="v2")
    assert release.model_dir == tmp_path / "FireRedASR2-LLM"
    assert release.llm_dir == release.model_dir / "Qwen2-7B-Instruct"
    assert release.llm_dir.is_dir() and not release.llm_dir.is_symlink()
    assert not (tmp_path / "Qwen2-7B-Instruct").exists()
    assert set(load_release_pickle(release.model_dir / "asr_encoder.pth.tar")) == {"args"}
    assert (release.llm_dir / "model.safetensors.index.json").is_file()


def test_refuses_to_overwrite_a_release(v1_release):
    with pytest.raises(FileExistsError, match="already exists"):
        build_release(v1_release.model_dir.parent, SHAPES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "v3"}, "unknown variant"),
        ({"encoder_source": "aed"}, "unknown encoder_source"),
        ({"llm_dtype": torch.int8}, "llm_dtype"),
        ({"llm_shards": 0}, "llm_shards"),
        ({"llm_shards": 1000}, "leaves a shard empty"),
    ],
)
def test_rejects_bad_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_release(tmp_path, SHAPES, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written for a rejected build"


# --- model.pth.tar -----------------------------------------------------------------


def test_model_checkpoint_args(v1_package):
    assert set(v1_package) == {"args", "model_state_dict"}
    args = v1_package["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.freeze_encoder, args.freeze_llm, args.use_lora, args.use_fp16, args.use_flash_attn) == (0, 0, 1, 0, 0)
    assert args.encoder_downsample_rate == 2
    assert (args.input_length_max, args.input_length_min) == (30.0, 0.1)
    assert (args.output_length_max, args.output_length_min) == (150, 1)
    assert {"encoder_path", "llm_dir", "unk"} <= set(vars(args))


def test_model_checkpoint_encoder_keys_match_the_original(v1_package):
    state = v1_package["model_state_dict"]
    encoder = {name: tuple(t.shape) for name, t in state.items() if name.startswith("encoder.")}
    assert encoder == expected_encoder_shapes(SHAPES)
    assert torch.equal(state["encoder.positional_encoding.pe"], spec.relative_position_table(SHAPES.encoder_dim))
    assert all(t.dtype == torch.float32 for t in state.values())


def test_model_checkpoint_adapter_and_lora(v1_package):
    state = v1_package["model_state_dict"]
    hidden, rank = SHAPES.llm_hidden, SHAPES.lora_rank
    assert tuple(state["encoder_projector.linear1.weight"].shape) == (hidden, 2 * SHAPES.encoder_dim)
    assert tuple(state["encoder_projector.linear1.bias"].shape) == (hidden,)
    assert tuple(state["encoder_projector.linear2.weight"].shape) == (hidden, hidden)
    assert tuple(state["encoder_projector.linear2.bias"].shape) == (hidden,)

    llm_keys = [name for name in state if name.startswith("llm.")]
    # LoRA only: 7 targets x (A, B) per layer, no base Qwen2 weights.
    assert len(llm_keys) == SHAPES.llm_layers * 7 * 2
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in llm_keys)
    assert set(state) == set(llm_keys) | {k for k in state if k.startswith(("encoder.", "encoder_projector."))}

    kv = SHAPES.llm_kv_heads * SHAPES.llm_head_dim
    inter = SHAPES.llm_intermediate
    dims = {  # (in, out) of each target
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    for layer in range(SHAPES.llm_layers):
        for target, (in_features, out_features) in dims.items():
            prefix = f"llm.base_model.model.model.layers.{layer}.{target}"
            lora_a = state[f"{prefix}.lora_A.default.weight"]
            lora_b = state[f"{prefix}.lora_B.default.weight"]
            assert tuple(lora_a.shape) == (rank, in_features)
            assert tuple(lora_b.shape) == (out_features, rank)
            assert lora_b.abs().min() > 0


def test_lora_merge_changes_the_base_weights_substantially(v1_release, v1_package):
    state = v1_package["model_state_dict"]
    base = load_safetensors(v1_release.llm_dir, names={"model.layers.0.self_attn.q_proj.weight"})
    weight = base["model.layers.0.self_attn.q_proj.weight"].float()
    prefix = "llm.base_model.model.model.layers.0.self_attn.q_proj"
    delta = spec.lora_scale(v1_release.lora_alpha, SHAPES.lora_rank) * (
        state[f"{prefix}.lora_B.default.weight"] @ state[f"{prefix}.lora_A.default.weight"]
    )
    assert v1_release.lora_alpha == 16
    assert 0.1 < (delta.norm() / weight.norm()).item() < 0.5


def test_llm_l_shapes_have_the_released_parameter_counts():
    # Reference: encoder 710.5 M, adapter 22.0 M, Qwen2-7B 7615.6 M; LoRA 392 tensors.
    shapes = LLM_L_SHAPES
    encoder = sum(math.prod(s) for name, s in expected_encoder_shapes(shapes).items() if not name.endswith(".pe"))
    assert round(encoder / 1e6, 1) == 710.5
    assert len(expected_encoder_shapes(shapes)) == 551
    adapter = 2 * shapes.encoder_dim * shapes.llm_hidden + shapes.llm_hidden**2 + 2 * shapes.llm_hidden
    assert round(adapter / 1e6, 1) == 22.0
    config = qwen2_config(shapes, torch.bfloat16, dict.fromkeys(QWEN2_SPECIALS, 0))
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        qwen2 = Qwen2ForCausalLM(config)
    assert round(sum(p.numel() for p in qwen2.parameters()) / 1e6, 1) == 7615.6


# --- asr_encoder.pth.tar ---------------------------------------------------------------


def test_asr_encoder_args(v1_release):
    package = load_release_pickle(v1_release.model_dir / "asr_encoder.pth.tar")
    assert set(package) == {"args"}
    args = package["args"]
    assert (args.idim, args.n_layers_enc, args.n_head, args.d_model, args.kernel_size) == (
        80,
        SHAPES.encoder_layers,
        SHAPES.encoder_heads,
        SHAPES.encoder_dim,
        33,
    )
    assert (args.pe_maxlen, args.residual_dropout, args.dropout_rate) == (5000, 0.1, 0.1)
    assert {"odim", "n_layers_dec", "d_inner", "sos_id", "eos_id", "pad_id", "blank_id"} <= set(vars(args))


def test_asr_encoder_decoy_weights_differ_from_the_llm_encoder(v1_package, tmp_path):
    release = build_release(tmp_path, SHAPES, seed=0, asr_encoder_weights=True)
    model_state = load_release_pickle(release.model_dir / "model.pth.tar")["model_state_dict"]
    aed_state = load_release_pickle(release.model_dir / "asr_encoder.pth.tar")["model_state_dict"]
    # model.pth.tar is the same as without decoys.
    for name, tensor in v1_package["model_state_dict"].items():
        assert torch.equal(model_state[name], tensor)
    aed_encoder = {k: v for k, v in aed_state.items() if k.startswith("encoder.")}
    assert {k: tuple(v.shape) for k, v in aed_encoder.items()} == expected_encoder_shapes(SHAPES)
    assert any(k.startswith("decoder.") for k in aed_state)
    learned = [k for k in aed_encoder if not k.endswith(".pe")]
    assert not any(torch.equal(aed_encoder[k], model_state[k]) for k in learned)


def test_encoder_only_in_asr_encoder(v1_package, tmp_path):
    release = build_release(tmp_path, SHAPES, seed=0, encoder_source="asr_encoder")
    package = load_release_pickle(release.model_dir / "model.pth.tar")
    assert package["args"].freeze_encoder == 1
    assert not any(k.startswith("encoder.") for k in package["model_state_dict"])
    assert any(k.startswith("encoder_projector.") for k in package["model_state_dict"])
    aed_state = load_release_pickle(release.model_dir / "asr_encoder.pth.tar")["model_state_dict"]
    # The same encoder a default release keeps in model.pth.tar, now only here.
    for name, tensor in v1_package["model_state_dict"].items():
        if name.startswith("encoder."):
            assert torch.equal(aed_state[name], tensor)


# --- cmvn ---------------------------------------------------------------------------------


def test_cmvn_ark_is_a_kaldi_binary_double_matrix_of_plausible_stats(v1_release):
    stats = read_kaldi_binary_matrix((v1_release.model_dir / "cmvn.ark").read_bytes())
    assert stats.shape == (2, 81)
    count = stats[0, -1]
    assert count >= 1000 and count == int(count)
    assert stats[1, -1] == 0
    mean = stats[0, :-1] / count
    variance = stats[1, :-1] / count - mean**2
    assert np.all(variance > 0.1) and np.all(np.abs(mean) < 30)
    spec_mean, istd, spec_count = spec.cmvn_from_stats(stats)
    # The same float64 division of the same numbers: identical on every CPU.
    assert spec_count == count and np.array_equal(spec_mean, mean) and np.all(np.isfinite(istd))

    text = (v1_release.model_dir / "cmvn.txt").read_text()
    assert text.strip().startswith("[") and text.strip().endswith("]")
    values = np.array([float(v) for v in text.replace("[", " ").replace("]", " ").split()])
    assert np.array_equal(values.reshape(2, 81), stats)


def test_cmvn_normalises_synthetic_speech_to_unit_scale(v1_release):
    from fireredasr_converter.feature_extraction import kaldi_fbank

    stats = read_kaldi_binary_matrix((v1_release.model_dir / "cmvn.ark").read_bytes())
    mean, istd, _ = spec.cmvn_from_stats(stats)
    features = kaldi_fbank(torch.from_numpy(synthetic_speech(5 * 16000, seed=3))).numpy()
    normalised = (features - mean) * istd
    assert abs(normalised.mean()) < 0.5 and 0.5 < normalised.std() < 2.0


# --- Qwen2 folder -------------------------------------------------------------------------


def test_qwen2_weights_match_transformers_qwen2(v1_release):
    llm_dir = v1_release.llm_dir
    config = json.loads((llm_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (1e6, 1e-6, False)
    assert config["torch_dtype"] == "bfloat16"
    assert config["vocab_size"] == SHAPES.llm_vocab_rows
    assert config["bos_token_id"] == SHAPES.bpe_vocab_size  # <|endoftext|>
    assert config["eos_token_id"] == SHAPES.bpe_vocab_size + 2  # <|im_end|>

    tensors = load_safetensors(llm_dir)
    expected = Qwen2ForCausalLM(AutoConfig.from_pretrained(llm_dir)).state_dict()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors

    index = json.loads((llm_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(llm_dir / "model-00001-of-00002.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_qwen2_forward_is_finite_and_varied(v1_release, qwen2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(v1_release.llm_dir, dtype=torch.float32)
    input_ids = qwen2_tokenizer(spec.transcription_prompt(), return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits[0]
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 10
    assert len(set(logits.argmax(-1).tolist())) > 3


def test_single_shard_and_fp32_llm(tmp_path):
    release = build_release(tmp_path, SHAPES, llm_dtype=torch.float32, llm_shards=1)
    assert not (release.llm_dir / "model.safetensors.index.json").exists()
    tensors = load_safetensors(release.llm_dir)
    assert [p.name for p in release.llm_dir.glob("*.safetensors")] == ["model.safetensors"]
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert json.loads((release.llm_dir / "config.json").read_text())["torch_dtype"] == "float32"


def test_same_seed_same_release_other_seed_other_weights(v1_release, v1_package, tmp_path):
    again = build_release(tmp_path / "again", SHAPES, seed=0)
    other = build_release(tmp_path / "other", SHAPES, seed=1)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (again.llm_dir / shard).read_bytes() == (v1_release.llm_dir / shard).read_bytes()
        assert (other.llm_dir / shard).read_bytes() != (v1_release.llm_dir / shard).read_bytes()
    state = v1_package["model_state_dict"]
    again_state = load_release_pickle(again.model_dir / "model.pth.tar")["model_state_dict"]
    other_state = load_release_pickle(other.model_dir / "model.pth.tar")["model_state_dict"]
    assert all(torch.equal(again_state[k], v) for k, v in state.items())
    assert not torch.equal(other_state["encoder_projector.linear1.weight"], state["encoder_projector.linear1.weight"])
    assert (again.model_dir / "cmvn.ark").read_bytes() == (v1_release.model_dir / "cmvn.ark").read_bytes()


def given_weights_of(release, package) -> ReleaseWeights:
    """A written release's own tensors and statistics, as `ReleaseWeights` (what a trainer hands over)."""
    model = {k: v for k, v in package["model_state_dict"].items() if k != "encoder.positional_encoding.pe"}
    stats = read_kaldi_binary_matrix((release.model_dir / "cmvn.ark").read_bytes())
    return ReleaseWeights(model=model, llm=load_safetensors(release.llm_dir), cmvn_stats=stats)


def test_given_weights_replace_every_random_tensor(v1_release, v1_package, tmp_path):
    """A trained model goes through the same writer: a release of given tensors holds exactly those."""
    given = given_weights_of(v1_release, v1_package)
    # Another seed: nothing random may remain.
    written = build_release(tmp_path / "given", SHAPES, seed=5, weights=given)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (written.llm_dir / shard).read_bytes() == (v1_release.llm_dir / shard).read_bytes()
    state = load_release_pickle(written.model_dir / "model.pth.tar")["model_state_dict"]
    assert state.keys() == v1_package["model_state_dict"].keys()
    assert all(torch.equal(state[k], v) for k, v in v1_package["model_state_dict"].items())
    assert (written.model_dir / "cmvn.ark").read_bytes() == (v1_release.model_dir / "cmvn.ark").read_bytes()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop", "the given model weights lack encoder_projector.linear1.weight"),
        ("reshape", r"given llm tensor lm_head.weight has shape \(1, "),
        ("extra", "no place for: \\['model:encoder.unused'\\]"),
    ],
)
def test_given_weights_that_do_not_fit_are_refused(v1_release, v1_package, tmp_path, damage, message):
    given = given_weights_of(v1_release, v1_package)
    model, llm = dict(given.model), dict(given.llm)
    if damage == "drop":
        del model["encoder_projector.linear1.weight"]
    elif damage == "reshape":
        llm["lm_head.weight"] = llm["lm_head.weight"][:1]
    else:
        model["encoder.unused"] = torch.zeros(1)
    with pytest.raises(ValueError, match=message):
        build_release(tmp_path / damage, SHAPES, weights=ReleaseWeights(model, llm, given.cmvn_stats))


def test_tokenizer_corpus_makes_its_words_single_tokens(tmp_path):
    words = ["zebrafinch", " zebrafinch", "鹦鹉"]
    assert any(len(fixtures.build_tokenizer(SHAPES.bpe_vocab_size).encode(w).ids) > 1 for w in words)
    release = build_release(tmp_path / "corpus", SHAPES, tokenizer_corpus=words * 32)
    tokenizer = AutoTokenizer.from_pretrained(release.llm_dir)
    assert [len(tokenizer.encode(w, add_special_tokens=False)) for w in words] == [1, 1, 1]


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_special_ids_follow_the_regular_vocabulary(v1_release, qwen2_tokenizer):
    regular = SHAPES.bpe_vocab_size
    vocab = json.loads((v1_release.llm_dir / "vocab.json").read_text())
    assert len(vocab) == regular and not set(QWEN2_SPECIALS) & set(vocab)
    assert sorted(vocab.values()) == list(range(regular))
    assert qwen2_tokenizer.convert_tokens_to_ids(list(QWEN2_SPECIALS)) == [regular, regular + 1, regular + 2]
    assert len(qwen2_tokenizer) == regular + 3 < SHAPES.llm_vocab_rows
    assert qwen2_tokenizer.eos_token == "<|im_end|>" and qwen2_tokenizer.pad_token == "<|endoftext|>"
    assert qwen2_tokenizer.bos_token is None
    assert (v1_release.llm_dir / "merges.txt").read_text().startswith("#version")


def test_tokenizer_encodes_the_prompt_with_single_special_tokens(qwen2_tokenizer):
    regular = SHAPES.bpe_vocab_size
    ids = qwen2_tokenizer("<|im_start|>user\n").input_ids
    assert ids[0] == regular + 1 and regular + 1 not in ids[1:]
    assert all(i < regular for i in ids[1:])
    prompt = spec.transcription_prompt("")
    prompt_ids = qwen2_tokenizer(prompt).input_ids
    assert prompt_ids.count(regular + 1) == 2 and prompt_ids.count(regular + 2) == 1
    assert qwen2_tokenizer.decode(prompt_ids) == prompt


def test_tokenizer_config_is_qwen2_like(v1_release, qwen2_tokenizer):
    config = json.loads((v1_release.llm_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert config["errors"] == "replace"
    rendered = qwen2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


def test_large_vocabulary_puts_specials_where_qwen2_has_them():
    tokenizer = fixtures.build_tokenizer(LLM_L_SHAPES.bpe_vocab_size)
    assert [tokenizer.token_to_id(t) for t in QWEN2_SPECIALS] == [151643, 151644, 151645]
    assert tokenizer.get_vocab_size() == 151646
    text = "请转写音频为文字 and some English"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


# --- shapes, audio and command line -------------------------------------------------------------


def test_scaled_shapes_keep_head_sizes_and_ratios():
    assert scaled_shapes(LLM_L_SHAPES, 1.0) == LLM_L_SHAPES
    assert scaled_shapes(TINY_SHAPES, 1.0) == TINY_SHAPES
    quarter = scaled_shapes(LLM_L_SHAPES, 0.25)
    assert quarter.encoder_head_dim == LLM_L_SHAPES.encoder_head_dim
    assert quarter.llm_head_dim == LLM_L_SHAPES.llm_head_dim
    assert quarter.llm_heads // quarter.llm_kv_heads == LLM_L_SHAPES.llm_heads // LLM_L_SHAPES.llm_kv_heads
    assert quarter.encoder_layers == 4 and quarter.llm_layers == 7
    assert quarter.llm_hidden < LLM_L_SHAPES.llm_hidden and quarter.llm_intermediate < LLM_L_SHAPES.llm_intermediate
    assert quarter.llm_vocab_rows == LLM_L_SHAPES.llm_vocab_rows
    for scale in (0.0, 1.5):
        with pytest.raises(ValueError, match="scale"):
            scaled_shapes(LLM_L_SHAPES, scale)


def test_release_shapes_reject_inconsistent_sizes():
    fields = {f: getattr(TINY_SHAPES, f) for f in TINY_SHAPES.__dataclass_fields__}
    with pytest.raises(ValueError, match="llm_heads 2 must be divisible by llm_kv_heads 3"):
        ReleaseShapes(**{**fields, "llm_kv_heads": 3})
    with pytest.raises(ValueError, match="llm_vocab_rows"):
        ReleaseShapes(**{**fields, "llm_vocab_rows": fields["bpe_vocab_size"] + 3})


def test_synthetic_speech_is_deterministic_speech_like_audio():
    clip = synthetic_speech(3 * 16000, seed=7)
    assert clip.dtype == np.float32 and clip.shape == (48000,)
    assert np.abs(clip).max() <= 1.0
    assert np.array_equal(clip, synthetic_speech(3 * 16000, seed=7))
    assert not np.array_equal(clip, synthetic_speech(3 * 16000, seed=8))
    # Syllables and pauses: loudness varies strongly from one 25 ms frame to another.
    frame_rms = np.sqrt((clip[: 48000 // 400 * 400].reshape(-1, 400) ** 2).mean(axis=1))
    assert frame_rms.max() > 0.05 and frame_rms.min() < 0.2 * frame_rms.max()
    # Mostly voiced energy below 4 kHz, as in speech.
    spectrum = np.abs(np.fft.rfft(clip)) ** 2
    assert spectrum[: len(spectrum) // 2].sum() > 0.9 * spectrum.sum()
    assert synthetic_speech(0).shape == (0,)
    with pytest.raises(ValueError, match="num_samples"):
        synthetic_speech(-1)


@pytest.mark.slow
def test_python_m_builds_a_release(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fireredasr_converter.fixtures", str(tmp_path), "--variant", "v2", "--seed", "3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "FireRedASR2-LLM" / "Qwen2-7B-Instruct" / "config.json").is_file()
    assert (tmp_path / "FireRedASR2-LLM" / "model.pth.tar").is_file()


def test_command_line_builds_a_release(tmp_path):
    result = CliRunner().invoke(fixtures_main, [str(tmp_path), "--variant", "v2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "FireRedASR2-LLM" / "Qwen2-7B-Instruct" / "config.json").is_file()
    assert (tmp_path / "FireRedASR2-LLM" / "model.pth.tar").is_file()

    again = CliRunner().invoke(fixtures_main, [str(tmp_path), "--variant", "v2"])
    assert again.exit_code != 0 and "already exists" in again.output
    bad_scale = CliRunner().invoke(fixtures_main, [str(tmp_path / "x"), "--scale", "2"])
    assert bad_scale.exit_code != 0 and "scale must be in (0, 1]" in bad_scale.output
