"""The converted repo's model card (`README.md`): Hub metadata, published results, how the repo was made, usage.

The metadata is a `huggingface_hub` `ModelCardData` rendered into the card by
`ModelCard.from_template`, the same for every target. This module holds the
shared sections and the plugin format's card; the stock-vLLM export's card
text is in `stock_vllm`, and the Hub's check of a card in `hub`.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import __version__, spec
from .plan import ConversionPlan
from .provenance import PROVENANCE_KEY, ConversionOptions, command_line
from .release import Release
from .repo_format import DTYPE_NAMES

CARD_NAME = "README.md"
BASE_LLM_REPO = "Qwen/Qwen2-7B-Instruct"  # the card's first base_model
# The metadata block huggingface_hub renders `card_data` into, then the card's text.
_CARD_TEMPLATE = "---\n{{ card_data }}\n---\n{{ body }}"

# Character error rates (%) published by FireRedTeam; LibriSpeech figures are WER.
PUBLISHED_RESULTS = {
    "v1": (
        "FireRedASR-LLM-L",
        "FireRedTeam/FireRedASR-LLM-L",
        {
            "AISHELL-1 test": 0.76,
            "AISHELL-2 test": 2.15,
            "WenetSpeech test_net": 4.60,
            "WenetSpeech test_meeting": 4.67,
            "KeSpeech test": 3.56,
            "LibriSpeech test-clean (WER)": 1.73,
            "LibriSpeech test-other (WER)": 3.67,
        },
    ),
    "v2": (
        "FireRedASR2-LLM",
        "FireRedTeam/FireRedASR2-LLM",
        {
            "AISHELL-1 test": 0.64,
            "AISHELL-2 test": 2.15,
            "WenetSpeech test_net": 4.44,
            "WenetSpeech test_meeting": 4.32,
            "KeSpeech test": 3.08,
        },
    ),
}


def card_metadata(model_repo: str) -> ModelCardData:
    """The card's Hub metadata, the same for every target; `model_repo` is the original release's repo."""
    return ModelCardData(
        license="apache-2.0",
        pipeline_tag="automatic-speech-recognition",
        library_name="vllm",
        base_model=[BASE_LLM_REPO, model_repo],
        language=["zh", "en"],
        tags=["fireredasr", "vllm", "speech-recognition"],
    )


def build_card(model_repo: str, body: str) -> ModelCard:
    """The card: `card_metadata(model_repo)` as its metadata block, then `body` (Markdown)."""
    return ModelCard.from_template(card_metadata(model_repo), template_str=_CARD_TEMPLATE, body=body)


def card_published_results(release: Release) -> str:
    model_name, _, results = PUBLISHED_RESULTS[release.layout]
    rows = "\n".join(f"| {name} | {value:.2f} |" for name, value in results.items())
    return f"""## Published results

Error rates (%) reported by FireRedTeam for the original model (CER unless marked WER):

| test set | {model_name} |
|---|---|
{rows}
"""


def card_provenance(release: Release, plan: ConversionPlan, options: ConversionOptions, speech_token: str) -> str:
    """How the repo was made: the command and the facts every target shares, as bullets.

    The last bullet has no closing punctuation: a target may add bullets of its own.
    """
    lora = release.lora
    merge = (
        f"LoRA (rank {lora.rank}, alpha {lora.alpha:g}) merged into Qwen2 as W + (alpha/r)·B·A in fp32, cast once"
        if lora is not None
        else "no LoRA in the release: Qwen2 weights as released"
    )
    return f"""`{command_line(options)}` (fireredasr-vllm {__version__}) from the original {release.layout} release:

- encoder weights from `{release.encoder_source.path.name}`; adapter downsample rate {release.encoder_downsample_rate};
- {merge};
- every tensor in {DTYPE_NAMES[plan.dtype]}, {len(plan.shards)} shard(s), {plan.total_size:,} bytes;
- `{speech_token}` is token {release.llm.tokenizer.speech_token_id}; the embedding was not resized"""


def card_offline_example(prompt: str) -> str:
    """Offline transcription with vLLM's `LLM`; `prompt` as the card shows it (newlines escaped)."""
    return f"""```python
from vllm import LLM, SamplingParams

llm = LLM(model="path/to/this/repo")
prompt = "{prompt}"
outputs = llm.generate(
    {{"prompt": prompt, "multi_modal_data": {{"audio": (waveform, 16000)}}}},  # float32 mono, 16 kHz
    SamplingParams(temperature=0.0, max_tokens=256),
)
print(outputs[0].outputs[0].text)
```"""


def model_card(release: Release, plan: ConversionPlan, options: ConversionOptions) -> ModelCard:
    """The plugin format's card."""
    model_name, model_repo, _ = PUBLISHED_RESULTS[release.layout]
    prompt = spec.transcription_prompt().replace("\n", "\\n")
    return build_card(
        model_repo,
        f"""
# {model_name}, converted for vLLM

[{model_name}]({f"https://huggingface.co/{model_repo}"}) (Conformer encoder + adapter + Qwen2-7B-Instruct)
in one self-contained folder: safetensors weights in {DTYPE_NAMES[plan.dtype]}, a composite `config.json`,
the Qwen2 tokenizer with the `<speech>` token, the fbank + CMVN front-end settings in
`preprocessor_config.json`, and greedy generation defaults.

{card_published_results(release)}
## How this repo was made

{card_provenance(release, plan, options, spec.SPEECH_TOKEN)}.

`config.json` → `{PROVENANCE_KEY}` records the options and the size and sha256 of every input file.

## Serving with vLLM

Install the `fireredasr-vllm` package next to vLLM: its plugin entry point registers the
model class, so vLLM needs no other setup.

{card_offline_example(prompt)}

As an OpenAI-compatible server:

```bash
vllm serve path/to/this/repo
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://localhost:8000/v1", api_key="EMPTY")
with open("speech.wav", "rb") as audio:
    print(client.audio.transcriptions.create(model="path/to/this/repo", file=audio).text)
```

In chat completions, each audio part of a user message becomes one `<speech>` in the
original's prompt (`{prompt}`); the instruction is fixed, so text
parts and system messages are not used. Clips at any sampling rate and channel count are
resampled to 16 kHz mono; each may be at most {release.max_audio_seconds:g} s long.
""",
    )


def write_model_card(card: ModelCard, folder: Path) -> None:
    card.save(folder / CARD_NAME)
