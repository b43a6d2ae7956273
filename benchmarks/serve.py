"""Offline serving benchmark: the vLLM plugin against the reference implementation and stock vLLM.

Builds a synthetic FireRedASR-LLM-L release (random weights) at the chosen scale,
converts it for the plugin and with `--target stock-vllm` for stock vLLM's own
`FireRedASR2ForConditionalGeneration` (docs/stock-vllm.md), then runs the SAME
clips through each backend, each in its own process:

- reference: the plain PyTorch implementation, the original's `generate` path
  (one clip at a time, transformers' eager attention);
- plugin: `LLM(model=converted)` with this project's plugin, all clips submitted
  at once (continuous batching);
- stock: `LLM(model=stock_export)` with no plugin loaded (`VLLM_PLUGINS=""`),
  submitted the same way with stock's prompt (placeholder `<|AUDIO|>`).

Clips are synthetic speech with durations log-uniform in [1, 20] s. Every clip
generates exactly N tokens on every backend, N = its number of speech embeddings
(the original's `max_new_tokens`; `--output-tokens K` fixes K instead), with EOS
ignored on vLLM and min_new_tokens = max_new_tokens on the reference, so the work
is the same with random weights. Reported per backend: model load time, utterances/s and RTFx
(audio seconds per wall second) with all clips submitted at once, the p50/p95
latency of a clip decoded on its own (the first `--latency-clips` clips, one
after another), and the ratios against the reference.

    python benchmarks/serve.py --scale tiny
    python benchmarks/serve.py --scale medium            # LLM-L shapes scaled by 1/8 (CPU: a few minutes)
    python benchmarks/serve.py --scale quarter --clips 32 # LLM-L's proportions, every size x 1/4 (the CPU figure)
    python benchmarks/serve.py --scale llm-l --dtype bfloat16  # the real shapes, on a GPU
    python benchmarks/serve.py --backends plugin-eager,plugin-compiled  # vLLM's eager vs compiled engine
    python benchmarks/serve.py --decoding recipe --backends reference,plugin  # beam 3 + repetition penalty 3.0

`--decoding recipe` decodes with the original's recipe (beam 3, repetition
penalty 3.0, length penalty 1.0, N tokens at most) instead of greedy N tokens:
the reference's transformers-4.x beam search one clip at a time against the
plugin's batched beam search on the engine (prefix caching on: the beams share
their prompt). Random weights practically never emit `<|im_end|>`, so both run
N steps per clip; the tokens each clip generated are compared between backends
(in float32 they should be the same transcripts). Stock vLLM has no such beam
search and is not run in this mode.

`--model aed` benchmarks FireRedASR-AED instead (a synthetic FireRedASR-AED-L release at
`--scale` tiny, eighth or quarter: AED-L's depths and widths x 1/8 or 1/4, head size and
vocabulary kept, or aed-l). Its reference is what serves FireRedASR-AED today: the
original's batch beam search at its settings (beam 3, softmax smoothing 1.25, length
penalty 0.6, EOS penalty 1.0; `aed_reference`), the clips in padded batches of 2 as the
original's recipe batches them, whatever `--decoding` says; the plugin decodes greedily (E tokens
per clip, EOS ignored, E = its encoder frames, the original's limit) or, with `--decoding
recipe`, runs the same beam search on the engine (`aed_beam_search`, through the API's
decoder), whose token ids are then compared with the reference's. Stock vLLM has no AED
model.

    python benchmarks/serve.py --model aed --scale eighth --clips 16 --latency-clips 4
    python benchmarks/serve.py --model aed --scale tiny --decoding recipe --clips 4

Exit status 1 when a backend fails or generates another number of tokens than asked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from fireredasr_converter import spec
from fireredasr_converter.repo_format import DTYPES, dtype_name
from fireredasr_converter.fixtures import (
    AED_L_SHAPES,
    LLM_L_SHAPES,
    TINY_AED_SHAPES,
    TINY_SHAPES,
    AedShapes,
    build_aed_release,
    build_release,
    scaled_shapes,
    synthetic_speech,
)
from fireredasr_converter.stock_vllm import STOCK_AUDIO_TOKEN, STOCK_VLLM_TARGET
from fireredasr_vllm.offline import default_max_new_tokens
from fireredasr_vllm.stock_serving import enable_stock_processor_without_torchvision

# At module level: vLLM's spawned engine processes re-run this script's top level.
# (A no-op where torchvision is installed; only stock's processor needs it.)
enable_stock_processor_without_torchvision()

SCALES = {
    "tiny": TINY_SHAPES,
    # Qwen2: 4 layers, hidden 896, 7 heads; Conformer: 2 layers, d_model 128. Vocabulary as the real one.
    # Rounding to whole heads shrinks the encoder ~800-fold but the LLM ~110-fold.
    "medium": scaled_shapes(LLM_L_SHAPES, 1 / 8),
    # LLM-L's proportions: every depth and width of both towers x 1/4 (Conformer 4 layers x 320,
    # Qwen2 7 layers x 896, 7 heads / 1 KV head), so the encoder's share of the work is the real one's.
    # Vocabulary as the real one.
    "quarter": scaled_shapes(LLM_L_SHAPES, 1 / 4),
    "llm-l": LLM_L_SHAPES,
}


def scaled_aed_shapes(shapes: AedShapes, scale: float) -> AedShapes:
    """FireRedASR-AED's depths and widths x `scale`, keeping the head size and the output vocabulary's size."""
    heads = max(1, round(shapes.encoder_heads * scale))
    return dataclasses.replace(
        shapes,
        encoder_layers=max(1, round(shapes.encoder_layers * scale)),
        encoder_heads=heads,
        encoder_dim=heads * shapes.encoder_head_dim,
        decoder_layers=max(1, round(shapes.decoder_layers * scale)),
    )


AED_SCALES = {
    "tiny": TINY_AED_SHAPES,
    # AED-L x 1/8: Conformer 2 layers x 128 (2 heads of 64), 2 decoder layers; AED-L's 7832 output tokens.
    "eighth": scaled_aed_shapes(AED_L_SHAPES, 1 / 8),
    # AED-L x 1/4: Conformer 4 layers x 320 (5 heads of 64), 4 decoder layers.
    "quarter": scaled_aed_shapes(AED_L_SHAPES, 1 / 4),
    "aed-l": AED_L_SHAPES,
}
MODELS = ("llm", "aed")
# FireRedASR-AED's reference decodes the clips in padded batches of this many, in input order:
# the original's recipe (examples/inference_fireredasr_aed.sh) runs speech2text.py --batch_size 2.
AED_REFERENCE_BATCH = 2
# `plugin` runs with fireredasr_vllm.offline.create_engine's defaults; the two variants force
# vLLM's eager mode (no torch.compile, no CUDA graphs) or its compiled mode.
PLUGIN_VARIANTS = {"plugin": {}, "plugin-eager": {"enforce_eager": True}, "plugin-compiled": {"enforce_eager": False}}
BACKENDS = ("reference", *PLUGIN_VARIANTS, "stock")
DEFAULT_BACKENDS = ("reference", "plugin", "stock")
DECODINGS = ("greedy", "recipe")
# The original's recipe: transformers generate(num_beams=3, repetition_penalty=3.0, length_penalty=1.0).
RECIPE = {"num_beams": 3, "repetition_penalty": 3.0, "length_penalty": 1.0}
MIN_SECONDS, MAX_SECONDS = 1.0, 20.0
RESULT_MARKER = "BENCHMARK_RESULT "
TARGET_SPEEDUP = 5.0
RECIPE_TARGET_SPEEDUP = 3.0


def clip_durations(num_clips: int, seed: int) -> list[float]:
    """Log-uniform in [1, 20] s (more short clips than long ones, as in ASR test sets), 10 ms steps."""
    rng = np.random.default_rng(seed)
    durations = np.exp(rng.uniform(math.log(MIN_SECONDS), math.log(MAX_SECONDS), num_clips))
    return [round(float(d), 2) for d in durations]


def clip_samples(duration: float) -> int:
    return int(duration * spec.SAMPLE_RATE)


def make_clips(durations: list[float], first_seed: int = 0) -> list[np.ndarray]:
    return [synthetic_speech(clip_samples(d), seed=first_seed + i) for i, d in enumerate(durations)]


# Latency clips of the recipe mode: new audio (with the same durations), so that no
# prefix cached by the throughput pass serves them.
LATENCY_SEED = 100_000


def tokens_per_clip(durations: list[float], output_tokens: int | None, downsample_rate: int) -> list[int]:
    """What each clip must generate: `output_tokens`, or N (the original's limit) when None."""
    if output_tokens is not None:
        return [output_tokens] * len(durations)
    return [default_max_new_tokens(clip_samples(d), downsample_rate) for d in durations]


def parse_output_tokens(context, param, value: str) -> int | None:
    if value == "n":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter(f"expected 'n' (each clip's speech embedding count) or a positive integer, got {value!r}")


def parse_backends(context, param, value: str | None) -> list[str] | None:
    if value is None:
        return None  # the model's default
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise click.BadParameter(f"expected a comma-separated subset of {', '.join(BACKENDS)}, got {value!r}")
    return [name for name in BACKENDS if name in names]


# --- workers (one process per backend) ----------------------------------------


def timed_passes(decode_all, clips: list[np.ndarray], latency_clips: list[np.ndarray]) -> tuple[list, float, list[float]]:
    """A warm-up clip, then all `clips` at once (outputs, wall seconds), then each latency clip on its own (seconds)."""
    decode_all(clips[:1])
    start = time.perf_counter()
    outputs = decode_all(clips)
    wall = time.perf_counter() - start
    latencies = []
    for clip in latency_clips:
        clip_start = time.perf_counter()
        decode_all([clip])
        latencies.append(time.perf_counter() - clip_start)
    return outputs, wall, latencies


def run_reference_recipe(repo: Path, clips: list[np.ndarray], output_tokens: int | None, dtype: str,
                         latency_clips: list[np.ndarray], model_kind: str = "llm") -> dict:
    """The reference's beam search with the original's recipe: FireRedASR-LLM's one clip at a time,
    FireRedASR-AED's (its own recipe) in padded batches of AED_REFERENCE_BATCH, as the original runs each."""
    import torch

    from fireredasr_vllm.aed_reference import ReferenceFireRedAsrAed
    from fireredasr_vllm.decoding import AED_RECIPE
    from fireredasr_vllm.reference import ReferenceFireRedAsrLlm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = ReferenceFireRedAsrAed if model_kind == "aed" else ReferenceFireRedAsrLlm
    start = time.perf_counter()
    model = reference.from_pretrained(repo, dtype=getattr(torch, dtype), device=device)
    load_seconds = time.perf_counter() - start

    def decode_all(batch: list[np.ndarray]) -> list[list[int]]:
        if model_kind == "aed":
            recipe = dataclasses.replace(AED_RECIPE, max_new_tokens=output_tokens)
            size = AED_REFERENCE_BATCH
            return [ids for i in range(0, len(batch), size) for ids in model.generate_ids(batch[i : i + size], recipe)]
        return [model.generate_ids(clip, max_new_tokens=output_tokens, **RECIPE) for clip in batch]

    outputs, wall, latencies = timed_passes(decode_all, clips, latency_clips)
    return {"load_s": load_seconds, "batch_wall_s": wall, "latencies_s": latencies,
            "generated": [len(ids) for ids in outputs], "token_ids": outputs}  # fmt: skip


def run_plugin_recipe(repo: Path, clips: list[np.ndarray], output_tokens: int | None, dtype: str,
                      latency_clips: list[np.ndarray], engine_kwargs: dict, model_kind: str = "llm") -> dict:
    """The plugin's batched beam search with the original's recipe (FireRedASR-AED: its own), all clips at once."""
    from fireredasr_vllm.decoders import VllmDecoder
    from fireredasr_vllm.decoding import AED_RECIPE, Decoding
    from fireredasr_vllm.engine import engine_settings
    from fireredasr_vllm.offline import create_engine, shutdown_engine

    if model_kind == "aed":
        decoding = dataclasses.replace(AED_RECIPE, max_new_tokens=output_tokens)
        caching = {}  # vLLM has no prefix caching for encoder-decoder models
    else:
        decoding = Decoding(beam_size=RECIPE["num_beams"], repetition_penalty=RECIPE["repetition_penalty"],
                            length_penalty=RECIPE["length_penalty"], max_new_tokens=output_tokens)  # fmt: skip
        caching = {"enable_prefix_caching": True}

    def decode_all(batch: list[np.ndarray]) -> list[list[int]]:
        ids: list[list[int]] = [[] for _ in batch]
        # The API's decoder with every clip in flight (batch_size counts a request per beam).
        found = VllmDecoder(llm).transcribe(enumerate(batch), decoding, batch_size=decoding.beam_size * len(batch))
        for index, result in found:
            if isinstance(result, Exception):
                raise result
            ids[index] = list(result.token_ids)
        return ids

    start = time.perf_counter()
    # The engine the CLI and the API build for this decoding (engine_settings), plus the variant's settings.
    llm = create_engine(repo, **engine_settings(decoding, dtype=dtype, seed=0), **caching, **engine_kwargs)
    load_seconds = time.perf_counter() - start
    try:
        outputs, wall, latencies = timed_passes(decode_all, clips, latency_clips)
    finally:
        shutdown_engine(llm)
    return {"load_s": load_seconds, "batch_wall_s": wall, "latencies_s": latencies,
            "generated": [len(ids) for ids in outputs], "token_ids": outputs}  # fmt: skip


def run_reference(
    repo: Path, clips: list[np.ndarray], output_tokens: int | None, dtype: str, latency_clips: int
) -> dict:
    import torch
    from transformers import GenerationConfig

    from fireredasr_vllm.reference import ReferenceFireRedAsrLlm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = ReferenceFireRedAsrLlm.from_pretrained(repo, dtype=getattr(torch, dtype), device=device)
    load_seconds = time.perf_counter() - start

    def decode(clip: np.ndarray) -> int:
        limit = output_tokens or default_max_new_tokens(len(clip), model.config.encoder_downsample_rate)
        config = GenerationConfig(
            max_new_tokens=limit,
            min_new_tokens=limit,
            do_sample=False,
            num_beams=1,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.pad_token_id,
        )
        # The reference's own path: speech embeddings spliced into the prompt, then `generate`.
        embeds, _ = model.prompt_embeds(clip)
        with torch.inference_mode():
            output = model.language_model.generate(
                inputs_embeds=embeds[None],
                attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long, device=model.device),
                generation_config=config,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return output.shape[1]

    decode(clips[0])  # warm-up
    latencies, generated = [], []
    start = time.perf_counter()
    for clip in clips:
        clip_start = time.perf_counter()
        generated.append(decode(clip))
        latencies.append(time.perf_counter() - clip_start)
    wall = time.perf_counter() - start
    # One clip at a time: the batch run holds the single-clip latencies.
    return {
        "load_s": load_seconds,
        "batch_wall_s": wall,
        "latencies_s": latencies[:latency_clips],
        "generated": generated,
    }


def run_vllm(
    repo: Path,
    clips: list[np.ndarray],
    output_tokens: int | None,
    dtype: str,
    latency_clips: int,
    prompt: str | None,
    engine_kwargs: dict,
) -> dict:
    from fireredasr_vllm.offline import create_engine, shutdown_engine, stream_transcriptions

    def decode_all(batch: list[np.ndarray]) -> list[int]:
        generated = [0] * len(batch)
        for index, result in stream_transcriptions(
            llm, enumerate(batch), max_new_tokens=output_tokens, ignore_eos=True, max_in_flight=len(batch), prompt=prompt
        ):
            if isinstance(result, Exception):
                raise result
            generated[index] = len(result.token_ids)
        return generated

    start = time.perf_counter()
    # No prefix or processor caching: the latency pass decodes clips the throughput pass
    # has seen, and each must cost what a new clip costs.
    llm = create_engine(repo, dtype=dtype, seed=0, enable_prefix_caching=False, mm_processor_cache_gb=0, **engine_kwargs)
    load_seconds = time.perf_counter() - start
    try:
        generated, wall, latencies = timed_passes(decode_all, clips, clips[:latency_clips])
    finally:
        shutdown_engine(llm)
    return {"load_s": load_seconds, "batch_wall_s": wall, "latencies_s": latencies, "generated": generated}


def run_backend(
    backend: str, repo: Path, durations: list[float], output_tokens: int | None, dtype: str, latency_clips: int,
    decoding: str = "greedy", model_kind: str = "llm",
) -> None:
    clips = make_clips(durations)
    # FireRedASR-AED's reference is the original's beam search whatever the plugin runs: what serves it today.
    if decoding == "recipe" or (model_kind == "aed" and backend == "reference"):
        fresh = make_clips(durations[:latency_clips], first_seed=LATENCY_SEED)
        if backend == "reference":
            result = run_reference_recipe(repo, clips, output_tokens, dtype, fresh, model_kind)
        else:
            result = run_plugin_recipe(repo, clips, output_tokens, dtype, fresh, PLUGIN_VARIANTS[backend], model_kind)
    elif backend == "reference":
        result = run_reference(repo, clips, output_tokens, dtype, latency_clips)
    else:
        prompt = spec.transcription_prompt(STOCK_AUDIO_TOKEN) if backend == "stock" else None
        result = run_vllm(repo, clips, output_tokens, dtype, latency_clips, prompt, PLUGIN_VARIANTS.get(backend, {}))
    print(RESULT_MARKER + json.dumps(result), flush=True)


# --- the driver ---------------------------------------------------------------


def run_worker(
    backend: str, repo: Path, durations: list[float], output_tokens: int | None, dtype: str, latency_clips: int,
    decoding: str = "greedy", model_kind: str = "llm",
) -> dict:
    command = [
        sys.executable, __file__, "--worker", backend, "--repo", str(repo),
        "--durations", ",".join(map(str, durations)), "--output-tokens", str(output_tokens or "n"), "--dtype", dtype,
        "--latency-clips", str(latency_clips), "--decoding", decoding, "--model", model_kind,
    ]  # fmt: skip
    # vLLM logs go to stderr, so stdout holds only the result line.
    env = dict(os.environ, VLLM_LOGGING_STREAM="ext://sys.stderr", VLLM_LOGGING_LEVEL="WARNING")
    if backend == "stock":
        # Stock vLLM on its own: no plugin loaded, its built-in FireRedASR2 serves the export.
        env["VLLM_PLUGINS"] = ""
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line.removeprefix(RESULT_MARKER))
    raise RuntimeError(
        f"the {backend} worker failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
    )


def tokens_description(output_tokens: int | None) -> str:
    return "N per clip" if output_tokens is None else f"{output_tokens} per clip"


def summarise(result: dict, audio_seconds: float) -> dict:
    latencies = np.array(result["latencies_s"])
    return {
        "load_s": result["load_s"],
        "utt_per_s": len(result["generated"]) / result["batch_wall_s"],
        "rtfx": audio_seconds / result["batch_wall_s"],
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
    }


def print_table(rows: dict[str, dict]) -> None:
    reference = rows.get("reference")
    header = f"{'backend':<16} {'load s':>7} {'utt/s':>8} {'RTFx':>8} {'p50 s':>7} {'p95 s':>7}  vs reference (utt/s, p50)"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        ratios = ""
        if reference is not None and name != "reference":
            ratios = f"  {row['utt_per_s'] / reference['utt_per_s']:.2f}x, {reference['p50_s'] / row['p50_s']:.2f}x"
        print(
            f"{name:<16} {row['load_s']:7.1f} {row['utt_per_s']:8.2f} {row['rtfx']:8.1f} "
            f"{row['p50_s']:7.3f} {row['p95_s']:7.3f}{ratios}"
        )
    pairs = [(variant, "stock") for variant in PLUGIN_VARIANTS]
    pairs.append(("plugin-compiled", "plugin-eager"))
    for name, baseline in pairs:
        if name in rows and baseline in rows:
            row, base = rows[name], rows[baseline]
            print(
                f"{name} vs {baseline}: {row['utt_per_s'] / base['utt_per_s']:.2f}x utt/s, "
                f"{base['p50_s'] / row['p50_s']:.2f}x p50 latency"
            )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_kind", type=click.Choice(MODELS), default="llm", show_default=True,
              help="llm: FireRedASR-LLM-L; aed: FireRedASR-AED-L, against the original's batched beam search.")
@click.option("--scale", type=click.Choice(list(dict.fromkeys([*SCALES, *AED_SCALES]))),
              help=f"llm: {', '.join(SCALES)} [default: medium]; aed: {', '.join(AED_SCALES)} [default: eighth].")
@click.option("--clips", "num_clips", type=click.IntRange(min=1), default=64, show_default=True,
              help="Clips submitted at once for the throughput figures.")
@click.option("--latency-clips", type=click.IntRange(min=1), default=16, show_default=True,
              help="Clips decoded one after another for the latency figures.")
@click.option("--output-tokens", default="n", show_default=True, callback=parse_output_tokens,
              help="Tokens every clip generates, EOS ignored: 'n' = its speech embedding count "
                   "(the original's limit), or a fixed number.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]),
              help="[default: float32 on CPU, bfloat16 on a GPU]")
@click.option("--backends", "selected", callback=parse_backends,
              help=f"Comma-separated, from {', '.join(BACKENDS)} [default: {','.join(DEFAULT_BACKENDS)}; "
                   f"--model aed: reference,plugin].")
@click.option("--decoding", type=click.Choice(DECODINGS), default="greedy", show_default=True,
              help="greedy: N tokens per clip, EOS ignored; recipe: the original's beam 3 + repetition penalty 3.0 "
                   "(reference and plugin backends).")
@click.option("--seed", type=int, default=0, show_default=True, help="Clip durations and weights.")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the release and conversions here (default: a temporary folder, removed afterwards).")
@click.option("--worker", "worker_backend", type=click.Choice(BACKENDS), hidden=True)
@click.option("--repo", type=click.Path(path_type=Path), hidden=True)
@click.option("--durations", hidden=True)
def main(model_kind, scale, num_clips, latency_clips, output_tokens, dtype, selected, decoding, seed, workdir,
         worker_backend, repo, durations):
    """Throughput and latency of the vLLM plugin, the reference and stock vLLM on the same model and clips."""
    if worker_backend is not None:
        clip_seconds = [float(d) for d in durations.split(",")]
        run_backend(worker_backend, repo, clip_seconds, output_tokens, dtype, latency_clips, decoding, model_kind)
        return
    scales = AED_SCALES if model_kind == "aed" else SCALES
    scale = scale or ("eighth" if model_kind == "aed" else "medium")
    if scale not in scales:
        raise click.UsageError(f"--model {model_kind} has the scales {', '.join(scales)}, not {scale}")
    selected = selected or (["reference", "plugin"] if model_kind == "aed" else list(DEFAULT_BACKENDS))
    if model_kind == "aed" and "stock" in selected:
        raise click.UsageError("stock vLLM has no FireRedASR-AED model; drop stock from --backends")
    if decoding == "recipe" and "stock" in selected:
        raise click.UsageError("--decoding recipe compares the reference and the plugin; drop stock from --backends")
    sys.exit(compare(scale, num_clips, latency_clips, output_tokens, dtype, selected, seed, workdir, decoding,
                     model_kind))  # fmt: skip


def compare(scale, num_clips, latency_clips, output_tokens, dtype, selected, seed, workdir, decoding="greedy",
            model_kind="llm") -> int:
    import torch

    from fireredasr_vllm.api import FrontEnd
    from fireredasr_vllm.engine import frames_per_token

    dtype = dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    aed = model_kind == "aed"
    shapes = (AED_SCALES if aed else SCALES)[scale]
    clip_seconds = clip_durations(num_clips, seed)
    audio_seconds = sum(clip_seconds)
    print(f"scale {scale}: {shapes}")

    from fireredasr_converter.pipeline import convert

    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fireredasr-serve-"))
    converter_dtype = next(short for short in DTYPES if dtype_name(short) == dtype)
    try:
        release_dir = folder / f"{'aed-' if aed else ''}release-{scale}"
        if not release_dir.exists():
            print(f"building the release in {release_dir}")
            (build_aed_release if aed else build_release)(release_dir, shapes, seed=seed)
        release = release_dir / ("FireRedASR-AED-L" if aed else "FireRedASR-LLM-L")
        repos = {"reference": folder / f"{'aed-' if aed else ''}plugin-{scale}-{converter_dtype}"}
        repos.update(dict.fromkeys(PLUGIN_VARIANTS, repos["reference"]))
        if not repos["plugin"].exists():
            convert(release, repos["plugin"], dtype=converter_dtype)
        repos["stock"] = folder / f"stock-{scale}-{converter_dtype}"
        if "stock" in selected and not repos["stock"].exists():
            convert(release, repos["stock"], dtype=converter_dtype, target=STOCK_VLLM_TARGET)

        # The original's limit: one token per speech embedding (FireRedASR-AED: per encoder frame).
        downsample_rate = frames_per_token(FrontEnd.load(str(repos["plugin"])).config)
        expected_tokens = tokens_per_clip(clip_seconds, output_tokens, downsample_rate)
        device = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        print(
            f"{num_clips} clips, {audio_seconds:.1f} s of audio ({min(clip_seconds):.1f}-{max(clip_seconds):.1f} s), "
            f"{sum(expected_tokens)} generated tokens ({tokens_description(output_tokens)}), "
            f"latency over the first {min(latency_clips, num_clips)}, {dtype}, {device}, decoding: {decoding}"
            + (", model: FireRedASR-AED (reference: the original's batched beam search, beam 3)" if aed else "")
        )

        rows, failed, token_ids = {}, False, {}
        for backend in selected:
            print(f"running {backend} ...", flush=True)
            try:
                result = run_worker(backend, repos[backend], clip_seconds, output_tokens, dtype, latency_clips,
                                    decoding, model_kind)  # fmt: skip
            except RuntimeError as error:
                print(error)
                failed = True
                continue
            if "token_ids" in result:
                # A beam search, which stops where its hypotheses end: its ids are compared instead.
                token_ids[backend] = result["token_ids"]
            elif result["generated"] != expected_tokens:
                wrong = sum(got != want for got, want in zip(result["generated"], expected_tokens))
                print(f"{backend}: {wrong} of {len(expected_tokens)} clips generated another number of tokens than asked")
                failed = True
            rows[backend] = summarise(result, audio_seconds)
        print()
        print_table(rows)
        if "plugin" in rows and "reference" in rows:
            speedup = rows["plugin"]["utt_per_s"] / rows["reference"]["utt_per_s"]
            target = RECIPE_TARGET_SPEEDUP if decoding == "recipe" else TARGET_SPEEDUP
            goal = f"plugin {decoding}, reference beam 3" if aed else f"target >= {target:g}x"
            print(f"plugin / reference utterances/s: {speedup:.2f}x ({goal})")
        if "reference" in token_ids:
            for backend, ids in token_ids.items():
                if backend != "reference":
                    same = sum(a == b for a, b in zip(ids, token_ids["reference"]))
                    print(f"{backend}: {same} of {len(ids)} clips give the reference's token ids")
        return 1 if failed else 0
    finally:
        if not workdir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
