"""The converted repo's tokenizer: Qwen2's, plus the audio placeholder and a transcription chat template.

Nothing of the source folder reaches the repo unread. `tokenizer.json` and
`tokenizer_config.json` are parsed, reduced to the keys a tokenizer has (an
`auto_map`, which would make `trust_remote_code` fetch someone's code, never
passes) and edited as JSON: the placeholder (`<speech>`, or stock vLLM's
`<|AUDIO|>` for that target) is appended as an additional special token (id =
the tokenizer's length, as the original's `add_special_tokens` gives it) and
the chat template is replaced by one that renders a user turn holding audio as
the original's transcription prompt. The side files (`vocab.json`,
`merges.txt`, `special_tokens_map.json`, `added_tokens.json`) are parsed and
checked against `tokenizer.json` before their bytes are written: a side file
that is a link to something else (a token, a key) is refused, not published.
The push runs the same checks on a repo converted elsewhere (`check_side_file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import spec
from .configuration import register_with_transformers
from .errors import ConversionError
from .safe_io import UnsafeInput, load_json, parse_json, write_atomically
from .sources import check_readable

EDITED_FILES = ("tokenizer.json", "tokenizer_config.json")
# Written when the source has them, after `check_side_file`. A separate
# chat_template.jinja is not: it would take precedence over the template this converter writes.
SIDE_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
# What tokenizers' own serialisation writes at the top of tokenizer.json.
TOKENIZER_JSON_KEYS = frozenset(
    ("version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor",
     "decoder")
)  # fmt: skip
# The tokenizer_config.json keys of Qwen2's tokenizer classes (transformers 4.x and 5); any
# other key (`auto_map` above all) is dropped. `chat_template` is replaced.
TOKENIZER_CONFIG_KEYS = frozenset(
    ("add_bos_token", "add_eos_token", "add_prefix_space", "added_tokens_decoder", "additional_special_tokens",
     "extra_special_tokens", "bos_token", "eos_token", "pad_token", "unk_token", "clean_up_tokenization_spaces",
     "errors", "model_max_length", "split_special_tokens", "tokenizer_class", "padding_side", "truncation_side",
     "model_input_names", "legacy", "chat_template")
)  # fmt: skip
SPECIAL_TOKENS_MAP_KEYS = frozenset(
    ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
     "additional_special_tokens")
)  # fmt: skip
_SIDE_FILE_MAX_BYTES = 64 << 20
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
    # The side files' bytes as read and checked (`check_side_file`): written as they are.
    side_files: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def files(self) -> list[Path]:
        return [self.folder / name for name in (*EDITED_FILES, *self.side_files)]


def _read_json(path: Path) -> dict:
    check_readable(path, _FIX)
    try:
        return load_json(path)
    except UnsafeInput as error:
        raise ConversionError(f"{path} cannot be used: {error}; {_FIX}") from None


def _known_tokens(tokenizer: dict) -> dict[str, int]:
    """Every token of a parsed tokenizer.json and its id: the BPE vocabulary and the added tokens."""
    tokens = dict(tokenizer["model"]["vocab"])
    tokens.update({token["content"]: token["id"] for token in tokenizer["added_tokens"]})
    return tokens


def _merge_lines(tokenizer: dict) -> list[str]:
    # tokenizers writes merges as "a b" strings (<= 0.19) or as ["a", "b"] pairs.
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer["model"].get("merges", [])]


def _special_token_contents(value) -> list:
    items = value if isinstance(value, list) else [value]
    return [item.get("content") if isinstance(item, dict) else item for item in items if item is not None]


def check_side_file(name: str, data: bytes, tokenizer: dict) -> str | None:
    """What is wrong with the side file `name` holding `data`, given the parsed tokenizer.json; None if nothing.

    vocab.json and merges.txt must say exactly what tokenizer.json says; the
    special tokens map and added_tokens.json may only name tokens it has, with its ids.
    """
    if name == "merges.txt":
        try:
            lines = [line for line in data.decode("utf-8").split("\n") if line.strip()]
        except UnicodeDecodeError:
            return "it is not UTF-8 text"
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        return None if lines == _merge_lines(tokenizer) else "its merges differ from tokenizer.json's"
    try:
        content = parse_json(data)
    except UnsafeInput as error:
        return str(error)
    if not isinstance(content, dict):
        return "it is not a JSON object"
    known = _known_tokens(tokenizer)
    if name == "vocab.json":
        return None if content == tokenizer["model"]["vocab"] else "its vocabulary differs from tokenizer.json's"
    if name == "added_tokens.json":
        wrong = [token for token, id_ in content.items() if known.get(token) != id_]
        return f"token {wrong[0][:40]!r} is not in tokenizer.json with that id" if wrong else None
    if name == "special_tokens_map.json":
        unknown_keys = sorted(set(content) - SPECIAL_TOKENS_MAP_KEYS)
        if unknown_keys:
            return f"it has the unknown key {unknown_keys[0][:40]!r}"
        for value in content.values():
            for token in _special_token_contents(value):
                if not isinstance(token, str) or token not in known:
                    return f"it names {str(token)[:40]!r}, which tokenizer.json does not have"
        return None
    raise ValueError(f"{name} is not a tokenizer side file")


def _read_side_files(folder: Path, tokenizer: dict) -> dict[str, bytes]:
    side_files = {}
    for name in SIDE_FILES:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        check_readable(path, _FIX)
        with open(path, "rb") as file:
            data = file.read(_SIDE_FILE_MAX_BYTES + 1)
        problem = "it is too large" if len(data) > _SIDE_FILE_MAX_BYTES else check_side_file(name, data, tokenizer)
        if problem is not None:
            raise ConversionError(
                f"{path} does not match tokenizer.json ({problem}), so it is not copied into the repo: "
                f"restore it from Qwen2-7B-Instruct or delete it; {_FIX}"
            )
        side_files[name] = data
    return side_files


def inspect_tokenizer(folder: Path, embedding_rows: int) -> SourceTokenizer:
    """Check the Qwen2 tokenizer and pick `<speech>`'s id, refusing what would need a resized embedding."""
    tokenizer = _read_tokenizer_json(folder)
    _read_tokenizer_config(folder)
    vocab, added = tokenizer["model"]["vocab"], tokenizer["added_tokens"]
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
        side_files=_read_side_files(folder, tokenizer),
    )


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_tokenizer_json(folder: Path) -> dict:
    """tokenizer.json reduced to the keys tokenizers writes, with a BPE vocabulary and added tokens of the right types."""
    path = folder / "tokenizer.json"
    tokenizer = _read_json(path)
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = tokenizer.get("added_tokens")
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise ConversionError(f"{path} has no BPE vocabulary or added_tokens list: {_FIX}")
    if not all(_is_id(id_) for id_ in vocab.values()) or not all(
        isinstance(token, dict) and isinstance(token.get("content"), str) and _is_id(token.get("id")) for token in added
    ):
        raise ConversionError(f"{path} has a token without a string content and a non-negative integer id: {_FIX}")
    return {key: value for key, value in tokenizer.items() if key in TOKENIZER_JSON_KEYS}


def _read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json reduced to the keys of Qwen2's tokenizer classes."""
    path = folder / "tokenizer_config.json"
    config = {key: value for key, value in _read_json(path).items() if key in TOKENIZER_CONFIG_KEYS}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if key in config and not (
            isinstance(config[key], list) and all(isinstance(token, (str, dict)) for token in config[key])
        ):
            raise ConversionError(f"{path}: {key} is not a list of tokens: {_FIX}")
    if not isinstance(config.get("added_tokens_decoder", {}), dict):
        raise ConversionError(f"{path}: added_tokens_decoder is not a JSON object: {_FIX}")
    return config


def _check_token_is_new(folder: Path, tokenizer: dict, token: str) -> None:
    if token in tokenizer["model"]["vocab"] or any(added["content"] == token for added in tokenizer["added_tokens"]):
        raise ConversionError(f"the tokenizer in {folder} already has {token}: {_FIX}")


def check_token_is_new(source: SourceTokenizer, token: str) -> None:
    """Refuse a source tokenizer that already has `token` (it is added with the id after the last one)."""
    _check_token_is_new(source.folder, _read_tokenizer_json(source.folder), token)


def _write_json(path: Path, content: dict) -> None:
    write_atomically(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer(source: SourceTokenizer, dest: Path, speech_token: str = spec.SPEECH_TOKEN) -> None:
    """The source tokenizer with `speech_token` added as special token `source.speech_token_id`."""
    for name, data in source.side_files.items():
        write_atomically(dest / name, data)

    speech = {
        "content": speech_token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }
    tokenizer = _read_tokenizer_json(source.folder)
    tokenizer["added_tokens"].append({"id": source.speech_token_id, **speech})
    _write_json(dest / "tokenizer.json", tokenizer)

    config = _read_tokenizer_config(source.folder)
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
