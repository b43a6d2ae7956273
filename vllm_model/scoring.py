"""`fireredasr-score REF HYP`: character/word error rates of Kaldi `text` files.

Scored the way the original FireRedASR recipe scores (its `wer.py`, run with
special tags removed): special tags `<|...|>` and `<unk>` are dropped, the
recipe's punctuation becomes spaces, the text is upper-cased, and it is cut into
tokens: every Chinese character (CJK Unified Ideographs, U+4E00-U+9FFF) is one
token, everything else is split into words at whitespace. So a Chinese utterance
is scored by characters (CER), an English one by words (WER), and mixed speech by
both at once. Tokens are aligned by Levenshtein distance with unit costs; where
several alignments are equally short, the recipe's preference decides how the
errors split into substitutions, deletions and insertions (match or substitute,
then delete, then insert), so the S/D/I counts equal the recipe's as well.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

# Characters the recipe turns into spaces before tokenising. ASCII: sentence
# punctuation, quotes, brackets and a few symbols, but not the apostrophe or the
# hyphen, which belong to English words.
_ASCII_PUNCTUATION = ",.?!\":;()[]{}/`|=+"
# Full-width forms of ASCII punctuation and symbols, and the half-width CJK marks.
_FULLWIDTH_PUNCTUATION = "！＂＃＄％＆＇（）＊＋，－／：；＜＝＞？＠［＼］＾＿｀｛｜｝～｟｠｡｢｣､"
# CJK symbols (ideographic space, comma, full stop, brackets, quotes, wave dash, ...).
_CJK_PUNCTUATION = "　、。〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
# General punctuation: dashes, curly quotes, ellipsis, middle dots, small form variants.
_GENERAL_PUNCTUATION = "–—‘’‛“”„‟…‧·﹏﹑﹔"
SCORING_PUNCTUATION = _ASCII_PUNCTUATION + _FULLWIDTH_PUNCTUATION + _CJK_PUNCTUATION + _GENERAL_PUNCTUATION

_PUNCTUATION_RUN = re.compile("[" + re.escape(SCORING_PUNCTUATION) + "]+")
_SPECIAL_TAG = re.compile(r"<\|.*?\|>")
_UNKNOWN = "<unk>"
_CHINESE_CHARACTER = re.compile("([\u4e00-\u9fff])")


def scoring_tokens(text: str) -> list[str]:
    """Normalise one transcript and cut it into the tokens the error rate counts."""
    text = _SPECIAL_TAG.sub(" ", text).replace(_UNKNOWN, "")
    text = _PUNCTUATION_RUN.sub(" ", text).upper()
    tokens: list[str] = []
    # The capturing group keeps each Chinese character as its own piece.
    for piece in _CHINESE_CHARACTER.split(text):
        if _CHINESE_CHARACTER.fullmatch(piece):
            tokens.append(piece)
        else:
            tokens.extend(piece.split())
    return tokens


@dataclass(frozen=True)
class EditCounts:
    """Reference length and the edits that turn the reference into the hypothesis."""

    reference_tokens: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> float:
        """Errors per reference token, in percent (an empty reference counts as one token)."""
        return 100.0 * self.errors / max(self.reference_tokens, 1)

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(
            self.reference_tokens + other.reference_tokens,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )


_MATCH_OR_SUBSTITUTE, _DELETE, _INSERT = 0, 1, 2


def align(reference: Sequence[str], hypothesis: Sequence[str]) -> EditCounts:
    """Minimum edit distance between two token lists, split into S/D/I."""
    num_ref, num_hyp = len(reference), len(hypothesis)
    # cost[i][j]: edits turning reference[:i] into hypothesis[:j]; step[i][j]: the last edit.
    cost = [[0] * (num_hyp + 1) for _ in range(num_ref + 1)]
    step = [[_MATCH_OR_SUBSTITUTE] * (num_hyp + 1) for _ in range(num_ref + 1)]
    for j in range(1, num_hyp + 1):
        cost[0][j], step[0][j] = j, _INSERT
    for i in range(1, num_ref + 1):
        cost[i][0], step[i][0] = i, _DELETE
        previous_row, row, row_step = cost[i - 1], cost[i], step[i]
        ref_token = reference[i - 1]
        for j in range(1, num_hyp + 1):
            best = previous_row[j - 1] + (ref_token != hypothesis[j - 1])
            choice = _MATCH_OR_SUBSTITUTE
            # Only a strictly cheaper edit displaces the earlier preference.
            if previous_row[j] + 1 < best:
                best, choice = previous_row[j] + 1, _DELETE
            if row[j - 1] + 1 < best:
                best, choice = row[j - 1] + 1, _INSERT
            row[j], row_step[j] = best, choice

    substitutions = deletions = insertions = 0
    i, j = num_ref, num_hyp
    while i > 0 or j > 0:
        choice = step[i][j]
        if choice == _MATCH_OR_SUBSTITUTE:
            substitutions += reference[i - 1] != hypothesis[j - 1]
            i, j = i - 1, j - 1
        elif choice == _DELETE:
            deletions += 1
            i -= 1
        else:
            insertions += 1
            j -= 1
    return EditCounts(num_ref, substitutions, deletions, insertions)


def read_kaldi_text(path: Path) -> dict[str, str]:
    """A Kaldi `text` file: `uttid` then the transcript (may be empty) on each line."""
    transcripts: dict[str, str] = {}
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, 1):
            fields = line.strip().split(maxsplit=1)
            if not fields:
                continue
            uttid = fields[0]
            if uttid in transcripts:
                raise ValueError(f"{path}:{line_number}: utterance {uttid!r} appears twice; keep one line per utterance")
            transcripts[uttid] = fields[1] if len(fields) > 1 else ""
    return transcripts


@dataclass
class ScoreReport:
    per_utterance: dict[str, EditCounts] = field(default_factory=dict)
    total: EditCounts = field(default_factory=EditCounts)
    # Reference utterances without a hypothesis, and hypotheses without a reference.
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def utterances_with_errors(self) -> int:
        return sum(counts.errors > 0 for counts in self.per_utterance.values())

    @property
    def sentence_error_rate(self) -> float:
        return 100.0 * self.utterances_with_errors / max(len(self.per_utterance), 1)


def score(references: Mapping[str, str], hypotheses: Mapping[str, str], *, skip_missing: bool = False) -> ScoreReport:
    """Score every reference utterance. One without a hypothesis counts as an empty
    transcript (all its tokens deleted) unless `skip_missing`, which leaves it out as
    the recipe does."""
    report = ScoreReport()
    for uttid, reference in references.items():
        if uttid not in hypotheses:
            report.missing.append(uttid)
            if skip_missing:
                continue
        counts = align(scoring_tokens(reference), scoring_tokens(hypotheses.get(uttid, "")))
        report.per_utterance[uttid] = counts
        report.total += counts
    report.extra = [uttid for uttid in hypotheses if uttid not in references]
    return report


def _counts_line(counts: EditCounts) -> str:
    return (
        f"{counts.error_rate:6.2f}%  ref {counts.reference_tokens:4d}  sub {counts.substitutions:3d}  "
        f"del {counts.deletions:3d}  ins {counts.insertions:3d}"
    )


def format_report(report: ScoreReport, *, per_utterance: bool = True) -> str:
    lines = []
    if per_utterance:
        width = max((len(uttid) for uttid in report.per_utterance), default=0)
        lines += [f"{uttid:<{width}}  {_counts_line(counts)}" for uttid, counts in report.per_utterance.items()]
        lines.append("-" * 72)
    total = report.total
    ref = max(total.reference_tokens, 1)
    lines += [
        f"CER/WER {total.error_rate:.2f}%  ({total.errors} errors / {total.reference_tokens} reference tokens: "
        f"Chinese characters + English words)",
        f"sub {total.substitutions} ({100 * total.substitutions / ref:.2f}%)  "
        f"del {total.deletions} ({100 * total.deletions / ref:.2f}%)  "
        f"ins {total.insertions} ({100 * total.insertions / ref:.2f}%)",
        f"SER {report.sentence_error_rate:.2f}%  ({report.utterances_with_errors} / "
        f"{len(report.per_utterance)} utterances with errors)",
    ]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("ref", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("hyp", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--skip-missing",
    is_flag=True,
    help="Leave out reference utterances that HYP lacks (the recipe's behaviour) instead of scoring them as empty.",
)
@click.option("--summary-only", is_flag=True, help="Print only the totals, not a line per utterance.")
def main(ref: Path, hyp: Path, skip_missing: bool, summary_only: bool) -> None:
    """Character/word error rate of HYP against REF (Kaldi `text` files: uttid, then the transcript).

    Normalised as the original FireRedASR recipe scores: punctuation and special
    tags removed, case folded, Chinese compared character by character and
    English word by word. Prints a line per utterance and the totals with
    substitution, deletion and insertion counts.
    """
    try:
        references, hypotheses = read_kaldi_text(ref), read_kaldi_text(hyp)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    if not references:
        click.echo(f"error: {ref} holds no utterances; give a Kaldi text file (uttid transcript per line)", err=True)
        sys.exit(1)
    report = score(references, hypotheses, skip_missing=skip_missing)
    if report.missing:
        treatment = "left out" if skip_missing else "scored as empty transcripts"
        click.echo(
            f"warning: {len(report.missing)} reference utterance(s) have no hypothesis ({treatment}): "
            f"{', '.join(report.missing[:5])}{' ...' if len(report.missing) > 5 else ''}",
            err=True,
        )
    if report.extra:
        click.echo(f"warning: {len(report.extra)} hypothesis utterance(s) are not in {ref} and are ignored", err=True)
    click.echo(format_report(report, per_utterance=not summary_only))


if __name__ == "__main__":
    main()
