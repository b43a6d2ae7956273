"""The reference FireRedASR-LLM: a converted repo run with plain PyTorch + transformers.

This is the readable statement of what the model computes, and the oracle the
vLLM plugin is tested against. It decodes every clip on its own (batch size 1),
which is the original release's reference behaviour:

    waveform -> fbank + CMVN -> Conformer + adapter -> N speech embeddings
    prompt tokens with the single <speech> token replaced by those N rows
    -> Qwen2 `generate` (greedy by default, at most N new tokens) -> text

Decoding takes the original's arguments: `num_beams`, `repetition_penalty`,
`length_penalty`, `max_new_tokens`. Greedy decoding (with or without the
penalty) is transformers' `generate`, which behaves the same in transformers
4.x and 5 here. Beam search is the original's transformers 4.x algorithm
(`BeamSearchScorer` + `_beam_search`, read in 4.46.3), run on the same Qwen2
model and transformers' own `RepetitionPenaltyLogitsProcessor`: transformers 5
replaced it with a vectorised beam search that, for `early_stopping=False`,
decides a clip is done from the best *running* beam instead of the best
candidate of the step, so it can stop one step earlier than the original and
return another hypothesis (see `_beam_search_4x`).

Nothing here imports vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, Qwen2ForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from fireredasr_converter import spec
from fireredasr_converter.repo_format import INDEX_NAME, LANGUAGE_MODEL_PREFIX, SPEECH_ENCODER_PREFIXES
from fireredasr_converter.configuration import FireRedAsrLlmConfig, register_with_transformers
from fireredasr_converter.feature_extraction import FireRedAsrFeatureExtractor

from .conformer import SpeechEncoder
from .decoding import Decoding
from .transcript_formats import Transcript


AudioClip = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class GreedyGeneration:
    token_ids: list[int]
    # One dict per generated token: the `num_logprobs` most likely tokens at that
    # step and their log-probabilities (log-softmax of the raw logits, float32).
    logprobs: list[dict[int, float]]


def load_converted_weights(repo: Path) -> dict[str, torch.Tensor]:
    """All tensors of a converted repo, read through its safetensors index."""
    index_path = repo / INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} not found; {repo} is not a converted FireRedASR-LLM repo "
            "(create one with `fireredasr-convert SRC OUT`)"
        )
    weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        weights.update(load_file(repo / shard))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise ValueError(
            f"{repo}: tensors listed in {INDEX_NAME} are missing from the shards: {missing[:5]}; "
            "convert the release again"
        )
    return weights


class ReferenceFireRedAsrLlm:
    def __init__(
        self,
        config: FireRedAsrLlmConfig,
        speech_encoder: SpeechEncoder,
        language_model: Qwen2ForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: FireRedAsrFeatureExtractor,
    ):
        self.config = config
        self.speech_encoder = speech_encoder.eval()
        self.language_model = language_model.eval()
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.device = language_model.device

        self.prompt_token_ids: list[int] = tokenizer(
            spec.transcription_prompt(), add_special_tokens=False
        )["input_ids"]
        speech_positions = [
            i for i, token in enumerate(self.prompt_token_ids) if token == config.speech_token_id
        ]
        if len(speech_positions) != 1:
            raise ValueError(
                f"the prompt must hold exactly one {spec.SPEECH_TOKEN} token (id {config.speech_token_id} "
                f"in config.json), found {len(speech_positions)}; the tokenizer does not match the config"
            )
        self.speech_position = speech_positions[0]
        self.eos_token_id, self.pad_token_id, self.bos_token_id = (
            self._special_token_id(token) for token in (spec.EOS_TOKEN, spec.PAD_TOKEN, spec.BOS_TOKEN)
        )

    def _special_token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token; it is not a Qwen2 tokenizer")
        return token_id

    @classmethod
    def from_pretrained(
        cls, repo: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> ReferenceFireRedAsrLlm:
        repo = Path(repo)
        register_with_transformers()
        config = FireRedAsrLlmConfig.from_pretrained(repo)
        weights = load_converted_weights(repo)

        unexpected = sorted(
            k for k in weights if not k.startswith((*SPEECH_ENCODER_PREFIXES, LANGUAGE_MODEL_PREFIX))
        )
        if unexpected:
            raise ValueError(
                f"{repo}: unexpected tensors {unexpected[:5]}; the repo is not in the converted format"
            )
        # Popped one by one so a 7B model is not held twice while it changes dtype.
        llm_names = [name for name in weights if name.startswith(LANGUAGE_MODEL_PREFIX)]
        llm_weights = {name.removeprefix(LANGUAGE_MODEL_PREFIX): weights.pop(name).to(dtype) for name in llm_names}
        encoder_weights = weights

        speech_encoder = SpeechEncoder(config)
        speech_encoder.load_state_dict(encoder_weights, strict=True)
        speech_encoder.to(device=device, dtype=dtype)

        # The original decodes with transformers' eager attention.
        language_model, loading_info = Qwen2ForCausalLM.from_pretrained(
            None,
            config=config.text_config,
            state_dict=llm_weights,
            dtype=dtype,
            attn_implementation="eager",
            output_loading_info=True,
        )
        problems = {
            k: v for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := loading_info.get(k))
        }
        if problems:
            raise ValueError(f"{repo}: the language model weights do not match text_config: {problems}")
        language_model.to(device)

        tokenizer = AutoTokenizer.from_pretrained(repo)
        feature_extractor = FireRedAsrFeatureExtractor.from_pretrained(repo)
        return cls(config, speech_encoder, language_model, tokenizer, feature_extractor)

    # --- the pieces -----------------------------------------------------------

    def features(self, waveform: AudioClip, sampling_rate: int = spec.SAMPLE_RATE) -> torch.Tensor:
        """fbank + CMVN of one clip: [T, 80] float32; refuses clips the model cannot transcribe."""
        if sampling_rate != self.feature_extractor.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz; resample it to "
                f"{self.feature_extractor.sampling_rate} Hz first"
            )
        samples = torch.as_tensor(waveform)
        if not samples.is_floating_point():
            raise ValueError(
                f"audio must be floating point in [-1, 1], got {samples.dtype}; "
                f"divide integer PCM by {spec.SAMPLE_SCALE:g}"
            )
        self.feature_extractor.validate_waveform(samples, self.config.encoder_downsample_rate)
        return self.feature_extractor.compute_features(samples.to(device="cpu", dtype=torch.float32))

    @torch.inference_mode()
    def speech_embeddings(self, waveform: AudioClip, sampling_rate: int = spec.SAMPLE_RATE) -> torch.Tensor:
        """The N speech embeddings of one clip: [N, hidden] in the model's dtype."""
        features = self.features(waveform, sampling_rate).to(self.device)
        return self.speech_encoder(features[None], [features.shape[0]])[0]

    @torch.inference_mode()
    def prompt_embeds(
        self, waveform: AudioClip, sampling_rate: int = spec.SAMPLE_RATE
    ) -> tuple[torch.Tensor, int]:
        """The decoder input for one clip: ([prompt_len - 1 + N, hidden], N)."""
        speech = self.speech_embeddings(waveform, sampling_rate)
        prompt_ids = torch.tensor(self.prompt_token_ids, device=self.device)
        text = self.language_model.get_input_embeddings()(prompt_ids)
        position = self.speech_position
        embeds = torch.cat([text[:position], speech.to(text.dtype), text[position + 1 :]])
        return embeds, speech.shape[0]

    @torch.inference_mode()
    def _generate(
        self,
        waveform: AudioClip,
        sampling_rate: int,
        max_new_tokens: int | None,
        num_beams: int,
        with_logits: bool,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
    ):
        # The arguments' checks (ValueError naming the argument).
        Decoding(num_beams, repetition_penalty, length_penalty, max_new_tokens)
        embeds, num_embeddings = self.prompt_embeds(waveform, sampling_rate)
        if max_new_tokens is None:
            # The original's default (decode_max_len=0): one new token per speech embedding.
            max_new_tokens = max(1, num_embeddings)
        if num_beams > 1:
            if with_logits:
                raise ValueError("per-step logits are only returned for greedy decoding")
            return self._beam_search_4x(embeds, max_new_tokens, num_beams, float(repetition_penalty), length_penalty)
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=False,
            min_length=0,
            # transformers applies it to the logits, for the ids in `input_ids`: with
            # inputs_embeds only, those are the generated tokens alone, as in the original.
            repetition_penalty=float(repetition_penalty),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            output_logits=with_logits,
            return_dict_in_generate=True,
        )
        output = self.language_model.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long, device=self.device),
            generation_config=generation_config,
        )
        return output if with_logits else output.sequences[0].tolist()

    def _beam_search_4x(
        self, embeds: torch.Tensor, max_new_tokens: int, num_beams: int, repetition_penalty: float, length_penalty: float
    ) -> list[int]:
        """transformers 4.x `generate(inputs_embeds=..., num_beams=K, early_stopping=False)` for one clip.

        As 4.46.3's `_beam_search` with `BeamSearchScorer` (batch size 1):
        K copies of the prompt, beam scores [0, -1e9, ...]; each step the
        float32 log-softmax of the last logits, the repetition penalty on the
        generated ids (`input_ids` starts empty), plus the beam scores, top 2K
        over K * vocab; walking them best first an EOS candidate of rank < K
        becomes a hypothesis scored `sum / (t + 1) ** length_penalty` (t tokens
        before it), others refill the K beams; done when K hypotheses are kept
        and the worst of them >= the step's best candidate / (t + 1) **
        length_penalty; after N tokens the running beams are added with length
        N. The best hypothesis is returned with EOS appended when shorter than N.
        """
        model = self.language_model
        K = num_beams
        penalty = RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty) if repetition_penalty != 1.0 else None
        prompt_len = embeds.shape[0]
        output = model(
            inputs_embeds=embeds[None].expand(K, -1, -1),
            attention_mask=torch.ones(K, prompt_len, dtype=torch.long, device=self.device),
            use_cache=True,
        )
        cache = output.past_key_values
        input_ids = torch.zeros(K, 0, dtype=torch.long, device=self.device)
        beam_scores = torch.zeros(K, dtype=torch.float, device=self.device)
        beam_scores[1:] = -1e9
        hypotheses: list[tuple[float, list[int]]] = []
        worst_score = 1e9
        done = False

        def add(tokens: list[int], sum_logprobs: float, generated_len: int) -> None:
            nonlocal worst_score
            score = sum_logprobs / (generated_len**length_penalty)
            if len(hypotheses) < K or score > worst_score:
                hypotheses.append((score, tokens))
                if len(hypotheses) > K:
                    ranked = sorted((s, i) for i, (s, _) in enumerate(hypotheses))
                    del hypotheses[ranked[0][1]]
                    worst_score = ranked[1][0]
                else:
                    worst_score = min(score, worst_score)

        while True:
            scores = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)
            if penalty is not None:
                scores = penalty(input_ids, scores)
            scores = scores + beam_scores[:, None]
            vocab = scores.shape[-1]
            top_scores, top_indices = torch.topk(scores.view(-1), 2 * K, largest=True, sorted=True)
            cur_len = input_ids.shape[1] + 1
            next_scores, next_tokens, next_beams = [], [], []
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_indices.tolist())):
                beam, token = divmod(index, vocab)
                if token == self.eos_token_id:
                    if rank < K:
                        add(input_ids[beam].tolist(), score, cur_len)
                    continue
                next_scores.append(score)
                next_tokens.append(token)
                next_beams.append(beam)
                if len(next_beams) == K:
                    break
            done = len(hypotheses) >= K and worst_score >= top_scores[0].item() / (cur_len**length_penalty)
            beam_index = torch.tensor(next_beams, device=self.device)
            new_tokens = torch.tensor(next_tokens, device=self.device)
            input_ids = torch.cat([input_ids[beam_index], new_tokens[:, None]], dim=1)
            beam_scores = torch.tensor(next_scores, dtype=torch.float, device=self.device)
            if done or input_ids.shape[1] >= max_new_tokens:
                break
            cache.reorder_cache(beam_index)
            output = model(
                input_ids=new_tokens[:, None],
                attention_mask=torch.ones(K, prompt_len + input_ids.shape[1], dtype=torch.long, device=self.device),
                past_key_values=cache,
                use_cache=True,
            )
        if not done:
            for beam in range(K):
                add(input_ids[beam].tolist(), beam_scores[beam].item(), input_ids.shape[1])
        best = sorted(hypotheses, key=lambda h: h[0])[-1][1]
        return best + [self.eos_token_id] if len(best) < max_new_tokens else best

    def generate_ids(
        self,
        waveform: AudioClip,
        *,
        sampling_rate: int = spec.SAMPLE_RATE,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
    ) -> list[int]:
        """Decode one clip; returns the generated token ids (the prompt is not included)."""
        return self._generate(
            waveform,
            sampling_rate,
            max_new_tokens,
            num_beams,
            with_logits=False,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
        )

    def greedy_with_logprobs(
        self,
        waveform: AudioClip,
        *,
        num_logprobs: int = 5,
        sampling_rate: int = spec.SAMPLE_RATE,
        max_new_tokens: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> GreedyGeneration:
        """Greedy decoding of one clip with the top `num_logprobs` log-probabilities of every step."""
        output = self._generate(
            waveform, sampling_rate, max_new_tokens, num_beams=1, with_logits=True, repetition_penalty=repetition_penalty
        )
        logprobs = []
        for step_logits in output.logits:
            values, ids = torch.log_softmax(step_logits[0].float(), dim=-1).topk(num_logprobs)
            logprobs.append(dict(zip(ids.tolist(), values.tolist())))
        return GreedyGeneration(token_ids=output.sequences[0].tolist(), logprobs=logprobs)

    def transcribe(
        self,
        waveforms: list[AudioClip],
        sampling_rate: int = spec.SAMPLE_RATE,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
    ) -> list[Transcript]:
        """Transcribe 16 kHz mono clips in [-1, 1], each on its own (batch size 1).

        The original's recipe is `num_beams=3, repetition_penalty=3.0, length_penalty=1.0`.
        """
        results = []
        for waveform in waveforms:
            token_ids = self.generate_ids(
                waveform,
                sampling_rate=sampling_rate,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                repetition_penalty=repetition_penalty,
                length_penalty=length_penalty,
            )
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            results.append(Transcript(text=text, token_ids=token_ids))
        return results
