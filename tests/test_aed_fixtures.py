"""The synthetic FireRedASR-AED release builder writes the original layout faithfully."""

import argparse
import math

import numpy as np
import pytest
import sentencepiece
import torch
from click.testing import CliRunner
from conftest import load_release_pickle
from test_fixtures import expected_encoder_shapes, read_kaldi_binary_matrix

from fireredasr_converter import aed_spec, spec
from fireredasr_converter.fixtures import AED_L_SHAPES, TINY_AED_SHAPES, AedShapes, build_aed_release
from fireredasr_converter.fixtures.aed_tokenizer import build_aed_tokenizer
from fireredasr_converter.fixtures.cli import main as fixtures_main

SHAPES = TINY_AED_SHAPES


def expected_decoder_shapes(d: int, layers: int, vocab: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """The original TransformerDecoder's state dict, listed from its module structure."""
    expected = {"decoder.tgt_word_emb.weight": (vocab, d), "decoder.positional_encoding.pe": (1, max_len, d)}
    for layer in range(layers):
        prefix = f"decoder.layer_stack.{layer}"
        for attention in ("self_attn", "cross_attn"):
            expected |= {f"{prefix}.{attention}_norm.weight": (d,), f"{prefix}.{attention}_norm.bias": (d,)}
            expected |= {
                f"{prefix}.{attention}.w_qs.weight": (d, d),
                f"{prefix}.{attention}.w_qs.bias": (d,),
                f"{prefix}.{attention}.w_ks.weight": (d, d),
                f"{prefix}.{attention}.w_vs.weight": (d, d),
                f"{prefix}.{attention}.w_vs.bias": (d,),
                f"{prefix}.{attention}.fc.weight": (d, d),
                f"{prefix}.{attention}.fc.bias": (d,),
            }
        expected |= {
            f"{prefix}.mlp_norm.weight": (d,),
            f"{prefix}.mlp_norm.bias": (d,),
            f"{prefix}.mlp.w_1.weight": (4 * d, d),
            f"{prefix}.mlp.w_1.bias": (4 * d,),
            f"{prefix}.mlp.w_2.weight": (d, 4 * d),
            f"{prefix}.mlp.w_2.bias": (d,),
        }
    expected |= {
        "decoder.tgt_word_prj.weight": (vocab, d),
        "decoder.layer_norm_out.weight": (d,),
        "decoder.layer_norm_out.bias": (d,),
    }
    return expected


def sinusoid_table(d: int, max_len: int) -> torch.Tensor:
    """sin/cos of p * 10000^(-2i/d) at positions 0..max_len-1, computed in float64."""
    position = np.arange(max_len, dtype=np.float64)[:, None]
    angles = position * np.exp(np.arange(0, d, 2) * -(math.log(10000.0) / d))
    table = np.zeros((max_len, d))
    table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles)
    return torch.from_numpy(table)


@pytest.fixture(scope="module")
def aed_release(tmp_path_factory):
    return build_aed_release(tmp_path_factory.mktemp("aed"), SHAPES, seed=0)


@pytest.fixture(scope="module")
def aed_package(aed_release):
    return load_release_pickle(aed_release.model_dir / "model.pth.tar")


def test_layout(aed_release):
    assert aed_release.model_dir.name == "FireRedASR-AED-L"
    assert {p.name for p in aed_release.model_dir.iterdir()} == {
        "model.pth.tar", "cmvn.ark", "cmvn.txt", "dict.txt", "train_bpe1000.model",
    }  # fmt: skip


def test_args_are_the_original_constructors(aed_package, aed_release):
    assert set(aed_package) == {"args", "model_state_dict"}
    args = aed_package["args"]
    assert isinstance(args, argparse.Namespace)
    # Every argument FireRedAsrAed(args) reads.
    assert (args.idim, args.n_layers_enc, args.n_layers_dec, args.n_head, args.d_model, args.kernel_size) == (
        80, SHAPES.encoder_layers, SHAPES.decoder_layers, SHAPES.encoder_heads, SHAPES.encoder_dim, 33,
    )  # fmt: skip
    assert args.odim == len(aed_release.tokens)
    assert (args.blank_id, args.pad_id, args.sos_id, args.eos_id, args.pe_maxlen) == (0, 2, 3, 4, 5000)
    assert 0 <= args.residual_dropout < 1 and 0 <= args.dropout_rate < 1


def test_state_dict_has_the_original_names_and_shapes(aed_package):
    state = aed_package["model_state_dict"]
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    expected = expected_encoder_shapes(SHAPES) | expected_decoder_shapes(
        SHAPES.encoder_dim, SHAPES.decoder_layers, aed_package["args"].odim, 5000
    )
    assert shapes == expected
    # The original's module order: encoder, then decoder (embedding, positions, layers, projection, final norm).
    names = list(state)
    assert names.index("decoder.tgt_word_emb.weight") == len(expected_encoder_shapes(SHAPES))
    assert names[-3:] == ["decoder.tgt_word_prj.weight", "decoder.layer_norm_out.weight", "decoder.layer_norm_out.bias"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())


def test_output_projection_is_tied_and_padding_row_zero(aed_package):
    state = aed_package["model_state_dict"]
    embedding, projection = state["decoder.tgt_word_emb.weight"], state["decoder.tgt_word_prj.weight"]
    # One storage, as state_dict() of a module with tied weights saves it.
    assert embedding.untyped_storage().data_ptr() == projection.untyped_storage().data_ptr()
    pad = aed_package["args"].pad_id
    assert not embedding[pad].any()
    assert embedding[pad + 1].abs().sum() > 0


def test_position_tables(aed_package):
    state = aed_package["model_state_dict"]
    d = SHAPES.encoder_dim
    decoder_pe = state["decoder.positional_encoding.pe"]
    assert torch.equal(decoder_pe, aed_spec.absolute_position_table(d, 5000))
    # float32 sin/cos of float32 angles: within a few ulp of the float64 values at angles up to 5000.
    assert torch.allclose(decoder_pe[0].double(), sinusoid_table(d, 5000), atol=5000 * 2**-23, rtol=0)
    assert torch.equal(state["encoder.positional_encoding.pe"], spec.relative_position_table(d))


def test_dict_and_sentencepiece_model(aed_release):
    lines = (aed_release.model_dir / "dict.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(" ") for line in lines] == [[t, str(i)] for i, t in enumerate(aed_release.tokens)]
    assert lines[:5] == ["<blank> 0", "<unk> 1", "<pad> 2", "<sos> 3", "<eos> 4"]
    tokens = aed_release.tokens
    assert len(set(tokens)) == len(tokens)
    chinese = [t for t in tokens if aed_spec.CJK_CHARACTER.fullmatch(t)]
    assert len(chinese) == SHAPES.chinese_chars

    processor = sentencepiece.SentencePieceProcessor(model_file=str(aed_release.model_dir / "train_bpe1000.model"))
    assert processor.get_piece_size() == SHAPES.spm_vocab_size
    regular = [
        processor.id_to_piece(i)
        for i in range(processor.get_piece_size())
        if not (processor.is_control(i) or processor.is_unknown(i))
    ]
    assert len(regular) == SHAPES.spm_vocab_size - 3
    assert set(regular) <= set(tokens), "every regular piece is in dict.txt, as the original asks"
    # Upper-case English: every letter is a piece, and words encode without unknown pieces.
    assert {chr(c) for c in range(ord("A"), ord("Z") + 1)} <= set(regular)
    assert all(piece in tokens for piece in processor.encode_as_pieces("SPEECH RECOGNITION 2024"))


def test_cmvn_files(aed_release):
    stats = read_kaldi_binary_matrix((aed_release.model_dir / "cmvn.ark").read_bytes())
    assert stats.shape == (2, 81)
    mean, istd, count = spec.cmvn_from_stats(stats)
    assert count >= 1 and np.isfinite(mean).all() and (istd > 0).all()


def test_builds_are_reproducible_and_seeded(tmp_path, aed_release):
    again = build_aed_release(tmp_path / "again", SHAPES, seed=0)
    other = build_aed_release(tmp_path / "other", SHAPES, seed=1)
    for name in ("dict.txt", "train_bpe1000.model", "cmvn.ark"):
        assert (again.model_dir / name).read_bytes() == (aed_release.model_dir / name).read_bytes()
    first = load_release_pickle(aed_release.model_dir / "model.pth.tar")["model_state_dict"]
    second = load_release_pickle(again.model_dir / "model.pth.tar")["model_state_dict"]
    third = load_release_pickle(other.model_dir / "model.pth.tar")["model_state_dict"]
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["decoder.layer_stack.0.mlp.w_1.weight"], third["decoder.layer_stack.0.mlp.w_1.weight"])


def test_refuses_to_overwrite(aed_release):
    with pytest.raises(FileExistsError, match="already exists"):
        build_aed_release(aed_release.model_dir.parent, SHAPES)


def test_shapes_checks_and_the_released_size():
    with pytest.raises(ValueError, match="divisible by encoder_heads"):
        AedShapes(encoder_layers=1, encoder_heads=3, encoder_dim=64, decoder_layers=1, chinese_chars=1, spm_vocab_size=80)
    with pytest.raises(ValueError, match="encoder_kernel"):
        AedShapes(encoder_layers=1, encoder_heads=4, encoder_dim=64, encoder_kernel=4, decoder_layers=1,
                  chinese_chars=1, spm_vocab_size=80)  # fmt: skip
    # FireRedASR-AED-L: 7832 output tokens, about 1.1 B parameters (the paper's figure).
    s = AED_L_SHAPES
    assert 5 + s.chinese_chars + s.spm_vocab_size - 3 == 7832
    d = s.encoder_dim
    encoder = sum(
        math.prod(shape) for name, shape in expected_encoder_shapes(s).items() if name != "encoder.positional_encoding.pe"
    )
    decoder = sum(
        math.prod(shape)
        for name, shape in expected_decoder_shapes(d, s.decoder_layers, 7832, 5000).items()
        if name not in ("decoder.positional_encoding.pe", "decoder.tgt_word_prj.weight")
    )
    assert 1.05e9 < encoder + decoder < 1.2e9
    # Its vocabulary is one the builder can make (a SentencePiece model of more pieces than the
    # fixture corpus holds failed to train: `fireredasr-fixtures --model aed --shapes aed-l` failed).
    tokens = build_aed_tokenizer(s.chinese_chars, s.spm_vocab_size).tokens
    assert len(tokens) == 7832 and len(set(tokens)) == 7832


def test_cli_writes_an_aed_release(tmp_path):
    result = CliRunner().invoke(fixtures_main, [str(tmp_path), "--model", "aed"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "FireRedASR-AED-L" / "dict.txt").is_file()
    refused = CliRunner().invoke(fixtures_main, [str(tmp_path / "x"), "--model", "aed", "--shapes", "llm-l"])
    assert refused.exit_code != 0 and "--shapes llm-l is not a --model aed size" in refused.output
    assert not (tmp_path / "x").exists()
