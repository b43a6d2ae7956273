"""The vLLM plugin through `LLM(model=OUT)` against the reference implementation.

One fp32 engine on the tiny converted fixture (conftest's `tiny_llm`, the suite's
shared engine) serves the module. Greedy
decoding with `max_tokens = N` is what the reference does by default (it stops at
`<|im_end|>` or after N tokens), so both sides produce the same number of tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.audio import resample_audio_pyav
from vllm_helpers import (
    MAX_MODEL_LEN,
    NUM_LOGPROBS,
    PARITY_CLIP_SAMPLES,
    assert_top_logprobs_close,
    speech_embedding_count,
)

from fireredasr_converter import spec
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_converter.pipeline import convert
from fireredasr_vllm.offline import Transcript, stream_transcriptions

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(tiny_llm):
    return tiny_llm


@pytest.fixture(scope="module")
def clips() -> dict[int, np.ndarray]:
    # What the parity tests claim to cover: every residue of T mod 4, the shortest
    # clip with one speech embedding, and 20 s.
    frame_counts = [spec.fbank_frame_count(n) for n in PARITY_CLIP_SAMPLES]
    assert {t % spec.ENCODER_SUBSAMPLING for t in frame_counts} == set(range(spec.ENCODER_SUBSAMPLING))
    assert speech_embedding_count(min(PARITY_CLIP_SAMPLES)) == 1
    assert speech_embedding_count(min(PARITY_CLIP_SAMPLES) - 1) == 0
    assert max(PARITY_CLIP_SAMPLES) == 20 * spec.SAMPLE_RATE
    return {n: synthetic_speech(n, seed=i) for i, n in enumerate(PARITY_CLIP_SAMPLES)}


def transcription_request(
    waveform: np.ndarray, sampling_rate: int = spec.SAMPLE_RATE, prompt: str = ""
) -> dict:
    # An empty prompt asks the processor for the model's own transcription prompt.
    return {"prompt": prompt, "multi_modal_data": {"audio": (waveform, sampling_rate)}}


def greedy(num_samples: int) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=speech_embedding_count(num_samples), logprobs=NUM_LOGPROBS
    )


def top_logprobs(step) -> dict[int, float]:
    return {token: logprob.logprob for token, logprob in step.items()}


@pytest.fixture(scope="module")
def one_at_a_time(llm, clips):
    """Each clip decoded in its own `generate` call."""
    return {
        num_samples: llm.generate(transcription_request(waveform), greedy(num_samples), use_tqdm=False)[0]
        for num_samples, waveform in clips.items()
    }


@pytest.mark.parametrize("num_samples", PARITY_CLIP_SAMPLES)
def test_greedy_tokens_and_logprobs_match_reference(num_samples, clips, one_at_a_time, reference):
    expected = reference.greedy_with_logprobs(clips[num_samples], num_logprobs=NUM_LOGPROBS)
    output = one_at_a_time[num_samples].outputs[0]

    assert list(output.token_ids) == expected.token_ids
    assert len(output.logprobs) == len(expected.logprobs)
    for step, (vllm_step, reference_step) in enumerate(zip(output.logprobs, expected.logprobs)):
        assert_top_logprobs_close(top_logprobs(vllm_step), reference_step, step)


def test_placeholders_replace_the_speech_token(clips, one_at_a_time, reference):
    speech_token_id = reference.config.speech_token_id
    for num_samples in clips:
        prompt_ids = list(one_at_a_time[num_samples].prompt_token_ids)
        position = reference.speech_position
        expected = (
            reference.prompt_token_ids[:position]
            + [speech_token_id] * speech_embedding_count(num_samples)
            + reference.prompt_token_ids[position + 1 :]
        )
        assert prompt_ids == expected


def test_explicit_prompt_equals_default_prompt(llm, clips, one_at_a_time):
    num_samples = 16000
    output = llm.generate(
        transcription_request(clips[num_samples], prompt=spec.transcription_prompt()),
        greedy(num_samples),
        use_tqdm=False,
    )[0]
    expected = one_at_a_time[num_samples]
    assert output.prompt_token_ids == expected.prompt_token_ids
    assert output.outputs[0].token_ids == expected.outputs[0].token_ids


def test_batch_gives_one_at_a_time_results(llm, clips, one_at_a_time):
    # Mixed lengths in one call: the engine encodes several clips per step, batched
    # with padding; each must still get exactly its batch-size-1 result.
    lengths = list(clips)
    batched = llm.generate(
        [transcription_request(clips[n]) for n in lengths],
        [greedy(n) for n in lengths],
        use_tqdm=False,
    )
    for num_samples, output in zip(lengths, batched):
        expected = one_at_a_time[num_samples].outputs[0]
        assert output.outputs[0].token_ids == expected.token_ids
        for step, (got, want) in enumerate(zip(output.outputs[0].logprobs, expected.logprobs)):
            assert top_logprobs(got) == top_logprobs(want), step


def test_stereo_44k_is_resampled_and_downmixed(llm, reference):
    seconds = 1.5
    left = synthetic_speech(int(seconds * 44100), seed=7)
    # Channels-first, as vLLM's resampler takes it; the mono mix is 0.75 * left.
    stereo = np.stack([left, 0.5 * left])
    mono_16k = resample_audio_pyav(0.75 * left, orig_sr=44100, target_sr=spec.SAMPLE_RATE)
    num_samples = mono_16k.shape[0]

    output = llm.generate(transcription_request(stereo, 44100), greedy(num_samples), use_tqdm=False)[0]

    expected = reference.greedy_with_logprobs(mono_16k, num_logprobs=NUM_LOGPROBS)
    speech_token_id = reference.config.speech_token_id
    assert output.prompt_token_ids.count(speech_token_id) == speech_embedding_count(num_samples)
    assert list(output.outputs[0].token_ids) == expected.token_ids
    for step, (vllm_step, reference_step) in enumerate(zip(output.outputs[0].logprobs, expected.logprobs)):
        assert_top_logprobs_close(top_logprobs(vllm_step), reference_step, step)


def _with_bad_sample(value: float) -> np.ndarray:
    waveform = synthetic_speech(16000, seed=3)
    waveform[1234] = value
    return waveform


BAD_REQUESTS = {
    "empty": (transcription_request(np.zeros(0, dtype=np.float32)), ValueError, "audio is empty"),
    "too short": (
        transcription_request(synthetic_speech(spec.min_samples_for_one_embedding() - 1)),
        ValueError,
        "audio is too short",
    ),
    "too long": (
        transcription_request(synthetic_speech(30 * spec.SAMPLE_RATE + spec.SAMPLE_RATE // 2)),
        ValueError,
        "audio is too long",
    ),
    "nan": (transcription_request(_with_bad_sample(np.nan)), ValueError, "NaN or infinite"),
    "inf": (transcription_request(_with_bad_sample(np.inf)), ValueError, "NaN or infinite"),
    # vLLM itself enforces the processor's one-clip-per-prompt limit.
    "two clips": (
        {"prompt": "", "multi_modal_data": {"audio": [(synthetic_speech(16000), 16000)] * 2}},
        VLLMValidationError,
        "At most 1 audio",
    ),
    "no speech token": (
        transcription_request(synthetic_speech(16000), prompt="transcribe this"),
        ValueError,
        "0 <speech> token",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_refused_and_the_engine_keeps_serving(case, llm, clips, one_at_a_time):
    request, error, message = BAD_REQUESTS[case]
    with pytest.raises(error, match=message):
        llm.generate(request, greedy(16000), use_tqdm=False)
    # A bad clip in a batch fails the call before anything is scheduled ...
    with pytest.raises(error, match=message):
        llm.generate([transcription_request(clips[16000]), request], greedy(16000), use_tqdm=False)
    # ... and the engine goes on giving the same results.
    output = llm.generate(transcription_request(clips[16000]), greedy(16000), use_tqdm=False)[0]
    assert output.outputs[0].token_ids == one_at_a_time[16000].outputs[0].token_ids


def test_bf16_checkpoint_loads_and_transcribes(tiny_release, tmp_path, engines):
    repo = tmp_path / "bf16"
    convert(tiny_release.model_dir, repo, dtype="bf16")
    num_samples = 16000
    num_embeddings = speech_embedding_count(num_samples)
    engine = engines.get(repo, dtype="bfloat16")
    output = engine.generate(
        transcription_request(synthetic_speech(num_samples)),
        SamplingParams(temperature=0.0, max_tokens=num_embeddings, ignore_eos=True, logprobs=1),
        use_tqdm=False,
    )[0]
    speech_token_id = engine.get_tokenizer().convert_tokens_to_ids(spec.SPEECH_TOKEN)
    assert output.prompt_token_ids.count(speech_token_id) == num_embeddings
    assert len(output.outputs[0].token_ids) == num_embeddings
    assert all(np.isfinite(lp.logprob) for step in output.outputs[0].logprobs for lp in step.values())


def test_a_clip_vllm_refuses_is_reported_and_the_stream_goes_on(llm, clips):
    """vLLM's own validation errors (not ValueErrors) belong to their clip, not to the whole stream.

    A prompt padded to ~100 tokens below max_model_len fits the 1-embedding clips
    but not the 20 s clip's 250 placeholders: vLLM refuses that request alone.
    """
    tokenizer = llm.get_tokenizer()
    instruction = spec.TRANSCRIBE_INSTRUCTION
    repeats = 1
    prompt = spec.transcription_prompt()
    while len(tokenizer.encode(prompt, add_special_tokens=False)) < MAX_MODEL_LEN - 100:
        repeats += 1
        prompt = spec.transcription_prompt().replace(instruction, instruction * repeats)
    shortest, longest = min(PARITY_CLIP_SAMPLES), max(PARITY_CLIP_SAMPLES)
    stream = [("short", clips[shortest]), ("long", clips[longest]), ("short again", clips[shortest])]
    results = dict(stream_transcriptions(llm, stream, prompt=prompt, max_new_tokens=1))
    assert isinstance(results["long"], VLLMValidationError)
    assert "longer than the maximum model length" in str(results["long"])
    assert isinstance(results["short"], Transcript) and isinstance(results["short again"], Transcript)
    assert results["short"].token_ids == results["short again"].token_ids


def test_compiled_engine_gives_the_eager_and_reference_tokens(converted_fp32, clips, one_at_a_time, reference, engines):
    """GPUs run vLLM's compiled language model (torch.compile, CUDA graphs); the suite's other engines run eager.

    A compiled CPU engine goes through the same compilation of the plugin's
    forward and must decode exactly what the eager engine and the reference do.
    """
    compiled = engines.get(converted_fp32, dtype="float32", enforce_eager=False)
    assert not compiled.llm_engine.model_config.enforce_eager
    requests = [transcription_request(waveform) for waveform in clips.values()]
    params = [greedy(num_samples) for num_samples in clips]
    outputs = compiled.generate(requests, params, use_tqdm=False)
    for (num_samples, waveform), output in zip(clips.items(), outputs):
        token_ids = list(output.outputs[0].token_ids)
        assert token_ids == list(one_at_a_time[num_samples].outputs[0].token_ids), num_samples
        assert token_ids == reference.greedy_with_logprobs(waveform, num_logprobs=1).token_ids, num_samples
