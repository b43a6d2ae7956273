"""Train the demo model: a tiny FireRedASR-LLM that recognises digit strings read in English and Mandarin.

    python -m fireredasr_vllm.demo.train OUT [--seed 0] [--threads 2]

The architecture is exactly FireRedASR-LLM's (this project's Conformer + adapter,
a transformers Qwen2 with LoRA), only small (`DEMO_SHAPES`). Training data is made
here with espeak-ng (`fireredasr_vllm.demo.speech`). Three stages, all reproducible
from the seed:

1. the Conformer encoder alone, with an auxiliary CTC head over the 20 digit words
   (the head is training-only and not saved) and SpecAugment;
2. the encoder frozen: adapter + Qwen2 (all weights) learn to transcribe from the
   encoder's cached outputs, teacher-forced on the original's prompt;
3. Qwen2 frozen: LoRA adapters (rank 8, alpha 16) on its seven projections of every
   layer, with the adapter, fine-tune the result: the release's LoRA is a real one.

OUT receives what a FireRedASR-LLM-L user downloads, written by the same release
writer as the test fixtures (`fireredasr_converter.fixtures.build_release`):
`FireRedASR-LLM-L/` (model.pth.tar with args and encoder/adapter/LoRA tensors,
asr_encoder.pth.tar, cmvn.ark from the training features, the v1 symlink) beside
`Qwen2-7B-Instruct/` (bf16 base weights, tokenizer), plus `heldout/` (16 kHz WAVs,
Kaldi `wav.scp` and `text`). Finally OUT is converted with `fireredasr-convert` and
the held-out CER of the reference implementation is printed.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fireredasr_converter import spec
from fireredasr_converter.feature_extraction import kaldi_fbank
from fireredasr_converter.fixtures import LORA_PREFIX, ReleaseShapes, ReleaseWeights, build_release
from fireredasr_converter.pipeline import convert

from ..reference import ReferenceFireRedAsrLlm
from ..scoring import score
from . import speech

DEMO_SHAPES = ReleaseShapes(
    encoder_layers=4,
    encoder_heads=2,
    encoder_dim=128,
    llm_hidden=192,
    llm_layers=2,
    llm_heads=3,  # head_dim 64: vLLM's CPU attention backend needs it
    llm_kv_heads=1,
    llm_intermediate=512,
    llm_vocab_rows=640,
    lora_rank=8,
    bpe_vocab_size=512,
)
TRAIN_UTTERANCES = 6000
HELDOUT_UTTERANCES = 40


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    peak_lr: float
    warmup: int = 200


STAGES = {
    "ctc": Schedule(steps=2500, batch_size=32, peak_lr=1e-3),
    "decoder": Schedule(steps=2500, batch_size=32, peak_lr=1e-3),
    "lora": Schedule(steps=400, batch_size=32, peak_lr=5e-4, warmup=50),
}


# --- data ---------------------------------------------------------------------------


@dataclass
class Example:
    features: torch.Tensor  # [T, 80], CMVN applied
    ctc_labels: list[int]  # 1..20, 0 is the CTC blank
    target_ids: list[int]  # transcript tokens + <|im_end|>


def ctc_labels(utterance: speech.Utterance) -> list[int]:
    offset = 1 if utterance.language == "en" else 1 + len(speech.ENGLISH_DIGITS)
    return [offset + int(d) for d in utterance.digits]


def cmvn_stats(features: Sequence[torch.Tensor]) -> np.ndarray:
    """Kaldi CMVN statistics (2 x 81 float64: sums with the count, sums of squares) of raw fbank."""
    stats = np.zeros((2, spec.NUM_MEL_BINS + 1), dtype=np.float64)
    for f in features:
        values = f.double().numpy()
        stats[0, :-1] += values.sum(axis=0)
        stats[1, :-1] += (values**2).sum(axis=0)
        stats[0, -1] += values.shape[0]
    return stats


def apply_cmvn(features: torch.Tensor, stats: np.ndarray) -> torch.Tensor:
    mean, istd, _ = spec.cmvn_from_stats(stats)
    return ((features.double() - torch.from_numpy(mean)) * torch.from_numpy(istd)).float()


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of similar lengths (little padding), in a new random order each pass."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    while True:
        rng.shuffle(batches)
        yield from batches


def spec_augment(features: torch.Tensor, lengths: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Two frequency masks (<= 10 bins) and two time masks (<= 10% of each clip) per clip."""
    features = features.clone()
    for row, length in enumerate(lengths):
        for _ in range(2):
            width = int(torch.randint(0, 11, (1,), generator=generator))
            start = int(torch.randint(0, spec.NUM_MEL_BINS - width + 1, (1,), generator=generator))
            features[row, :, start : start + width] = 0.0
            width = int(torch.randint(0, max(1, length // 10) + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, length - width + 1), (1,), generator=generator))
            features[row, start : start + width] = 0.0
    return features


def lr_at(step: int, schedule: Schedule) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < schedule.warmup:
        return schedule.peak_lr * (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return schedule.peak_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_stage(
    name: str,
    parameters: list[nn.Parameter],
    loss_of_batch: Callable[[list[int]], torch.Tensor],
    lengths: Sequence[int],
    seed: int,
) -> None:
    schedule = STAGES[name]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.peak_lr, weight_decay=0.01)
    batches = length_batches(lengths, schedule.batch_size, random.Random(seed))
    start, recent = time.perf_counter(), []
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = loss_of_batch(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == schedule.steps:
            minutes = (time.perf_counter() - start) / 60
            print(f"[{name}] step {step + 1}/{schedule.steps} loss {np.mean(recent):.4f} ({minutes:.1f} min)", flush=True)
            recent = []


# --- LoRA ---------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """A frozen linear plus PEFT's LoRA update (alpha / r) * B @ A; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = spec.lora_scale(alpha, rank)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(language_model: nn.Module, rank: int, generator: torch.Generator) -> dict[str, LoraLinear]:
    """Wrap the seven LoRA targets of every layer; returns them by `layers.{i}.{target}`."""
    wrapped = {}
    for index, layer in enumerate(language_model.model.layers):
        for target in spec.LORA_TARGET_MODULES:
            parent_name, child_name = target.split(".")
            parent = getattr(layer, parent_name)
            lora = LoraLinear(getattr(parent, child_name), rank, spec.LORA_DEFAULT_ALPHA, generator)
            setattr(parent, child_name, lora)
            wrapped[f"{index}.{target}"] = lora
    return wrapped


# --- the trainer ------------------------------------------------------------------------


class DemoTrainer:
    """The reference model's modules, trained in place, and the batches each stage feeds them."""

    def __init__(self, model: ReferenceFireRedAsrLlm, examples: list[Example], seed: int):
        self.model = model
        self.examples = examples
        self.lengths = [e.features.shape[0] for e in examples]
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        prompt = model.prompt_token_ids
        self.prefix_ids = torch.tensor(prompt[: model.speech_position])
        self.suffix_ids = torch.tensor(prompt[model.speech_position + 1 :])
        encoder_dim = model.config.encoder_config.d_model
        self.ctc_head = nn.Linear(encoder_dim, 1 + 2 * len(speech.ENGLISH_DIGITS))
        self.encoded: list[torch.Tensor] = []
        language_model = model.language_model
        if hasattr(language_model, "set_attn_implementation"):
            language_model.set_attn_implementation("sdpa")  # training only; the saved model is unchanged

    def ctc_loss(self, batch: list[int]) -> torch.Tensor:
        items = [self.examples[i] for i in batch]
        lengths = [e.features.shape[0] for e in items]
        features = nn.utils.rnn.pad_sequence([e.features for e in items], batch_first=True)
        features = spec_augment(features, lengths, self.generator)
        hidden, enc_lengths = self.model.speech_encoder.encoder(features, lengths)
        log_probs = F.log_softmax(self.ctc_head(hidden), dim=-1).transpose(0, 1)
        targets = torch.tensor([label for e in items for label in e.ctc_labels])
        return F.ctc_loss(
            log_probs,
            targets,
            torch.tensor(enc_lengths),
            torch.tensor([len(e.ctc_labels) for e in items]),
            blank=0,
            zero_infinity=True,
        )

    @torch.no_grad()
    def cache_encoder_outputs(self) -> None:
        encoder = self.model.speech_encoder.encoder.eval()
        self.encoded = [None] * len(self.examples)
        order = sorted(range(len(self.examples)), key=lambda i: self.lengths[i])
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            lengths = [self.lengths[i] for i in batch]
            features = nn.utils.rnn.pad_sequence([self.examples[i].features for i in batch], batch_first=True)
            hidden, enc_lengths = encoder(features, lengths)
            for index, rows, length in zip(batch, hidden, enc_lengths):
                self.encoded[index] = rows[:length].clone()

    def decoder_loss(self, batch: list[int]) -> torch.Tensor:
        """Teacher-forced cross-entropy of transcript + <|im_end|> after the original's prompt."""
        embed = self.model.language_model.get_input_embeddings()
        adapter = self.model.speech_encoder.encoder_projector
        prefix, suffix = embed(self.prefix_ids), embed(self.suffix_ids)
        rows, labels = [], []
        for index in batch:
            speech_rows = adapter(self.encoded[index])
            target = torch.tensor(self.examples[index].target_ids)
            rows.append(torch.cat([prefix, speech_rows, suffix, embed(target)]))
            prompt_len = rows[-1].shape[0] - len(target)
            labels.append(torch.cat([torch.full((prompt_len,), -100), target]))
        inputs = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
        padded_labels = nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
        return self.model.language_model(inputs_embeds=inputs, attention_mask=mask, labels=padded_labels).loss

    def train(self) -> dict[str, LoraLinear]:
        encoder = self.model.speech_encoder.encoder
        adapter = self.model.speech_encoder.encoder_projector
        language_model = self.model.language_model
        for module in (encoder, adapter, language_model):
            module.train()

        encoder.requires_grad_(True)
        run_stage("ctc", [*encoder.parameters(), *self.ctc_head.parameters()], self.ctc_loss, self.lengths, self.seed)

        encoder.requires_grad_(False)
        self.cache_encoder_outputs()
        parameters = [*adapter.parameters(), *language_model.parameters()]
        run_stage("decoder", parameters, self.decoder_loss, self.lengths, self.seed + 1)

        language_model.requires_grad_(False)
        loras = add_lora(language_model, DEMO_SHAPES.lora_rank, self.generator)
        parameters = [*adapter.parameters()] + [p for lora in loras.values() for p in (lora.lora_A, lora.lora_B)]
        run_stage("lora", parameters, self.decoder_loss, self.lengths, self.seed + 2)
        return loras


def release_weights(model: ReferenceFireRedAsrLlm, loras: dict[str, LoraLinear], stats: np.ndarray) -> ReleaseWeights:
    """The trained tensors under the release's names: model.pth.tar's and the Qwen2 folder's."""
    model_tensors = {
        name: tensor
        for name, tensor in model.speech_encoder.state_dict().items()
        if name != "encoder.positional_encoding.pe"  # derived; the writer computes it
    }
    for key, lora in loras.items():
        model_tensors[f"{LORA_PREFIX}.{key}.lora_A.default.weight"] = lora.lora_A.detach()
        model_tensors[f"{LORA_PREFIX}.{key}.lora_B.default.weight"] = lora.lora_B.detach()
    llm_tensors = {}
    for name, tensor in model.language_model.state_dict().items():
        # LoRA-wrapped linears hold their base weight under `.base.`; the release has the plain names.
        name = name.replace(".base.", ".")
        if ".lora_" not in name:
            llm_tensors[name] = tensor
    return ReleaseWeights(model=model_tensors, llm=llm_tensors, cmvn_stats=stats)


def heldout_error_rate(repo: Path, heldout: list[speech.Utterance], waveforms: list[np.ndarray]) -> float:
    """The recipe's error rate (Chinese by characters, English by words) of greedy decoding, in %."""
    reference = ReferenceFireRedAsrLlm.from_pretrained(repo)
    hypotheses = {}
    for utterance, result in zip(heldout, reference.transcribe(waveforms)):
        hypotheses[utterance.uttid] = result.text
        print(f"{utterance.uttid}\t{utterance.text}\t->\t{result.text}")
    return score({u.uttid: u.text for u in heldout}, hypotheses).total.error_rate


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="torch CPU threads.")
@click.option("--train-utterances", type=click.IntRange(min=100), default=TRAIN_UTTERANCES, show_default=True)
def main(out: Path, seed: int, threads: int, train_utterances: int) -> None:
    """Train the demo FireRedASR-LLM on espeak-ng digit speech and write it to OUT in the original release layout."""
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty; give a new or empty folder")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.perf_counter()

    heldout = speech.plan_utterances(HELDOUT_UTTERANCES, seed + 1000, speech.HELDOUT_VARIANTS, set(), "heldout")
    unseen = {u.digits for u in heldout}
    training = speech.plan_utterances(train_utterances, seed, speech.TRAINING_VARIANTS, unseen, "train")
    print(f"synthesising {len(training)} training and {len(heldout)} held-out utterances", flush=True)
    train_waves = speech.render(training, seed)
    heldout_waves = speech.render(heldout, seed + 1000)

    raw = [kaldi_fbank(torch.from_numpy(w)) for w in train_waves]
    stats = cmvn_stats(raw)

    with tempfile.TemporaryDirectory(prefix="fireredasr-demo-") as scratch:
        scratch = Path(scratch)
        # A random-weight release at the demo shapes gives the tokenizer and the modules to train.
        skeleton = build_release(
            scratch / "skeleton", DEMO_SHAPES, seed=seed, tokenizer_corpus=speech.transcript_corpus(), llm_shards=1
        )
        convert(skeleton.model_dir, scratch / "skeleton-repo", dtype="fp32")
        model = ReferenceFireRedAsrLlm.from_pretrained(scratch / "skeleton-repo")
        tokenizer = model.tokenizer
        spellings = [*speech.ENGLISH_DIGITS, *(" " + w for w in speech.ENGLISH_DIGITS), *speech.MANDARIN_DIGITS]
        for word in spellings:
            ids = tokenizer.encode(word, add_special_tokens=False)
            if len(ids) != 1:
                raise SystemExit(f"the tokenizer splits {word!r} into {ids}; grow DEMO_SHAPES.bpe_vocab_size")
        examples = [
            Example(
                features=apply_cmvn(f, stats),
                ctc_labels=ctc_labels(u),
                target_ids=tokenizer.encode(u.text, add_special_tokens=False) + [model.eos_token_id],
            )
            for f, u in zip(raw, training)
        ]
        trainer = DemoTrainer(model, examples, seed)
        loras = trainer.train()

        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out))
        build_release(
            staging,
            DEMO_SHAPES,
            seed=seed,
            weights=release_weights(model, loras, stats),
            tokenizer_corpus=speech.transcript_corpus(),
            llm_shards=1,
        )
        speech.write_kaldi_set(staging / "heldout", heldout, heldout_waves)
        for entry in staging.iterdir():
            entry.rename(out / entry.name)
        staging.rmdir()

        repo = scratch / "demo-repo"
        convert(out / "FireRedASR-LLM-L", repo, dtype="fp32")
        error_rate = heldout_error_rate(repo, heldout, heldout_waves)
    print(f"held-out CER {error_rate:.2f}% over {len(heldout)} clips; {(time.perf_counter() - started) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
