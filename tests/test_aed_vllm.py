"""FireRedASR-AED in a vLLM engine (`fireredasr_vllm.aed_model`) against the plain-PyTorch reference.

One fp32 engine on a tiny converted AED repo (the session `engines` fixture):
greedy decoding through the engine gives the reference's token ids and text,
batched and one clip at a time; the engine's per-step log-probabilities are the
reference decoder's within float32 tolerance; the original's beam search driven
on the engine (`aed_beam_search`) gives the reference's tokens, also through
`FireRedAsr` and `fireredasr-transcribe --recipe original`; requests the model
cannot take are refused while the engine keeps serving; `vllm serve` on the repo
answers `/v1/audio/transcriptions` with the reference's text.
"""

import math
import types

import numpy as np
import openai
import pytest
import torch
from test_vllm_serve import REQUEST_TIMEOUT_S, decoded, served, transcribe, wav_bytes
from tolerances import aed_decoder_reduction_length, conformer_reduction_length, float32_atol

from fireredasr_converter import spec
from fireredasr_converter.configuration import FireRedAsrAedConfig
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor
from fireredasr_converter.fixtures import TINY_AED_SHAPES, build_aed_release, synthetic_speech
from fireredasr_converter.pipeline import convert
from fireredasr_vllm.aed_beam_search import aed_batched_beam_search, aed_beam_search
from fireredasr_vllm.aed_model import FireRedAsrAedForConditionalGeneration as Aed
from fireredasr_vllm.aed_model import encoder_frames
from fireredasr_vllm.aed_reference import ReferenceFireRedAsrAed
from fireredasr_vllm.decoding import AED_GREEDY, AED_RECIPE, AedDecoding
from fireredasr_vllm.engine import AED_ENGINE_SETTINGS
from fireredasr_vllm.model import SPLIT_ENERGY_WINDOW_S, SPLIT_SEARCH_SECONDS

pytestmark = pytest.mark.vllm

# Samples at 16 kHz: the shortest clip the model takes (one encoder frame), lengths off
# the 10 ms grid and with different T mod 4, up to 1.25 s.
CLIP_SAMPLES = (400, 4_000, 12_345, 20_000)
LOGPROBS = 5


@pytest.fixture(scope="module")
def aed_repo(tmp_path_factory):
    release = build_aed_release(tmp_path_factory.mktemp("aed-release"), TINY_AED_SHAPES, seed=0)
    out = tmp_path_factory.mktemp("aed-converted") / "fireredasr-aed-tiny-fp32"
    convert(release.model_dir, out, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def aed_reference(aed_repo):
    return ReferenceFireRedAsrAed.from_pretrained(aed_repo)


@pytest.fixture(scope="module")
def aed_llm(engines, aed_repo):
    return engines.get(aed_repo, dtype="float32", **AED_ENGINE_SETTINGS)


@pytest.fixture(scope="module")
def clips():
    return [synthetic_speech(n, seed=i) for i, n in enumerate(CLIP_SAMPLES)]


def request(clip: np.ndarray) -> dict:
    return {"prompt": "", "multi_modal_data": {"audio": (clip, spec.SAMPLE_RATE)}}


def greedy(clip: np.ndarray, logprobs: int | None = None, detokenize: bool = False):
    """The reference's greedy limits: one token per encoder frame, EOS ends the clip."""
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=encoder_frames(len(clip)), detokenize=detokenize, logprobs=logprobs
    )


def ids_before_eos(output, eos: int) -> list[int]:
    ids = list(output.outputs[0].token_ids)
    return ids[:-1] if ids and ids[-1] == eos else ids


def test_greedy_is_the_references_ids_and_text_batched_and_one_at_a_time(aed_llm, aed_reference, clips):
    eos = aed_reference.config.eos_token_id
    reference = aed_reference.transcribe(clips, AED_GREEDY)
    expected = [r.token_ids for r in reference]
    # The clips end at EOS and at their limit both: the test covers either way a clip ends.
    assert any(len(ids) == encoder_frames(len(c)) for c, ids in zip(clips, expected))
    assert any(len(ids) < encoder_frames(len(c)) for c, ids in zip(clips, expected))
    batched = aed_llm.generate([request(c) for c in clips], [greedy(c, detokenize=True) for c in clips], use_tqdm=False)
    assert [ids_before_eos(o, eos) for o in batched] == expected
    # vLLM's own detokenizer (what the server returns, stripped by post_process_output) gives the reference's text.
    assert [o.outputs[0].text.strip() for o in batched] == [r.text for r in reference]
    for clip, ids in zip(clips, expected):
        alone = aed_llm.generate([request(clip)], greedy(clip), use_tqdm=False)
        assert ids_before_eos(alone[0], eos) == ids


def test_step_log_probabilities_are_the_reference_decoders(aed_llm, aed_reference, aed_repo, clips):
    config = aed_reference.config
    clip = clips[3]
    output = aed_llm.generate([request(clip)], greedy(clip, LOGPROBS), use_tqdm=False)[0].outputs[0]
    tokens = [config.decoder_start_token_id, *output.token_ids]
    encoder_out, lengths = aed_reference.encode([aed_reference.features(clip)])
    state = aed_reference.decoder.start(encoder_out, lengths)
    expected = []
    with torch.inference_mode():
        for token in tokens[:-1]:
            logits, state = aed_reference.decoder.step(torch.tensor([token]), state)
            expected.append(torch.log_softmax(logits[0], dim=-1))
    expected = torch.stack(expected)
    # Reductions along one log-probability: the encoder's blocks, then the decoder's, then the log-softmax.
    encoder = config.encoder_config
    reductions = (
        encoder.n_layers * conformer_reduction_length(encoder.d_model, lengths[0], encoder.kernel_size)
        + aed_decoder_reduction_length(config.d_model, config.decoder_layers, len(tokens), lengths[0])
        + config.vocab_size
    )
    atol = float32_atol(reductions, expected.abs().max().item())
    assert len(output.logprobs) == len(tokens) - 1
    for step, candidates in enumerate(output.logprobs):
        assert len(candidates) >= LOGPROBS
        for token_id, logprob in candidates.items():
            assert abs(logprob.logprob - expected[step, token_id].item()) <= atol, (step, token_id)
        # The engine's greedy choice is the reference's best token at every step.
        assert int(expected[step].argmax()) == tokens[step + 1]


def test_beam_search_on_the_engine_is_the_references(aed_llm, aed_reference, clips):
    short = clips[:3]
    for decoding in (AED_RECIPE, AedDecoding(beam_size=4, softmax_smoothing=0.7, length_penalty=1.0, eos_penalty=0.9)):
        expected = aed_reference.generate_ids(short, decoding)
        assert aed_beam_search(aed_llm, short, decoding) == expected
    assert [aed_beam_search(aed_llm, [clip], AED_RECIPE)[0] for clip in short] == aed_reference.generate_ids(short)
    # A strong EOS penalty lifts EOS from far below the top B into first place: the search
    # asks for ever more log-probabilities until it has EOS's, and every hypothesis is empty.
    assert aed_beam_search(aed_llm, short, AedDecoding(eos_penalty=0.01)) == [[]] * len(short)


def test_the_api_serves_an_aed_repo(aed_llm, aed_repo, aed_reference, clips):
    from fireredasr_vllm import ORIGINAL_RECIPE, FireRedAsr, TranscriptionFailed

    expected = aed_reference.transcribe(clips, AED_GREEDY)
    eos = aed_reference.config.eos_token_id
    # The engine given, and the reference backend (what `fireredasr-transcribe --backend reference` runs).
    for asr in (FireRedAsr(aed_llm), FireRedAsr(aed_repo, backend="reference")):
        with asr:
            found = dict(asr.transcribe_many([(clip, spec.SAMPLE_RATE) for clip in clips]))
        segments = [found[index].segments for index in range(len(clips))]
        assert [len(s) for s in segments] == [1] * len(clips)
        ids = [list(s[0].token_ids) for s in segments]
        assert [i[:-1] if i and i[-1] == eos else i for i in ids] == [r.token_ids for r in expected]
        assert [s[0].text for s in segments] == [r.text for r in expected]
    # The LLM's beam search and repetition penalty are not FireRedASR-AED's decoding: refused at
    # start and per call, naming the AED recipe.
    with pytest.raises(TranscriptionFailed, match="AED_RECIPE"):
        FireRedAsr(aed_llm, decoding=ORIGINAL_RECIPE)
    with pytest.raises(ValueError, match="AED_RECIPE"):
        FireRedAsr(aed_llm).transcribe((clips[0], spec.SAMPLE_RATE), decoding=ORIGINAL_RECIPE)


def test_the_recipe_through_the_api_and_the_cli_gives_the_references_ids(
    aed_llm, aed_repo, aed_reference, clips, converted_fp32, shared_engines, tmp_path
):
    import soundfile as sf
    from click.testing import CliRunner

    from fireredasr_vllm import FireRedAsr, TranscriptionFailed
    from fireredasr_vllm.transcribe import main
    from fireredasr_vllm.transcript_formats import kaldi_text

    expected = aed_reference.transcribe(clips)  # the README's recipe: beam 3, smoothing 1.25, lp 0.6
    # Not greedy's texts: the CLI's output shows which search ran.
    assert [r.text for r in expected] != [r.text for r in aed_reference.transcribe(clips, AED_GREEDY)]
    with FireRedAsr(aed_llm, decoding=AED_RECIPE, batch_size=6) as asr:  # two clips in flight: clips join mid-search
        found = dict(asr.transcribe_many([(clip, spec.SAMPLE_RATE) for clip in clips]))
    segments = [found[index].segments for index in range(len(clips))]
    assert [[list(s.token_ids) for s in segs] for segs in segments] == [[r.token_ids] for r in expected]
    assert [[s.text for s in segs] for segs in segments] == [[r.text] for r in expected]

    # `--recipe original` picks the repo's own recipe; the CLI asks create_engine for this engine's settings.
    paths = []
    for index, clip in enumerate(clips):
        paths.append(tmp_path / f"clip{index}.wav")
        sf.write(paths[-1], clip, spec.SAMPLE_RATE, subtype="FLOAT")
    output = tmp_path / "text"
    result = CliRunner().invoke(main, ["-m", str(aed_repo), *map(str, paths), "-o", str(output), "-q",
                                       "--recipe", "original"])  # fmt: skip
    assert result.exit_code == 0, result.output[-3000:]
    lines = output.read_text(encoding="utf-8").splitlines()
    assert lines == [f"clip{index}\t{kaldi_text(r.text)}" for index, r in enumerate(expected)]

    # FireRedASR-AED's decoding is refused for a FireRedASR-LLM repo before anything loads.
    with pytest.raises(TranscriptionFailed, match="FireRedASR-LLM repo"):
        FireRedAsr(converted_fp32, decoding=AED_RECIPE, backend="reference")


def test_requests_it_cannot_take_are_refused(aed_llm, aed_reference, clips):
    from fireredasr_vllm.engine import request_errors

    with pytest.raises(request_errors(), match="no text prompt"):
        aed_llm.generate([{"prompt": "你好", "multi_modal_data": {"audio": (clips[1], spec.SAMPLE_RATE)}}], greedy(clips[1]))
    with pytest.raises(request_errors(), match="too short"):
        aed_llm.generate([request(np.zeros(399, dtype=np.float32))], greedy(clips[1]))
    # The engine goes on serving.
    served = aed_llm.generate([request(clips[1])], greedy(clips[1]), use_tqdm=False)
    eos = aed_reference.config.eos_token_id
    assert ids_before_eos(served[0], eos) == aed_reference.generate_ids([clips[1]], AED_GREEDY)[0]
    # In the beam search a refused clip comes back as its error; the clip searched with it goes on.
    found = dict(aed_batched_beam_search(aed_llm, [(0, clips[1]), (1, np.zeros(399, dtype=np.float32))], AED_RECIPE))
    assert isinstance(found[1], request_errors()) and "too short" in str(found[1])
    assert found[0].token_ids == aed_reference.generate_ids([clips[1]])[0]


def test_the_transcription_endpoint_cuts_and_joins_as_for_the_llm_model(aed_repo):
    # The same upload splitting (its window never below the model's shortest clip) and languages
    # as FireRedASR-LLM (model.speech_to_text_config, model.transcription_language); no engine.
    model_config = types.SimpleNamespace(
        model=str(aed_repo), revision=None, hf_config=FireRedAsrAedConfig.from_pretrained(aed_repo)
    )
    config = Aed.get_speech_to_text_config(model_config, "transcribe")
    assert config.max_audio_clip_s == math.floor(FireRedAsrFeatureExtractor.from_pretrained(aed_repo).max_audio_seconds)
    assert config.overlap_chunk_second == SPLIT_SEARCH_SECONDS
    assert config.min_energy_split_window_size == max(round(SPLIT_ENERGY_WINDOW_S * spec.SAMPLE_RATE), 400)
    assert (Aed.validate_language(None), Aed.validate_language("en")) == ("zh", "en")
    with pytest.raises(ValueError, match="language 'fr': FireRedASR-AED transcribes Mandarin and English"):
        Aed.validate_language("fr")


# --- the OpenAI transcription endpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def aed_server(aed_repo, tmp_path_factory):
    """`vllm serve` on the tiny AED repo, as test_vllm_serve starts it for FireRedASR-LLM."""
    with served(aed_repo, tmp_path_factory.mktemp("aed-serve")) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


def test_the_transcription_endpoint_serves_an_aed_repo(aed_server, aed_repo, aed_reference):
    """An upload gets the reference's greedy text; one the model cannot take is a 400, and the server goes on."""
    clip = synthetic_speech(20_000, seed=7)
    wav = wav_bytes(clip)
    (expected,) = aed_reference.transcribe([decoded(wav)], AED_GREEDY)
    assert expected.text, "the reference transcript is empty: comparing it would prove little, pick another clip"
    assert transcribe(aed_server, str(aed_repo), wav, encoder_frames(len(clip))) == expected.text
    for bad, message in ((wav_bytes(np.zeros(0, dtype=np.float32)), "audio is empty"), (wav_bytes(clip[:200]), "too short")):
        with pytest.raises(openai.BadRequestError, match=message) as error:
            transcribe(aed_server, str(aed_repo), bad, 8)
        assert error.value.status_code == 400
    assert transcribe(aed_server, str(aed_repo), wav, encoder_frames(len(clip))) == expected.text
