"""How to decode: the original's `generate` arguments, checked in one place.

`Decoding` is what the offline API, the CLI, the reference and the beam search
take; `ORIGINAL_RECIPE` is FireRedASR-LLM's published setting and `GREEDY` the
plain default. `AedDecoding`, `AED_RECIPE` and `AED_GREEDY` are FireRedASR-AED's.
Nothing here runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from fireredasr_converter import aed_spec


@dataclass(frozen=True)
class Decoding:
    """How to decode: the original's `generate` arguments.

    `beam_size` 1 is greedy decoding; `repetition_penalty` is transformers'
    (generated tokens only, see `repetition_penalty.py`); `length_penalty` only
    matters for beam search (score = summed log-probabilities / generated
    length ** length_penalty); `max_new_tokens=None` is the original's per-clip
    limit N, one token per speech embedding.
    """

    beam_size: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self):
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"beam_size must be an integer of at least 1, got {self.beam_size!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty < float("inf")):
            raise ValueError(f"repetition_penalty must be a finite number above 0, got {self.repetition_penalty!r}")
        if not (isinstance(self.length_penalty, (int, float)) and abs(self.length_penalty) < float("inf")):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 (or None for N), got {self.max_new_tokens}")

    @property
    def needs_penalty_processor(self) -> bool:
        """Whether an engine serving this decoding needs the HF repetition penalty's logits processor."""
        return self.repetition_penalty != 1.0

    @classmethod
    def original(cls) -> Decoding:
        """The original's published recipe: beam 3, repetition penalty 3.0, length penalty 1.0, N tokens at most."""
        return cls(beam_size=3, repetition_penalty=3.0, length_penalty=1.0)


ORIGINAL_RECIPE = Decoding.original()
GREEDY = Decoding()


@dataclass(frozen=True)
class AedDecoding:
    """How FireRedASR-AED decodes: the arguments of the original's batch beam search.

    `beam_size` 1 is its greedy case (the same search with one beam);
    `softmax_smoothing` divides the logits before the log-softmax;
    `length_penalty` > 0 divides a finished hypothesis's score by
    ((5 + length) / 6) ** length_penalty (GNMT; length counts the start token);
    `eos_penalty` in (0, 1] multiplies EOS's log-probability (below 1 ends
    hypotheses sooner); `max_new_tokens=None` is the original's
    `decode_max_len=0`, one token per encoder frame of the clip; a number
    replaces that limit for every clip, above it too, as `decode_max_len` does.
    """

    beam_size: int = aed_spec.RECIPE_BEAM_SIZE
    softmax_smoothing: float = aed_spec.RECIPE_SOFTMAX_SMOOTHING
    length_penalty: float = aed_spec.RECIPE_LENGTH_PENALTY
    eos_penalty: float = aed_spec.RECIPE_EOS_PENALTY
    max_new_tokens: int | None = None

    def __post_init__(self):
        if isinstance(self.beam_size, bool) or not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"beam_size must be an integer of at least 1, got {self.beam_size!r}")
        if not (_is_number(self.softmax_smoothing) and 0 < self.softmax_smoothing < float("inf")):
            raise ValueError(f"softmax_smoothing must be a finite number above 0, got {self.softmax_smoothing!r}")
        if not (_is_number(self.length_penalty) and abs(self.length_penalty) < float("inf")):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not (_is_number(self.eos_penalty) and 0 < self.eos_penalty <= 1):
            raise ValueError(f"eos_penalty must lie in (0, 1], got {self.eos_penalty!r}")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an integer of at least 1 (or None), got {self.max_new_tokens!r}")

    @property
    def is_greedy(self) -> bool:
        """One beam and no EOS penalty: the search takes the best token at every step, which is
        vLLM's own greedy decoding (the smoothing and the length penalty change no choice)."""
        return self.beam_size == 1 and self.eos_penalty == 1.0

    @property
    def needs_penalty_processor(self) -> bool:
        """The original's AED search has no repetition penalty: the engine needs no logits processor."""
        return False


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


# FireRedASR-AED's recipe (the README's values) and its greedy decoding.
AED_RECIPE = AedDecoding()
AED_GREEDY = AedDecoding(beam_size=1, softmax_smoothing=1.0, length_penalty=0.0, eos_penalty=1.0)
