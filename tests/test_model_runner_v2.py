"""The plugin under vLLM's Model Runner V2, the runner vLLM uses on GPUs with Triton.

Our engine tests run vLLM's CPU backend, which uses the V1 runner. V2
(`vllm/v1/worker/gpu/`) drives multimodal models through its own `EncoderRunner`
and `EncoderCache`, and both run on the CPU. So this module loads the plugin's
model in-process (no engine: vLLM's loader, the converted fp32 repo, a
one-process gloo group), makes requests with the plugin's registered processor,
and drives those two classes the way V2's model runner and model state do:

- start-up profiling with vLLM's dummy inputs encodes one longest clip per dummy item;
- one step that schedules two clips encodes each to exactly its batch-size-1 rows;
- the step's input embeddings hold each clip's rows on its placeholders and the
  prompt's token embeddings everywhere else;
- a clip split across two prefill chunks yields the unchunked embeddings;
- the model builds on the meta device in vLLM's default dtype, so every tensor
  lands where V2's device context puts it.

The vLLM calls used here have the same signatures in vLLM 0.32 and 0.33. Where
0.33 differs: `EncoderCache.add_request` stores a copy of the feature list, and
the new `EncoderCache.update_encoder_inputs` fills in a feature's `data` that the
scheduler sends in a later step (the runner skips a feature whose `data` is
None, in both versions); `_mark_tower_model` also leaves the tower out on
pipeline stages after the first under V2.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import (
    destroy_distributed_environment,
    destroy_model_parallel,
    ensure_model_parallel_initialized,
    init_distributed_environment,
)
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.model_loader import get_model
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.encoder_budget import MultiModalBudget
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.multimodal.processing import ProcessorInputs, TimingContext
from vllm.utils.torch_utils import set_default_torch_dtype
from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
from vllm_helpers import ENGINE_KWARGS, speech_embedding_atol

from fireredasr_converter import spec
from fireredasr_converter.fixtures import synthetic_speech
from fireredasr_vllm.model import FireRedAsrLlmForConditionalGeneration

pytestmark = pytest.mark.vllm

# 1 s and 1.25 s: 12 and 15 speech embeddings. The shorter comes first and is within
# the encoder's batch fill of the longer, so the step's one encoder call pads it and
# must hand the clips back in the order it received them.
CLIP_SAMPLES = (16000, 20000)
# Batched and lone encoder runs differ by float32 reordering only (embeddings are O(1)).
SPEECH_ATOL = speech_embedding_atol(max(CLIP_SAMPLES), 1.0)


def engine_config(repo, dtype: str) -> VllmConfig:
    return EngineArgs(model=str(repo), dtype=dtype, **ENGINE_KWARGS).create_engine_config()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_config(converted_fp32) -> VllmConfig:
    return engine_config(converted_fp32, "float32")


@pytest.fixture(scope="module")
def worker(vllm_config):
    """A one-process worker's state: the current config, a gloo group, model parallel size 1."""
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            backend="gloo",
        )
        try:
            ensure_model_parallel_initialized(1, 1)
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


@pytest.fixture(scope="module")
def model(worker, vllm_config):
    """The plugin's model with the repo's weights, as vLLM's loader builds it in a worker."""
    with pytest.MonkeyPatch.context() as patch:
        # The loader empties the accelerator's cache, which a CPU-only torch refuses;
        # vLLM's CPU runner makes it a no-op the same way.
        patch.setattr(torch.accelerator, "empty_cache", lambda: None)
        return get_model(vllm_config=vllm_config)


@dataclass
class Request:
    req_id: str
    prompt_ids: list[int]
    feature: MultiModalFeatureSpec

    @property
    def input_features(self) -> torch.Tensor:
        return self.feature.data["input_features"].data

    def placeholder_mask(self) -> torch.Tensor:
        position = self.feature.mm_position
        mask = torch.zeros(len(self.prompt_ids), dtype=torch.bool)
        mask[position.offset : position.offset + position.length] = True
        return mask


def make_request(processor, req_id: str, waveform: np.ndarray) -> Request:
    """A request as the engine hands it to the runner: the processor's ids and one feature spec."""
    info = processor.info
    prompt = info.get_tokenizer().encode(spec.transcription_prompt(), add_special_tokens=False)
    mm_items = info.parse_mm_data({"audio": [(waveform, spec.SAMPLE_RATE)]})
    processed = processor.apply(ProcessorInputs(prompt, mm_items), TimingContext(enabled=False))
    feature = MultiModalFeatureSpec(
        data=processed["mm_kwargs"]["audio"][0],
        modality="audio",
        identifier=processed["mm_hashes"]["audio"][0],
        mm_position=processed["mm_placeholders"]["audio"][0],
    )
    return Request(req_id, processed["prompt_token_ids"], feature)


@pytest.fixture(scope="module")
def audio_requests(vllm_config) -> list[Request]:
    processor = MULTIMODAL_REGISTRY.create_processor(vllm_config.model_config)
    return [
        make_request(processor, f"req-{i}", synthetic_speech(num_samples, seed=i))
        for i, num_samples in enumerate(CLIP_SAMPLES)
    ]


@pytest.fixture(scope="module")
def alone(model, audio_requests) -> dict[str, torch.Tensor]:
    """Each clip's speech embeddings, encoded on its own: what every path must reproduce."""
    with torch.inference_mode():
        return {
            r.req_id: model.speech_encoder.encode_clips([r.input_features])[0] for r in audio_requests
        }


def new_encoder_runner(model, vllm_config: VllmConfig) -> EncoderRunner:
    """As V2's model state builds it (no encoder CUDA graphs on the CPU)."""
    model_config = vllm_config.model_config
    return EncoderRunner(
        model=model,
        max_num_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        hidden_size=model_config.get_inputs_embeds_size(),
        encoder_cache=EncoderCache(),
        dtype=model_config.dtype,
        device=torch.device("cpu"),
    )


def encode_step(runner: EncoderRunner, requests: list[Request]) -> None:
    """A step that schedules each request's clip: V2's encoder pass, outputs cached by identifier."""
    for request in requests:
        runner.encoder_cache.add_request(request.req_id, [request.feature])
    identifiers, mm_kwargs = runner.prepare_mm_inputs({r.req_id: [0] for r in requests})
    outputs = runner.execute_mm_encoder(mm_kwargs)
    runner.encoder_cache.encoder_outputs.update(zip(identifiers, outputs))


@dataclass
class StepEmbeds:
    inputs_embeds: torch.Tensor
    mm_embeds: list[torch.Tensor]
    is_mm_embed: torch.Tensor


def embed_step(
    runner: EncoderRunner,
    requests: list[Request],
    num_computed: list[int],
    num_scheduled: list[int],
) -> StepEmbeds:
    """One flat batch in which request i runs num_scheduled[i] prompt positions from num_computed[i]."""
    num_computed = np.array(num_computed, dtype=np.int32)
    num_scheduled = np.array(num_scheduled, dtype=np.int32)
    query_start_loc = np.concatenate([[0], np.cumsum(num_scheduled)]).astype(np.int32)
    num_tokens = int(query_start_loc[-1])
    mm_embeds, is_mm_embed = runner.gather_mm_embeddings(
        [r.req_id for r in requests],
        num_tokens,
        num_scheduled,
        query_start_loc,
        np.array([len(r.prompt_ids) for r in requests], dtype=np.int32),
        num_computed,
    )
    input_ids = torch.tensor(
        [
            token
            for request, start, count in zip(requests, num_computed, num_scheduled)
            for token in request.prompt_ids[start : start + count]
        ]
    )
    # The runner returns its persistent buffer (CUDA graphs read it): copy the step's rows out.
    inputs_embeds = runner.get_inputs_embeds(input_ids, mm_embeds, is_mm_embed)[:num_tokens].clone()
    return StepEmbeds(inputs_embeds, mm_embeds, is_mm_embed)


def test_profiling_encodes_one_longest_clip_per_dummy_item(model, vllm_config, converted_fp32):
    # As V2's profile_run: the budget's dummy items, then the encoder on all of them at once.
    budget = MultiModalBudget(vllm_config, MULTIMODAL_REGISTRY, enable_cache=False)
    dummy_inputs = budget.get_dummy_encoder_profile_inputs()
    runner = new_encoder_runner(model, vllm_config)

    runner.profile_encoder_cache(dummy_inputs, budget)

    config = vllm_config.model_config.hf_config
    preprocessor = json.loads((converted_fp32 / "preprocessor_config.json").read_text())
    max_embeddings = spec.speech_embedding_count(
        spec.max_fbank_frames(preprocessor["max_audio_seconds"]), config.encoder_downsample_rate
    )
    assert dummy_inputs and {modality for modality, _ in dummy_inputs} == {"audio"}
    outputs = runner.encoder_cache.encoder_outputs
    assert len(outputs) == len(dummy_inputs)
    for output in outputs.values():
        assert output.shape == (max_embeddings, config.text_config.hidden_size)
        assert torch.isfinite(output).all()


def test_one_step_encodes_each_clip_to_its_rows_alone(
    model, vllm_config, audio_requests, alone, monkeypatch
):
    clips_per_call = []
    embed_multimodal = model.embed_multimodal

    def counting_embed_multimodal(**kwargs):
        clips_per_call.append(len(kwargs["input_features"]))
        return embed_multimodal(**kwargs)

    monkeypatch.setattr(model, "embed_multimodal", counting_embed_multimodal)
    runner = new_encoder_runner(model, vllm_config)

    encode_step(runner, audio_requests)

    # Both clips went through one encoder call, the way V2 batches a step's items.
    assert clips_per_call == [len(audio_requests)]
    lengths = [r.feature.mm_position.length for r in audio_requests]
    assert lengths == [spec.speech_embedding_count_for_samples(n) for n in CLIP_SAMPLES]
    for request, length in zip(audio_requests, lengths):
        output = runner.encoder_cache.encoder_outputs[request.feature.identifier]
        assert output.shape == (length, vllm_config.model_config.get_inputs_embeds_size())
        torch.testing.assert_close(output, alone[request.req_id], rtol=0, atol=SPEECH_ATOL)


def test_step_embeddings_put_speech_rows_on_placeholders_and_tokens_elsewhere(
    model, vllm_config, audio_requests, alone
):
    runner = new_encoder_runner(model, vllm_config)
    encode_step(runner, audio_requests)
    prompt_lens = [len(r.prompt_ids) for r in audio_requests]

    step = embed_step(runner, audio_requests, [0] * len(audio_requests), prompt_lens)

    placeholders = torch.cat([r.placeholder_mask() for r in audio_requests])
    input_ids = torch.tensor([token for r in audio_requests for token in r.prompt_ids])
    speech_token_id = vllm_config.model_config.hf_config.speech_token_id
    torch.testing.assert_close(input_ids == speech_token_id, placeholders)
    torch.testing.assert_close(step.is_mm_embed, placeholders)
    speech_rows = torch.cat([alone[r.req_id] for r in audio_requests])
    torch.testing.assert_close(step.inputs_embeds[placeholders], speech_rows, rtol=0, atol=SPEECH_ATOL)
    with torch.inference_mode():
        token_rows = model.embed_input_ids(input_ids)
    torch.testing.assert_close(
        step.inputs_embeds[~placeholders], token_rows[~placeholders], rtol=0, atol=0
    )


def test_clip_split_across_prefill_chunks_gives_the_unchunked_embeddings(
    model, vllm_config, audio_requests, alone
):
    request = audio_requests[-1]
    prompt_len = len(request.prompt_ids)
    position = request.feature.mm_position
    speech_in_first_chunk = position.length // 2
    first_len = position.offset + speech_in_first_chunk
    runner = new_encoder_runner(model, vllm_config)
    encode_step(runner, [request])  # the scheduler runs the encoder with the first chunk

    unchunked = embed_step(runner, [request], [0], [prompt_len])
    first = embed_step(runner, [request], [0], [first_len])
    second = embed_step(runner, [request], [first_len], [prompt_len - first_len])

    torch.testing.assert_close(
        torch.cat([first.is_mm_embed, second.is_mm_embed]), unchunked.is_mm_embed
    )
    torch.testing.assert_close(
        torch.cat([first.inputs_embeds, second.inputs_embeds]), unchunked.inputs_embeds, rtol=0, atol=0
    )
    speech = alone[request.req_id]
    assert [len(first.mm_embeds), len(second.mm_embeds)] == [1, 1]
    torch.testing.assert_close(first.mm_embeds[0], speech[:speech_in_first_chunk], rtol=0, atol=SPEECH_ATOL)
    torch.testing.assert_close(second.mm_embeds[0], speech[speech_in_first_chunk:], rtol=0, atol=SPEECH_ATOL)


def test_model_builds_on_meta_in_the_default_dtype(worker, converted_fp32):
    # As vLLM's loader builds it, but on the meta device: a tensor created anywhere but
    # the default device (a CPU table, say) would stay off the GPU under V2. The Qwen2
    # layers read the worker's model-parallel state. A config of its own: the loaded
    # model's attention layers already hold their names in the fp32 config.
    meta_config = engine_config(converted_fp32, "bfloat16")
    dtype = meta_config.model_config.dtype
    with (
        set_current_vllm_config(meta_config),
        set_default_torch_dtype(dtype),
        torch.device("meta"),
    ):
        meta_model = FireRedAsrLlmForConditionalGeneration(vllm_config=meta_config)

    tensors = {**dict(meta_model.named_parameters()), **dict(meta_model.named_buffers())}
    assert "speech_encoder.encoder.positional_encoding.pe" in tensors
    assert [name for name, tensor in tensors.items() if tensor.device.type != "meta"] == []
    assert dtype == torch.bfloat16
    off_dtype = {
        name: tensor.dtype
        for name, tensor in tensors.items()
        if name.startswith("speech_encoder.") and tensor.dtype != dtype
    }
    assert off_dtype == {}
