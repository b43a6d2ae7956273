"""The facts of FireRedASR-AED that every part of the project shares.

FireRedASR-AED is the Conformer encoder of `spec` followed by a Transformer
decoder (self-attention, cross-attention over the encoder output, GELU MLP,
pre-LayerNorms, absolute sinusoidal positions, output projection tied to the
token embedding) over the vocabulary of `dict.txt`. The converter, the
reference, the plugin and the tests import these definitions: the position
table, the tokenizer's text rules, and the decoding recipe of the original.
"""

from __future__ import annotations

import re

import torch

# --- release files ------------------------------------------------------------

DICT_FILE = "dict.txt"
SPM_FILE = "train_bpe1000.model"

# --- tokenizer (ChineseCharEnglishSpmTokenizer) --------------------------------

UNK_TOKEN = "<unk>"
# A dict.txt line holding this token stands for a space.
SPACE_TOKEN = "<space>"
# SentencePiece's word-start marker; decoded as a space.
SPM_SPACE = "\u2581"
# Each of these characters is one token; the text between them goes to SentencePiece.
CJK_CHARACTER = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff])")
# Replaced by a space before tokenizing.
PUNCTUATION = re.compile(r"[，。？！,.?!]")

# --- decoding -------------------------------------------------------------------

# The score of the beams that do not exist yet at the first step, and of a finished
# beam's extensions other than EOS: the original's `INF`.
BEAM_FILL_SCORE = -1e10
# The README's recommended decoding (beam 3, softmax smoothing 1.25, GNMT length
# penalty 0.6, no EOS penalty), also the values of its example script.
RECIPE_BEAM_SIZE = 3
RECIPE_SOFTMAX_SMOOTHING = 1.25
RECIPE_LENGTH_PENALTY = 0.6
RECIPE_EOS_PENALTY = 1.0


def absolute_position_table(d_model: int, max_len: int) -> torch.Tensor:
    """The decoder's sinusoidal position table, [1, max_len, d_model] float32.

    Row p: even columns sin(p * w_i), odd columns cos(p * w_i), w_i =
    10000^(-2i / d_model), computed in float32 as the original does (its float32
    log(10000) included), so it equals the checkpoint's buffer
    `decoder.positional_encoding.pe` bit for bit.
    """
    if d_model % 2:
        raise ValueError(f"the position table needs an even d_model, got {d_model}")
    cpu32 = {"device": "cpu", "dtype": torch.float32}
    log_base = torch.log(torch.tensor(10000.0, **cpu32)).item()
    inv_freq = torch.exp(torch.arange(0, d_model, 2, **cpu32) * -(log_base / d_model))
    angles = torch.arange(0, max_len, **cpu32).unsqueeze(1) * inv_freq
    table = torch.zeros(max_len, d_model, **cpu32)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.unsqueeze(0)


def embedding_scale(d_model: int) -> float:
    """The token embedding's multiplier before the positions are added: sqrt(d_model).

    Written as the original writes it (`d_model ** 0.5`), so the float is the same.
    """
    return d_model**0.5
