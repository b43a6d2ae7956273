"""The converted repo's tokenizer: Qwen2's, plus the audio placeholder and a transcription chat template.

The source files are copied byte for byte, except `tokenizer.json` and
`tokenizer_config.json`, which are edited as JSON: the placeholder (`<speech>`,
or stock vLLM's `<|AUDIO|>` for that target) is appended as an additional
special token (id = the tokenizer's length, as the original's
`add_special_tokens` gives it) and the chat template is replaced by one that
renders a user turn holding audio as the original's transcription prompt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import spec
from .configuration import register_with_transformers
from .errors import ConversionError
from .sources import check_readable

EDITED_FILES = ("tokenizer.json", "tokenizer_config.json")
# Copied unchanged when the source has them. A separate chat_template.jinja is
# not: it would take precedence over the template this converter writes.
COPIED_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
# Content part types that carry audio: vLLM's parsed parts ("audio") and the
# OpenAI request forms, for callers that template requests themselves.
AUDIO_PART_TYPES = ("audio", "audio_url", "input_audio")
_FIX = "point --llm-dir (or the Qwen2-7B-Instruct link) at a stock Qwen2-7B-Instruct folder"


def _jinja_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def transcription_chat_template(speech_token: str = spec.SPEECH_TOKEN) -> str:
    """A chat template that renders [user: audio] + generation prompt as `spec.transcription_prompt(speech_token)`.

    Each audio part of a user turn becomes one `speech_token` (in string content,
    each one already there is kept); the turn always carries the one
    instruction the model was trained with, so user text and system turns are
    left out, as in the original, which has no system turn.
    """
    user_open = _jinja_string(f"{spec.BOS_TOKEN}user\n")
    user_close = _jinja_string(f"{spec.TRANSCRIBE_INSTRUCTION}{spec.EOS_TOKEN}\n")
    assistant_open = _jinja_string(f"{spec.BOS_TOKEN}assistant\n")
    speech = _jinja_string(speech_token)
    eos = _jinja_string(f"{spec.EOS_TOKEN}\n")
    audio_types = "[" + ", ".join(_jinja_string(t) for t in AUDIO_PART_TYPES) + "]"
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{- {user_open} -}}}}"
        "{%- if message['content'] is string -%}"
        f"{{%- for _ in range(message['content'].split({speech}) | length - 1) -%}}"
        f"{{{{- {speech} -}}}}"
        "{%- endfor -%}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part['type'] in {audio_types} -%}}{{{{- {speech} -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
        "{%- endif -%}"
        f"{{{{- {user_close} -}}}}"
        "{%- elif message['role'] == 'assistant' and message['content'] is string -%}"
        f"{{{{- {assistant_open} + message['content'] + {eos} -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {assistant_open} -}}}}{{%- endif -%}}"
    )


@dataclass(frozen=True)
class SourceTokenizer:
    """The Qwen2 folder's tokenizer files and the ids that matter."""

    folder: Path
    special_token_ids: dict[str, int]  # pad, bos and eos tokens of the original
    speech_token_id: int

    @property
    def files(self) -> list[Path]:
        return [self.folder / name for name in (*EDITED_FILES, *COPIED_FILES) if (self.folder / name).exists()]


def _read_json(path: Path) -> dict:
    check_readable(path, _FIX)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}): {_FIX}") from None
    if not isinstance(content, dict):
        raise ConversionError(f"{path} is not a JSON object: {_FIX}")
    return content


def inspect_tokenizer(folder: Path, embedding_rows: int) -> SourceTokenizer:
    """Check the Qwen2 tokenizer and pick `<speech>`'s id, refusing what would need a resized embedding."""
    tokenizer = _read_json(folder / "tokenizer.json")
    _read_json(folder / "tokenizer_config.json")
    vocab = tokenizer.get("model", {}).get("vocab")
    added = tokenizer.get("added_tokens")
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise ConversionError(f"{folder / 'tokenizer.json'} has no BPE vocabulary or added_tokens list: {_FIX}")
    special = {token["content"]: token["id"] for token in added if token.get("special")}
    missing = [token for token in spec.QWEN2_SPECIAL_TOKENS if token not in special]
    if missing:
        raise ConversionError(
            f"the tokenizer in {folder} lacks the Qwen2 special token(s) {', '.join(missing)}: {_FIX}"
        )
    _check_token_is_new(folder, tokenizer, spec.SPEECH_TOKEN)
    speech_token_id = max([*vocab.values(), *(token["id"] for token in added)]) + 1
    if speech_token_id >= embedding_rows:
        raise ConversionError(
            f"the tokenizer in {folder} has {speech_token_id} tokens but the embedding only {embedding_rows} rows: "
            f"no free row for {spec.SPEECH_TOKEN} (the embedding is never resized); {_FIX}"
        )
    return SourceTokenizer(
        folder=folder,
        special_token_ids={token: special[token] for token in spec.QWEN2_SPECIAL_TOKENS},
        speech_token_id=speech_token_id,
    )


def _check_token_is_new(folder: Path, tokenizer: dict, token: str) -> None:
    if token in tokenizer["model"]["vocab"] or any(added["content"] == token for added in tokenizer["added_tokens"]):
        raise ConversionError(f"the tokenizer in {folder} already has {token}: {_FIX}")


def check_token_is_new(source: SourceTokenizer, token: str) -> None:
    """Refuse a source tokenizer that already has `token` (it is added with the id after the last one)."""
    _check_token_is_new(source.folder, _read_json(source.folder / "tokenizer.json"), token)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(source: SourceTokenizer, dest: Path, speech_token: str = spec.SPEECH_TOKEN) -> None:
    """The source tokenizer with `speech_token` added as special token `source.speech_token_id`."""
    for name in COPIED_FILES:
        if (source.folder / name).exists():
            shutil.copyfile(source.folder / name, dest / name)

    speech = {
        "content": speech_token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }
    tokenizer = _read_json(source.folder / "tokenizer.json")
    tokenizer["added_tokens"].append({"id": source.speech_token_id, **speech})
    _write_json(dest / "tokenizer.json", tokenizer)

    config = _read_json(source.folder / "tokenizer_config.json")
    config.setdefault("added_tokens_decoder", {})[str(source.speech_token_id)] = dict(speech)
    # transformers 5 writes `extra_special_tokens`, Qwen2's own file (4.x) `additional_special_tokens`.
    key = "extra_special_tokens" if "extra_special_tokens" in config else "additional_special_tokens"
    config[key] = [*config.get(key, []), speech_token]
    config["chat_template"] = transcription_chat_template(speech_token)
    _write_json(dest / "tokenizer_config.json", config)


def check_tokenizer(folder: Path, speech_token_id: int, speech_token: str = spec.SPEECH_TOKEN) -> None:
    """Load the written tokenizer with transformers and check `speech_token` and the prompt."""
    from transformers import AutoTokenizer

    # AutoTokenizer reads config.json too; without the registration it warns about the model type.
    register_with_transformers()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = spec.transcription_prompt(speech_token)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}]}], add_generation_prompt=True, tokenize=False
    )
    problems = []
    if tokenizer.convert_tokens_to_ids(speech_token) != speech_token_id or len(tokenizer) != speech_token_id + 1:
        problems.append(f"{speech_token} is not token {speech_token_id} of {speech_token_id + 1}")
    if speech_token not in tokenizer.all_special_tokens:
        problems.append(f"{speech_token} is not a special token")
    if ids.count(speech_token_id) != 1 or tokenizer.decode(ids) != prompt:
        problems.append(f"the prompt does not round-trip with {speech_token} as one token")
    if rendered != prompt:
        problems.append(f"the chat template renders {rendered!r}")
    if problems:
        raise ConversionError(f"the written tokenizer fails its check: {'; '.join(problems)}; please report this bug")
