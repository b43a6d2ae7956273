"""`fireredasr-score`: the recipe's normalisation and alignment against hand-computed counts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fireredasr_vllm.scoring import EditCounts, align, main, read_kaldi_text, score, scoring_tokens

# (reference, hypothesis, (reference tokens, substitutions, deletions, insertions)), counted by hand.
TABLE = [
    # One wrong character in 13.
    ("甚至出现交易几乎停滞的情况", "甚至出现交易几乎停止的情况", (13, 1, 0, 0)),
    # Chinese punctuation and spaces do not count.
    ("甚至 出现，交易。", "甚至出现交易", (6, 0, 0, 0)),
    ("（你好）！", "你好", (2, 0, 0, 0)),
    # English: words, case-insensitive, punctuation dropped.
    ("Hello, World!", "hello world", (2, 0, 0, 0)),
    ("the cat sat", "the bat sat down", (3, 1, 0, 1)),
    # Apostrophes belong to the word.
    ("don't stop", "dont stop", (2, 1, 0, 0)),
    # Mixed: Chinese characters and English words in one sequence.
    ("我用iPhone拍照", "我用 iphone 拍了照", (5, 0, 0, 1)),
    ("换一首歌", "换首歌", (4, 0, 1, 0)),
    # Special tags and <unk> are removed.
    ("<|zh|>你好<|endoftext|>", "你<unk>好", (2, 0, 0, 0)),
    ("好的", "", (2, 0, 2, 0)),
    ("", "嗯", (0, 0, 0, 1)),
    # Two equally short alignments (2 substitutions, or a deletion and an insertion):
    # the recipe prefers substitutions.
    ("A B", "B A", (2, 2, 0, 0)),
]


@pytest.mark.parametrize(("reference", "hypothesis", "counts"), TABLE)
def test_hand_computed_counts(reference, hypothesis, counts):
    assert align(scoring_tokens(reference), scoring_tokens(hypothesis)) == EditCounts(*counts)


def test_error_rates():
    # 100.0 * errors is exact and the division rounds once, as 100 / 13 does: equal bits.
    assert EditCounts(13, 1, 0, 0).error_rate == 100 / 13
    assert EditCounts(3, 1, 0, 1).error_rate == 200 / 3
    # An empty reference counts as one token, as in the recipe.
    assert EditCounts(0, 0, 0, 1).error_rate == 100.0


def test_tokens():
    assert scoring_tokens("我用iPhone 13拍照，OK?") == ["我", "用", "IPHONE", "13", "拍", "照", "OK"]


def write_text(path, transcripts):
    path.write_text("".join(f"{uttid}\t{text}\n" for uttid, text in transcripts.items()), encoding="utf-8")


def test_cli_per_utterance_and_total(tmp_path):
    references = {f"utt{i:02d}": ref for i, (ref, _, _) in enumerate(TABLE)}
    hypotheses = {f"utt{i:02d}": hyp for i, (_, hyp, _) in enumerate(TABLE)}
    write_text(tmp_path / "ref", references)
    write_text(tmp_path / "hyp", hypotheses)

    result = CliRunner().invoke(main, [str(tmp_path / "ref"), str(tmp_path / "hyp")])

    assert result.exit_code == 0, result.output
    total = sum((EditCounts(*counts) for _, _, counts in TABLE), EditCounts())
    assert (total.reference_tokens, total.errors) == (43, 11)
    assert f"CER/WER {100 * 11 / 43:.2f}%  (11 errors / 43 reference tokens" in result.output
    assert f"sub {total.substitutions} " in result.output and f"ins {total.insertions} " in result.output
    assert "utt00    7.69%  ref   13  sub   1  del   0  ins   0" in result.output
    assert f"SER {100 * 8 / 12:.2f}%  (8 / 12 utterances with errors)" in result.output


def test_missing_hypotheses_count_as_deletions_unless_skipped(tmp_path):
    write_text(tmp_path / "ref", {"a": "你好", "b": "换一首歌"})
    write_text(tmp_path / "hyp", {"a": "你好", "z": "多余"})
    references, hypotheses = read_kaldi_text(tmp_path / "ref"), read_kaldi_text(tmp_path / "hyp")

    counted = score(references, hypotheses)
    assert counted.total == EditCounts(6, 0, 4, 0)
    assert (counted.missing, counted.extra) == (["b"], ["z"])
    assert score(references, hypotheses, skip_missing=True).total == EditCounts(2, 0, 0, 0)

    result = CliRunner().invoke(main, [str(tmp_path / "ref"), str(tmp_path / "hyp"), "--summary-only"])
    assert "1 reference utterance(s) have no hypothesis (scored as empty transcripts): b" in result.output
    assert "CER/WER 66.67%" in result.output


def test_kaldi_text_reading(tmp_path):
    (tmp_path / "text").write_text("a  甚至  出现\nb\n\nc\tok\n", encoding="utf-8")
    assert read_kaldi_text(tmp_path / "text") == {"a": "甚至  出现", "b": "", "c": "ok"}
    (tmp_path / "dup").write_text("a x\na y\n", encoding="utf-8")
    result = CliRunner().invoke(main, [str(tmp_path / "dup"), str(tmp_path / "text")])
    assert result.exit_code == 1
    assert "utterance 'a' appears twice" in result.output
