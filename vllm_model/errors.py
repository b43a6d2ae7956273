"""The transcription side's error types: what a caller of `FireRedAsr` or `fireredasr-transcribe` can be told.

Every message is one line naming the problem and, where there is one, the fix:
`fireredasr-transcribe` prints it as is (`skipped UTTID: MESSAGE` for one
recording, `error: MESSAGE` for the run). `TranscriptionError` is the base of all;
a recording's own failure is one of `AudioError`, `TooLongForModel` or
`EngineError`, and never stops the other recordings of a batch.
"""

from __future__ import annotations


class TranscriptionError(Exception):
    """Something could not be transcribed; the message says what and why, in one line."""


class AudioError(TranscriptionError, ValueError):
    """One recording's audio cannot be transcribed (unreadable, cut off, empty, too short, NaN...)."""


class TooLongForModel(TranscriptionError, ValueError):
    """A clip needs more positions than the engine holds (its `max_model_len`)."""


class EngineError(TranscriptionError):
    """The engine refused a clip for another reason than its audio, or failed while decoding."""


class InputError(TranscriptionError, ValueError):
    """The lists that name the recordings are unusable (duplicate ids, unreadable wav.scp): nothing is decoded."""


class TranscriptionFailed(TranscriptionError):
    """Nothing can be transcribed: the model (or `fireredasr-transcribe`'s output) cannot be opened."""


# How vLLM words a prompt longer than its engine's `max_model_len` (vllm.v1.engine.input_processor,
# 0.32-0.34); its exception type is the same as for other refused requests.
_VLLM_TOO_LONG = "longer than the maximum model length"


def recording_error(error: Exception) -> TranscriptionError:
    """A clip's refusal as the typed error of its recording, with the same message.

    The decoders hand back what refused a clip: the typed errors above, the
    model processor's ValueErrors about the audio, or vLLM's request errors.
    """
    if isinstance(error, TranscriptionError):
        return error
    message = str(error) or type(error).__name__
    if _VLLM_TOO_LONG in message:
        typed: TranscriptionError = TooLongForModel(message)
    elif isinstance(error, ValueError):
        typed = AudioError(message)
    else:
        typed = EngineError(message)
    typed.__cause__ = error
    return typed
