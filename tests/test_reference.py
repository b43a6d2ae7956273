"""The reference implementation against hand-checked pieces, on the converted tiny fixture (fp32)."""

import json

import numpy as np
import pytest
import torch
from tolerances import F64_EPS

from fireredasr_converter import spec
from fireredasr_converter.feature_extraction import kaldi_fbank
from fireredasr_converter.fixtures import synthetic_speech


def samples_for_frames(num_frames: int) -> int:
    """The shortest 16 kHz clip with `num_frames` fbank frames (25 ms window, 10 ms shift)."""
    return 400 + (num_frames - 1) * 160


# --- lengths -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_samples", "frames"),
    [(399, 0), (400, 1), (559, 1), (560, 2), (1039, 4), (1040, 5), (16000, 98), (16000 * 30, 2998)],
)
def test_fbank_frame_count_is_kaldis_snip_edges_count(num_samples, frames):
    assert spec.fbank_frame_count(num_samples) == frames


def test_reference_features_have_the_snip_edges_frame_count(reference):
    for num_samples, frames in ((1040, 5), (1199, 5), (1200, 6), (16000, 98)):
        assert reference.features(synthetic_speech(num_samples)).shape == (frames, 80)


@pytest.mark.parametrize(("num_frames", "embeddings"), [(418, 52), (197, 25), (1235, 154)])
def test_speech_embedding_count_table_from_the_facts(reference, num_frames, embeddings):
    assert spec.speech_embedding_count(num_frames) == embeddings
    clip = synthetic_speech(samples_for_frames(num_frames))
    assert reference.speech_embeddings(clip).shape == (embeddings, reference.config.text_config.hidden_size)


def test_65_ms_is_the_shortest_clip_with_one_speech_embedding():
    assert spec.min_samples_for_one_embedding() == 1040
    assert spec.speech_embedding_count_for_samples(1039) == 0
    assert spec.speech_embedding_count_for_samples(1040) == 1


# --- CMVN --------------------------------------------------------------------


def test_cmvn_statistics_by_hand():
    # Frames (1, 2, 5) and (3, 6, 5): sums (4, 8, 10), squares (10, 40, 50), 2 frames.
    # mean (2, 4, 5); variance (5 - 4, 20 - 16, 25 - 25) = (1, 4, 0 -> floored at 1e-20).
    stats = np.array([[4.0, 8.0, 10.0, 2.0], [10.0, 40.0, 50.0, 0.0]])
    mean, istd, count = spec.cmvn_from_stats(stats)
    np.testing.assert_array_equal(mean, [2.0, 4.0, 5.0])
    # 1 and 0.5 are exact; 1e-20 is rounded (half an ulp), then sqrt and the reciprocal
    # round once each (half an ulp; sqrt halves the error it receives): under 2 eps.
    np.testing.assert_allclose(istd, [1.0, 0.5, 1e10], rtol=2 * F64_EPS, atol=0)
    assert count == 2.0


def test_reference_features_are_fbank_normalised_with_the_repos_statistics(reference, converted_fp32):
    config = json.loads((converted_fp32 / "preprocessor_config.json").read_text())
    mean, istd = np.array(config["cmvn_mean"]), np.array(config["cmvn_istd"])
    clip = synthetic_speech(8000, seed=4)
    fbank = kaldi_fbank(torch.from_numpy(clip)).numpy().astype(np.float64)
    expected = ((fbank - mean) * istd).astype(np.float32)
    np.testing.assert_array_equal(reference.features(clip).numpy(), expected)


# --- prompt ------------------------------------------------------------------


def test_prompt_token_ids_hold_one_speech_token_with_the_configs_id(reference):
    ids = reference.prompt_token_ids
    speech_id = reference.config.speech_token_id
    assert reference.tokenizer.convert_tokens_to_ids(spec.SPEECH_TOKEN) == speech_id
    assert ids.count(speech_id) == 1
    assert reference.tokenizer.decode(ids) == spec.transcription_prompt()
    # The turn markers are single special tokens, as in Qwen2's tokenizer.
    bos, eos = (reference.tokenizer.convert_tokens_to_ids(t) for t in (spec.BOS_TOKEN, spec.EOS_TOKEN))
    assert ids[0] == bos and ids.count(bos) == 2 and ids.count(eos) == 1
    assert reference.tokenizer.decode(ids[: ids.index(speech_id)]) == f"{spec.BOS_TOKEN}user\n"


def test_prompt_embeds_replace_the_speech_token_by_the_speech_embeddings(reference):
    clip = synthetic_speech(16000, seed=5)
    embeds, num_embeddings = reference.prompt_embeds(clip)
    speech = reference.speech_embeddings(clip)
    ids = reference.prompt_token_ids
    position = ids.index(reference.config.speech_token_id)
    text = reference.language_model.get_input_embeddings()(torch.tensor(ids))
    assert num_embeddings == speech.shape[0] == spec.speech_embedding_count_for_samples(16000) == 12
    assert embeds.shape == (len(ids) - 1 + num_embeddings, text.shape[1])
    assert torch.equal(embeds[:position], text[:position])
    assert torch.equal(embeds[position : position + num_embeddings], speech)
    assert torch.equal(embeds[position + num_embeddings :], text[position + 1 :])


# --- decoding ----------------------------------------------------------------


def test_transcribe_is_deterministic_and_bounded_by_the_embedding_count(reference):
    clips = [synthetic_speech(n, seed=n) for n in (1040, 4000, 16000)]
    first = reference.transcribe(clips)
    assert reference.transcribe(clips) == first
    for clip, result in zip(clips, first):
        limit = spec.speech_embedding_count_for_samples(len(clip))
        ids = result.token_ids
        assert 1 <= len(ids) <= limit
        assert len(ids) == limit or ids[-1] == reference.eos_token_id
        assert result.text == reference.tokenizer.decode(ids, skip_special_tokens=True)
    short = reference.transcribe(clips[2:], max_new_tokens=2)[0].token_ids
    assert short == first[2].token_ids[:2]


def test_greedy_logprobs_follow_the_greedy_path(reference):
    clip = synthetic_speech(8000, seed=6)
    greedy = reference.greedy_with_logprobs(clip, num_logprobs=5)
    assert greedy.token_ids == reference.generate_ids(clip)
    assert len(greedy.logprobs) == len(greedy.token_ids)
    for token, step in zip(greedy.token_ids, greedy.logprobs):
        values = list(step.values())
        assert len(step) == 5 and values == sorted(values, reverse=True) and values[0] <= 0.0
        assert next(iter(step)) == token  # greedy picks the most likely token


# --- refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("clip", "sampling_rate", "message"),
    [
        (np.zeros(0, dtype=np.float32), 16000, "audio is empty"),
        (synthetic_speech(1039), 16000, "audio is too short: 1039 samples"),
        (np.zeros(16000 * 30 + 1, dtype=np.float32), 16000, "audio is too long"),
        (np.concatenate([synthetic_speech(2000), [np.nan]]).astype(np.float32), 16000, "NaN or infinite"),
        (np.concatenate([synthetic_speech(2000), [np.inf]]).astype(np.float32), 16000, "NaN or infinite"),
        (np.zeros((2, 4000), dtype=np.float32), 16000, "mono 1-D waveform"),
        (np.zeros(4000, dtype=np.int16), 16000, "must be floating point"),
        (synthetic_speech(4000), 8000, "resample it to 16000 Hz"),
    ],
)
def test_clips_the_model_cannot_transcribe_are_refused(reference, clip, sampling_rate, message):
    with pytest.raises(ValueError, match=message):
        reference.transcribe([clip], sampling_rate=sampling_rate)
