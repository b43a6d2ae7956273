"""fireredasr-convert on tiny FireRedASR-AED releases: the converted repo against independent readings of the release."""

import json
import re
import shutil
import struct

import numpy as np
import pytest
import sentencepiece
import torch
from click.testing import CliRunner
from conftest import load_release_pickle, load_safetensors
from test_convert_errors import EARLIER_CONFIG, assert_refused, snapshot
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from fireredasr_converter import spec
from fireredasr_converter.aed_tokenizer import FireRedAsrAedTokenizer
from fireredasr_converter.cli import main
from fireredasr_converter.configuration import FireRedAsrAedConfig, register_with_transformers
from fireredasr_converter.errors import ConversionError
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.fixtures import TINY_AED_SHAPES, build_aed_release, synthetic_speech
from fireredasr_converter.pipeline import convert
from fireredasr_vllm.aed_reference import ReferenceFireRedAsrAed

# Text the tokenizer must treat as the original does: Chinese and English, punctuation of both
# kinds, lower case, extra and odd whitespace, unknown characters, full-width and compatibility
# forms (SentencePiece's NFKC), special-token spellings (not special to the original), nothing.
TEXTS = (
    "hello world 你好，语音识别!",
    "THE WEATHER is nice today.",
    "  今天 天气  很好 ",
    "it's 2024, OK?",
    "的一是 mixed 中文 and English 话",
    "",
    "。，？",
    "ÉCOLE straße ﬁne",
    "龘龘 unknown 字",
    "a  b\tc\nd",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "hello\u3000world",
    "Ⅻ ½ ㎏",
    "<unk> <sos>x<eos> <blank>",
    "我们一起去公园散步吧the park",
)


def original_tokenize(text: str, tokens: list[str], spm_path) -> list[int]:
    """ChineseCharEnglishSpmTokenizer.tokenize as its source reads: upper-case, punctuation to spaces,
    each CJK character a token, the rest in SentencePiece pieces, dict lookup with <unk>."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    text = re.sub("[，。？！,\\.?!]", " ", text.upper())
    cjk = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff])")
    pieces = []
    for part in cjk.split(text.strip()):
        if part.strip():
            pieces += [part] if cjk.fullmatch(part) else processor.encode_as_pieces(part.strip())
    ids = {token: i for i, token in enumerate(tokens)}
    return [ids.get(piece, ids["<unk>"]) for piece in pieces]


def original_detokenize(ids: list[int], tokens: list[str]) -> str:
    return "".join(tokens[i] for i in ids).replace("\u2581", " ").strip()


@pytest.fixture(scope="module")
def aed_release(tmp_path_factory):
    return build_aed_release(tmp_path_factory.mktemp("aed"), TINY_AED_SHAPES, seed=3)


@pytest.fixture(scope="module")
def converted(aed_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "repo"
    result = convert(aed_release.model_dir, out, dtype="fp32")
    return out, result


@pytest.fixture
def release(aed_release, tmp_path):
    """A private copy of the tiny AED release to damage."""
    return shutil.copytree(aed_release.model_dir, tmp_path / "FireRedASR-AED-L")


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text(EARLIER_CONFIG)
    (folder / "keep.txt").write_text("previous content")
    return folder


def test_files(converted):
    repo, result = converted
    assert {p.name for p in repo.iterdir()} == {
        "config.json", "generation_config.json", "preprocessor_config.json", "README.md",
        "model-00001-of-00001.safetensors", "model.safetensors.index.json",
        "tokenizer_config.json", "dict.txt", "train_bpe1000.model",
    }  # fmt: skip
    assert not result.dry_run and result.speech_token_id is None and result.num_shards == 1


def test_tensors_are_the_release_tensors(converted, aed_release):
    repo, result = converted
    state = load_release_pickle(aed_release.model_dir / "model.pth.tar")["model_state_dict"]
    stored = load_safetensors(repo, "model-*.safetensors")
    # Everything but the tied projection, stored once as the embedding.
    assert set(stored) == set(state) - {"decoder.tgt_word_prj.weight"}
    assert all(torch.equal(stored[name], state[name]) for name in stored)
    index = json.loads((repo / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in stored.values()) == result.total_size
    assert set(index["weight_map"]) == set(stored)


def test_config(converted, aed_release):
    repo, _ = converted
    register_with_transformers()
    config = AutoConfig.from_pretrained(repo)
    args = aed_release.args
    assert isinstance(config, FireRedAsrAedConfig)
    assert config.architectures == ["FireRedAsrAedForConditionalGeneration"]
    assert (config.vocab_size, config.decoder_layers, config.decoder_attention_heads, config.d_model) == (
        args.odim, args.n_layers_dec, args.n_head, args.d_model,
    )  # fmt: skip
    assert (config.decoder_ffn_dim, config.max_target_positions) == (4 * args.d_model, args.pe_maxlen)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (args.sos_id, args.eos_id, args.pad_id)
    assert config.unk_token_id == aed_release.tokens.index("<unk>")
    assert config.encoder_config.n_layers == args.n_layers_enc and config.is_encoder_decoder
    record = config.fireredasr_conversion
    assert record["converter"] == "fireredasr-convert" and record["release_layout"] == "aed"
    assert set(record["inputs"]) == {"model.pth.tar", "cmvn.ark", "dict.txt", "train_bpe1000.model"}
    assert record["inputs"]["dict.txt"]["size"] == (aed_release.model_dir / "dict.txt").stat().st_size


def test_front_end_and_generation_config(converted, aed_release):
    repo, _ = converted
    extractor = FireRedAsrFeatureExtractor.from_pretrained(repo)
    stats = np.loadtxt((aed_release.model_dir / "cmvn.txt").read_text().replace("[", "").replace("]", "").splitlines())
    mean, istd, count = spec.cmvn_from_stats(stats)
    assert extractor.cmvn_mean == mean.tolist() and extractor.cmvn_istd == istd.tolist()
    assert extractor.cmvn_frame_count == count and extractor.max_audio_seconds == 30.0
    generation = GenerationConfig.from_pretrained(repo)
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.num_beams) == (3, 4, 3)
    assert generation.fireredasr_aed_recipe == {
        "beam_size": 3, "softmax_smoothing": 1.25, "length_penalty": 0.6, "eos_penalty": 1.0,
    }  # fmt: skip


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_is_the_originals(converted, aed_release, text):
    repo, _ = converted
    register_with_transformers()
    tokenizer = AutoTokenizer.from_pretrained(repo)
    assert isinstance(tokenizer, FireRedAsrAedTokenizer)
    tokens = list(aed_release.tokens)
    expected = original_tokenize(text, tokens, aed_release.model_dir / "train_bpe1000.model")
    assert tokenizer.encode(text) == expected
    assert tokenizer(text)["input_ids"] == expected
    assert tokenizer.decode(expected) == original_detokenize(expected, tokens)


def test_tokenizer_decodes_every_id_and_skips_specials(converted, aed_release):
    repo, _ = converted
    register_with_transformers()
    tokenizer = AutoTokenizer.from_pretrained(repo)
    tokens = list(aed_release.tokens)
    ids = list(range(len(tokens)))
    assert tokenizer.decode(ids) == original_detokenize(ids, tokens)
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    assert (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 3, 4)
    word = tokens.index("▁THE")
    assert tokenizer.decode([3, word, 0, 4], skip_special_tokens=True) == "THE"
    assert tokenizer.decode([3, word, 0, 4]) == "<sos> THE<blank><eos>" == original_detokenize([3, word, 0, 4], tokens)
    assert len(tokenizer) == len(tokens)


def test_converted_repo_decodes_as_the_release(converted, aed_release):
    repo, _ = converted
    clips = [synthetic_speech(n, seed=i) for i, n in enumerate((3_000, 16_000))]
    from_repo = ReferenceFireRedAsrAed.from_pretrained(repo)
    from_release = ReferenceFireRedAsrAed.from_release(aed_release.model_dir)
    assert from_repo.transcribe(clips) == from_release.transcribe(clips)


def test_bf16_and_shards(aed_release, tmp_path):
    result = convert(aed_release.model_dir, tmp_path / "bf16", max_shard_size="1MB")
    stored = load_safetensors(tmp_path / "bf16", "model-*.safetensors")
    state = load_release_pickle(aed_release.model_dir / "model.pth.tar")["model_state_dict"]
    assert result.num_shards > 1 and len(list((tmp_path / "bf16").glob("model-*.safetensors"))) == result.num_shards
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert torch.equal(stored["decoder.layer_stack.1.mlp.w_2.weight"], state["decoder.layer_stack.1.mlp.w_2.weight"].bfloat16())


def test_dry_run_writes_nothing(aed_release, tmp_path):
    result = CliRunner().invoke(main, [str(aed_release.model_dir), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "decoder: 2 layers" in result.output and "output projection tied" in result.output
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_earlier_conversion_only(aed_release, out, tmp_path):
    convert(aed_release.model_dir, out, overwrite=True, quiet=True)
    assert (out / "dict.txt").is_file() and not (out / "keep.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError):
        convert(aed_release.model_dir, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


# --- bad input: one line, OUT untouched ------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"llm_dir": "/nonexistent"}, "leave out --llm-dir"),
        ({"lora_alpha": 8}, "leave out --lora-alpha"),
        ({"target": "stock-vllm"}, "use --target plugin"),
        ({"dtype": "int8"}, "unknown dtype"),
    ],
)
def test_options_that_do_not_apply(release, out, options, message):
    assert_refused(release, out, message, **options)


def rewrite(release, edit):
    path = release / "model.pth.tar"
    package = load_release_pickle(path)
    edit(package)
    torch.save(package, path)


def test_dict_of_another_model(release, out):
    (release / "dict.txt").write_text("".join(f"t{i} {i}\n" for i in range(10)) + "<unk> 10\n")
    assert_refused(release, out, "lists 11 tokens, the model's args say odim=")


def test_dict_with_ids_out_of_order(release, out):
    lines = (release / "dict.txt").read_text().splitlines()
    lines[5], lines[6] = lines[6], lines[5]
    (release / "dict.txt").write_text("\n".join(lines) + "\n")
    assert_refused(release, out, "line 6 gives id 6, expected 5")


def test_dict_without_unk(release, out):
    (release / "dict.txt").write_text((release / "dict.txt").read_text().replace("<unk> 1", "<unknown> 1"))
    assert_refused(release, out, "has no <unk> token")


def test_missing_or_broken_sentencepiece_model(release, out):
    (release / "train_bpe1000.model").write_bytes(b"\x00not a model")
    assert_refused(release, out, "is not a SentencePiece model")
    (release / "train_bpe1000.model").unlink()
    assert_refused(release, out, "missing")


def test_untied_output_projection(release, out):
    def untie(package):
        state = package["model_state_dict"]
        state["decoder.tgt_word_prj.weight"] = state["decoder.tgt_word_prj.weight"].clone() + 1

    rewrite(release, untie)
    assert_refused(release, out, "differs from decoder.tgt_word_emb.weight")


def test_decoder_layers_disagree_with_args(release, out):
    rewrite(release, lambda package: setattr(package["args"], "n_layers_dec", 3))
    assert_refused(release, out, "decoder.layer_stack.2.self_attn_norm.weight")


def test_bad_token_id_in_args(release, out):
    rewrite(release, lambda package: setattr(package["args"], "eos_id", 10_000))
    assert_refused(release, out, "lack a token id eos_id")


def test_unknown_tensor(release, out):
    rewrite(release, lambda package: package["model_state_dict"].__setitem__("ctc.weight", torch.zeros(2, 2)))
    assert_refused(release, out, "holds unknown tensor ctc.weight")


def test_cmvn_of_another_front_end(release, out):
    header = b"\0B" + b"DM " + b"\x04" + struct.pack("<i", 2) + b"\x04" + struct.pack("<i", 41)
    (release / "cmvn.ark").write_bytes(header + np.ones((2, 41)).tobytes())
    assert_refused(release, out, "expected 2 x 81")


def test_cli_reports_one_line(release, tmp_path):
    (release / "dict.txt").write_text("<unk> 0\n")
    result = CliRunner().invoke(main, [str(release), str(tmp_path / "new")])
    assert result.exit_code != 0
    assert "lists 1 tokens" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "new").exists()
    assert snapshot(release)  # the release itself is left as it was


def test_push_to_hub_is_refused_before_converting(aed_release, tmp_path):
    result = CliRunner().invoke(main, [str(aed_release.model_dir), str(tmp_path / "out"), "--push-to-hub", "org/name"])
    assert result.exit_code != 0
    assert "--push-to-hub uploads FireRedASR-LLM repos only so far" in result.output
    assert not (tmp_path / "out").exists()


# --- FireRedASR2-AED: the same files, plus a CTC head --------------------------------------


def test_fireredasr2_aed_release_converts_with_its_ctc_head(tmp_path):
    fixture = build_aed_release(tmp_path, TINY_AED_SHAPES, seed=4, ctc_head=True)
    assert fixture.model_dir.name == "FireRedASR2-AED"
    out = tmp_path / "repo"
    result = convert(fixture.model_dir, out, dtype="fp32", dry_run=True)
    assert "FireRedASR2-AED" in result.plan[1] and "CTC head" in result.plan[1]
    convert(fixture.model_dir, out, dtype="fp32")
    state = load_release_pickle(fixture.model_dir / "model.pth.tar")["model_state_dict"]
    stored = load_safetensors(out, "model-*.safetensors")
    for name in ("ctc.ctc_lo.weight", "ctc.ctc_lo.bias"):
        assert torch.equal(stored[name], state[name])
    register_with_transformers()
    config = AutoConfig.from_pretrained(out)
    assert config.ctc_head and config.fireredasr_conversion["release_layout"] == "aed2"
    # The head plays no part in decoding: the repo decodes as the release does.
    clips = [synthetic_speech(8_000, seed=1)]
    assert ReferenceFireRedAsrAed.from_pretrained(out).generate_ids(clips) == ReferenceFireRedAsrAed.from_release(
        fixture.model_dir
    ).generate_ids(clips)


def test_ctc_head_of_the_wrong_size(tmp_path, out):
    fixture = build_aed_release(tmp_path, TINY_AED_SHAPES, seed=4, ctc_head=True)
    rewrite(fixture.model_dir, lambda package: package["model_state_dict"].__setitem__("ctc.ctc_lo.bias", torch.zeros(3)))
    assert_refused(fixture.model_dir, out, "ctc.ctc_lo.bias in")


def test_longer_training_clips_are_served_in_segments(release, tmp_path):
    """The original README lets AED take 60 s; served here a clip is at most the segment length."""
    rewrite(release, lambda package: setattr(package["args"], "input_length_max", 60.0))
    convert(release, tmp_path / "repo", dtype="fp32", quiet=True)
    assert FireRedAsrFeatureExtractor.from_pretrained(tmp_path / "repo").max_audio_seconds == spec.MAX_CLIP_SECONDS
    rewrite(release, lambda package: setattr(package["args"], "input_length_max", float("nan")))
    with pytest.raises(ConversionError, match="input_length_max"):
        convert(release, tmp_path / "other")
