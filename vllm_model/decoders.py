"""What turns clips into transcripts: a vLLM engine with the plugin, or the plain PyTorch reference.

Both take `(key, waveform)` clips and a `Decoding` and give back `(key,
Transcript or the exception that refused the clip)` in the order the clips
finish (`recordings.ClipDecoder`), so the long-form pipeline
(`recordings.decoded_recordings`) drives either. `VllmDecoder` decodes on an
engine it is given; `VllmBackend` starts its own (and ends it on `close`).
The decoding is a `Decoding`, or for FireRedASR-AED an `AedDecoding`
(`offline.transcriptions` runs either).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .decoding import AED_GREEDY, AedDecoding, Decoding
from .engine import check_aed_decoding, create_engine, engine_settings, is_aed, shutdown_engine
from .offline import transcriptions


class VllmDecoder:
    """Clips through `offline.transcriptions` on a running engine, which stays its owner's."""

    def __init__(self, llm):
        self.llm = llm

    def close(self) -> None:
        """Nothing to end: the engine is not this decoder's."""

    def transcribe(self, clips: Iterable, decoding: Decoding | AedDecoding, *, batch_size: int):
        # batch_size counts requests; beam search keeps `beam_size` of them per clip.
        yield from transcriptions(self.llm, clips, decoding, max_in_flight=max(1, batch_size // decoding.beam_size))


class VllmBackend(VllmDecoder):
    """A `VllmDecoder` on an engine of its own, built for `decoding` (`engine.engine_settings`)."""

    def __init__(self, model: str, *, dtype: str, decoding: Decoding | AedDecoding, tensor_parallel_size: int, seed: int):
        super().__init__(
            create_engine(model, **engine_settings(decoding, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed))
        )

    def close(self) -> None:
        shutdown_engine(self.llm)


class ReferenceBackend:
    """The reference implementation (`reference.ReferenceFireRedAsrLlm`, or `aed_reference.ReferenceFireRedAsrAed`
    for a FireRedASR-AED repo): one clip at a time, as the original decodes."""

    def __init__(self, model: str, *, dtype: str):
        import torch
        from transformers import AutoConfig

        from fireredasr_converter.configuration import register_with_transformers

        from .aed_reference import ReferenceFireRedAsrAed
        from .reference import ReferenceFireRedAsrLlm

        device = "cuda" if torch.cuda.is_available() else "cpu"
        register_with_transformers()
        self.aed = is_aed(AutoConfig.from_pretrained(model))
        reference = ReferenceFireRedAsrAed if self.aed else ReferenceFireRedAsrLlm
        self.model = reference.from_pretrained(model, dtype=getattr(torch, dtype), device=device)

    def close(self) -> None:
        """Nothing to end: the model is freed with the object."""

    def transcribe(self, clips: Iterable, decoding: Decoding | AedDecoding, *, batch_size: int):
        # transformers' `generate` (FireRedASR-AED: its batch beam search), one clip at a time, as the original does.
        for key, waveform in clips:
            try:
                check_aed_decoding(self.model.config, decoding)
                if self.aed:
                    if isinstance(decoding, Decoding):  # greedy (check_aed_decoding refuses the rest)
                        decoding = dataclasses.replace(AED_GREEDY, max_new_tokens=decoding.max_new_tokens)
                    (result,) = self.model.transcribe([waveform], decoding)
                    yield key, result
                    continue
                (result,) = self.model.transcribe(
                    [waveform],
                    max_new_tokens=decoding.max_new_tokens,
                    num_beams=decoding.beam_size,
                    repetition_penalty=decoding.repetition_penalty,
                    length_penalty=decoding.length_penalty,
                )
            except ValueError as error:
                yield key, error
                continue
            yield key, result
