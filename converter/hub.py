"""Pushing a converted repo to the Hugging Face Hub: check it, upload it, compare the Hub's copy with it.

`push_to_hub` does the work with an `HfApi` handed to it (tests hand it a fake)
and raises; `check_converted_repo` applies the converter's rules again to a
folder that may have been made or edited elsewhere (docs/security.md);
`describe_hub_error` turns a failure into one line naming the cause and the
fix, `mask_tokens` hides tokens in it. The command-line side (options,
token lookup, printing, exit status) is in `hub_cli`, not here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.constants import DEFAULT_REVISION
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.sha import sha_fileobj
from safetensors import SafetensorError, safe_open

from . import spec
from .configuration import MODEL_TYPE
from .errors import ConversionError, first_line
from .stock_vllm import STOCK_ARCHITECTURE
from .feature_extraction import FireRedAsrFeatureExtractor
from .model_card import BASE_LLM_REPO, CARD_NAME, PUBLISHED_RESULTS
from .plan import format_size
from .provenance import PROVENANCE_KEY
from .repo_format import INDEX_NAME, SHARD_NAME_GLOB
from .safe_io import UnsafeInput, load_json, write_atomically
from .sources import read_safetensors_header
from .tokenizer import EDITED_FILES, SIDE_FILES, TOKENIZER_CONFIG_KEYS, TOKENIZER_JSON_KEYS, check_side_file

REPO_TYPE = "model"
PR_REF_PREFIX = "refs/pr/"
# The small files every converted repo has (docs/format.md); the shards come from the index.
REQUIRED_FILES = (
    "config.json",
    INDEX_NAME,
    *EDITED_FILES,
    "preprocessor_config.json",
    "generation_config.json",
    CARD_NAME,
)
# Remote weight files not in the upload are deleted in the same commit: a repo
# re-pushed after converting with another --max-shard-size would otherwise keep
# the old shards, which every server would download for nothing. Only top-level
# files named as the converter names its shards: anything else on the Hub (a
# subfolder's weights, someone's other files) is not this tool's to delete.
STALE_WEIGHT_PATTERNS = [SHARD_NAME_GLOB]
# Keys that make `trust_remote_code` run code from a repo; this project never needs it.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# The Hub card metadata the model needs to be found and shown right.
REQUIRED_CARD_METADATA = {
    "pipeline_tag": "automatic-speech-recognition",
    "language": ["zh", "en"],
    "tags": ["fireredasr", "vllm"],
    "base_model": [BASE_LLM_REPO],
}
RELEASE_REPOS = {repo for _, repo, _ in PUBLISHED_RESULTS.values()}
# The usage snippets of the card name the model as `vllm serve <model>`,
# `LLM(model="<model>")` and `model="<model>"`; a push points them at the Hub repo.
_CARD_SERVE_LINE = re.compile(r"^vllm serve (\S+)", re.MULTILINE)
_HASH_CHUNK_BYTES = 16 << 20
# huggingface_hub's HTTP client has changed (requests, httpx, httpx2): match
# transport failures by their exception family rather than import one client.
_NETWORK_ERROR_NAMES = {"TransportError", "ConnectionError", "Timeout", "TimeoutError", "ConnectTimeout"}
_RESUME = "re-run the same command to resume (files already on the Hub are not sent again)"
_RECONVERT = "convert again with `fireredasr-convert SRC OUT` (the default target, --target plugin)"
# upload_folder opens a new pull request on every call with create_pr.
_RESUME_PR = (
    f"if a pull request was named above, resume into it with --revision {PR_REF_PREFIX}N instead of --create-pr "
    "(which would open another one); otherwise re-run the same command"
)


class HubPushError(Exception):
    """A push that cannot go on; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class ConvertedRepo:
    """A converted repo folder that passed `check_converted_repo`."""

    folder: Path
    files: list[str]  # what gets uploaded, sorted
    left_out: list[str]  # other entries in the folder, not part of the format
    num_shards: int
    total_size: int  # bytes of all uploaded files
    provenance: dict


@dataclass(frozen=True)
class HubComparison:
    mismatches: list[str]  # one line per local file the Hub does not hold as it is here
    extra_files: list[str]  # on the Hub but not uploaded from the folder (.gitattributes aside)
    lfs_files: int  # files compared by LFS sha256 (the rest by git blob id)


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_url: str
    revision: str | None  # branch or PR ref the files are on; None: the default branch
    commit_url: str
    pr_url: str | None
    repo: ConvertedRepo
    comparison: HubComparison

    @property
    def serve_command(self) -> str:
        command = f"vllm serve {self.repo_id}"
        return command if self.revision in (None, DEFAULT_REVISION) else f"{command} --revision {self.revision}"

    @property
    def browse_url(self) -> str:
        if self.pr_url is not None:
            return self.pr_url
        if self.revision in (None, DEFAULT_REVISION):
            return self.repo_url
        return f"{self.repo_url}/tree/{quote(self.revision, safe='')}"


def _refuse(folder: Path, problem: str) -> HubPushError:
    return HubPushError(f"{folder} is not a complete converted repo: {problem}; {_RECONVERT}")


def _read_json(folder: Path, name: str) -> dict:
    try:
        content = load_json(folder / name)
    except UnsafeInput as error:
        raise _refuse(folder, f"{name} cannot be used ({error})") from None
    except OSError as error:
        raise _refuse(folder, f"cannot read {name} ({error.strerror or error})") from None
    _refuse_remote_code(folder, name, content)
    return content


def _refuse_remote_code(folder: Path, name: str, content: dict) -> None:
    """No key anywhere in a JSON file that would make `trust_remote_code` fetch or run code."""
    stack = [content]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found = [key for key in REMOTE_CODE_KEYS if key in item]
            if found:
                raise _refuse(folder, f"{name} has {found[0]}, which points loaders at code outside this project")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_shards(folder: Path, index: dict) -> list[str]:
    weight_map = index.get("weight_map")
    total_size = index.get("metadata", {}).get("total_size")
    if not isinstance(weight_map, dict) or not weight_map or not isinstance(total_size, int):
        raise _refuse(folder, f"{INDEX_NAME} has no weight_map or metadata.total_size")
    tensors_by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not fnmatch.fnmatchcase(shard, SHARD_NAME_GLOB):
            raise _refuse(folder, f"{INDEX_NAME} names the shard {str(shard)[:60]!r}, not one the converter writes")
        tensors_by_shard.setdefault(shard, set()).add(tensor)
    stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in tensors_by_shard)
    if stray:
        raise _refuse(folder, f"{stray[0]} is not listed in {INDEX_NAME}")
    data_bytes = 0
    for shard, tensors in sorted(tensors_by_shard.items()):
        path = folder / shard
        if not (path.exists() or path.is_symlink()):
            raise _refuse(folder, f"shard {shard} listed in {INDEX_NAME} is missing")
        _check_regular_file(folder, shard)
        try:
            # safe_open refuses a file whose data does not exactly cover its header (a truncated copy).
            with safe_open(path, framework="numpy") as stored:
                names = set(stored.keys())
        except SafetensorError as error:
            raise _refuse(folder, f"shard {shard} is damaged ({error})") from None
        if names != tensors:
            raise _refuse(folder, f"shard {shard} does not hold the tensors {INDEX_NAME} assigns to it")
        try:
            stored_tensors = read_safetensors_header(path, fix="convert the repo again")
        except ConversionError as error:
            raise _refuse(folder, f"shard {shard} is damaged ({error})") from None
        data_bytes += sum(t.numel * t.dtype.itemsize for _, t in stored_tensors)
    if data_bytes != total_size:
        raise _refuse(folder, f"the shards hold {data_bytes} bytes of tensors, {INDEX_NAME} says {total_size}")
    return sorted(tensors_by_shard)


def _check_tokenizer(folder: Path, speech_token_id: object) -> list[str]:
    """The tokenizer files as the converter writes them; returns the side files present."""
    tokenizer = _read_json(folder, "tokenizer.json")
    model, added = tokenizer.get("model"), tokenizer.get("added_tokens")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or not isinstance(added, list):
        raise _refuse(folder, "tokenizer.json has no BPE vocabulary or added_tokens list")
    if not all(isinstance(token, dict) and isinstance(token.get("content"), str) for token in added):
        raise _refuse(folder, "tokenizer.json has an added token without content")
    ids = [token.get("id") for token in added if token.get("content") == spec.SPEECH_TOKEN]
    if ids != [speech_token_id]:
        problem = f"tokenizer.json does not have {spec.SPEECH_TOKEN} as token {speech_token_id} (config.json)"
        raise _refuse(folder, problem)
    for name, known in (("tokenizer.json", TOKENIZER_JSON_KEYS), ("tokenizer_config.json", TOKENIZER_CONFIG_KEYS)):
        content = tokenizer if name == "tokenizer.json" else _read_json(folder, name)
        unknown = sorted(set(content) - known)
        if unknown:
            raise _refuse(folder, f"{name} has the key {unknown[0][:40]!r}, which the converter never writes")
    present = []
    for name in SIDE_FILES:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        _check_regular_file(folder, name)
        problem = check_side_file(name, path.read_bytes(), tokenizer)
        if problem is not None:
            raise _refuse(folder, f"{name} does not match tokenizer.json ({problem})")
        present.append(name)
    return present


def _check_regular_file(folder: Path, name: str) -> None:
    """A file to upload must be the folder's own: a symlink could publish anything it points at."""
    path = folder / name
    if path.is_symlink():
        raise _refuse(folder, f"{name} is a symlink (-> {os.readlink(path)}); the push uploads only regular files")
    if not path.is_file():
        raise _refuse(folder, f"{name} is missing")


def _check_preprocessor(folder: Path) -> None:
    """preprocessor_config.json's numbers (clip limit, CMVN) as the front-end checks them when it loads."""
    config = {
        key: value
        for key, value in _read_json(folder, "preprocessor_config.json").items()
        if key not in ("feature_extractor_type", "processor_class")
    }
    try:
        FireRedAsrFeatureExtractor(**config)
    except (TypeError, ValueError) as error:
        raise _refuse(folder, f"preprocessor_config.json cannot be used ({str(error).splitlines()[0][:160]})") from None


def _as_list(value) -> list:
    """A metadata value that may be one item or a list of them (language, tags, base_model)."""
    return [value] if isinstance(value, str) else value if isinstance(value, list) else []


def check_model_card(path: Path) -> ModelCard:
    """Parse the card as the Hub does and check the metadata the model needs on the Hub."""
    try:
        card = ModelCard.load(path)
    except (OSError, ValueError) as error:
        raise HubPushError(f"{path} is not a valid model card ({error}); {_RECONVERT}") from None
    metadata = card.data.to_dict()
    problems = []
    for key, expected in REQUIRED_CARD_METADATA.items():
        if isinstance(expected, list):
            problems += [f"{key} lacks {item}" for item in expected if item not in _as_list(metadata.get(key))]
        elif metadata.get(key) != expected:
            problems.append(f"{key} is {metadata.get(key)!r}, not {expected!r}")
    base_models = _as_list(metadata.get("base_model"))
    if not RELEASE_REPOS & set(base_models):
        problems.append(f"base_model lacks the FireRedASR release ({' or '.join(sorted(RELEASE_REPOS))})")
    for model in base_models:
        try:
            validate_repo_id(model)
        except HFValidationError:
            problems.append(f"base_model entry {model!r} is not a repo id")
    problems += [f"{key} is not set" for key in ("license", "library_name") if not metadata.get(key)]
    if problems:
        raise HubPushError(f"the model card {path} metadata is incomplete: {'; '.join(problems)}; {_RECONVERT}")
    return card


def check_converted_repo(folder: Path) -> ConvertedRepo:
    """Refuse a folder that is not a complete converted repo, naming the first missing or broken item."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"{folder} is not a folder: give the output folder of fireredasr-convert")
    for name in REQUIRED_FILES:
        _check_regular_file(folder, name)
    config = _read_json(folder, "config.json")
    if STOCK_ARCHITECTURE in (config.get("architectures") or []):
        raise HubPushError(
            f"{folder} is a --target stock-vllm export; the Hub push uploads the plugin format only: "
            f"{_RECONVERT}"
        )
    if config.get("model_type") != MODEL_TYPE:
        raise _refuse(folder, f"config.json has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    if not isinstance(config.get(PROVENANCE_KEY), dict):
        raise _refuse(folder, f"config.json has no {PROVENANCE_KEY} record")
    shards = _check_shards(folder, _read_json(folder, INDEX_NAME))
    optional = _check_tokenizer(folder, config.get("speech_token_id"))
    _check_preprocessor(folder)
    _read_json(folder, "generation_config.json")
    check_model_card(folder / CARD_NAME)
    files = sorted({*REQUIRED_FILES, *optional, *shards})
    return ConvertedRepo(
        folder=folder,
        files=files,
        left_out=sorted(p.name for p in folder.iterdir() if p.name not in files),
        num_shards=len(shards),
        total_size=sum((folder / name).stat().st_size for name in files),
        provenance=config[PROVENANCE_KEY],
    )


def point_model_card_at(folder: Path, repo_id: str) -> bool:
    """Make the card's usage snippets name `repo_id`; True if README.md changed.

    The folder is changed too, not only the upload, so that the Hub's copy and
    the local one stay identical and the post-upload comparison holds.
    """
    path = folder / CARD_NAME
    text = path.read_text(encoding="utf-8")
    match = _CARD_SERVE_LINE.search(text)
    if match is None or match.group(1) == repo_id:
        return False
    current = match.group(1)
    updated = text.replace(f"vllm serve {current}", f"vllm serve {repo_id}").replace(f'"{current}"', f'"{repo_id}"')
    write_atomically(path, updated)
    return True


def check_push_arguments(repo_id: str, revision: str | None, create_pr: bool) -> None:
    """Argument errors, found before any conversion or network call."""
    if repo_id.count("/") != 1:
        raise HubPushError(
            f"{repo_id!r} is not ORG/NAME: give the organisation (or user) and the repo name, e.g. my-org/fireredasr"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"{repo_id!r} is not a valid Hub repo id ({str(error).splitlines()[0]})") from None
    if create_pr and revision not in (None, DEFAULT_REVISION):
        raise HubPushError(
            "--create-pr opens a pull request against the default branch: drop --revision "
            f"(to resume an interrupted PR upload, pass --revision {PR_REF_PREFIX}N without --create-pr)"
        )


def default_commit_message(repo: ConvertedRepo) -> str:
    options = repo.provenance.get("options", {})
    return (
        f"Upload FireRedASR-LLM converted by fireredasr-convert {repo.provenance.get('converter_version')} "
        f"({options.get('dtype')}, {repo.num_shards} shard(s))"
    )


def _git_blob_id(path: Path) -> str:
    """The id git gives the file's content (what the Hub reports for files not stored in LFS)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha_fileobj(f, _HASH_CHUNK_BYTES).hex()


def _compare_file(path: Path, remote: RepoFile) -> str | None:
    size = path.stat().st_size
    if remote.size != size:
        return f"{path.name}: {remote.size} bytes on the Hub, {size} here"
    if remote.lfs is not None:
        local = _sha256(path)
        if remote.lfs.sha256 != local:
            return f"{path.name}: LFS sha256 {remote.lfs.sha256} on the Hub, {local} here"
    elif remote.blob_id != _git_blob_id(path):
        return f"{path.name}: git blob {remote.blob_id} on the Hub differs from the file here"
    return None


def compare_with_hub(api: HfApi, repo_id: str, repo: ConvertedRepo, revision: str | None) -> HubComparison:
    """Compare the Hub's files at `revision` with the uploaded local files: names, sizes, sha256 / blob ids."""
    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, recursive=True, revision=revision, repo_type=REPO_TYPE)
        if isinstance(entry, RepoFile)
    }
    present = [name for name in repo.files if name in remote]
    mismatches = [f"{name}: missing on the Hub" for name in repo.files if name not in remote]
    # hashlib releases the GIL: the shards hash in parallel.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda name: _compare_file(repo.folder / name, remote[name]), present)
        mismatches += [problem for problem in results if problem is not None]
    return HubComparison(
        mismatches=mismatches,
        extra_files=sorted(name for name in remote if name not in repo.files and name != ".gitattributes"),
        lfs_files=sum(remote[name].lfs is not None for name in present),
    )


def push_to_hub(
    api: HfApi,
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> PushResult:
    """Upload the converted repo in `folder` to the model repo `repo_id` and compare the Hub's copy with it.

    Creates the repo if needed (`private` applies to a new repo; an existing
    public one is refused rather than silently exposed), and the branch
    `revision` if it is new. `upload_folder` skips files the Hub already holds
    with the same content and, with hf_xet, data already uploaded by an
    interrupted run, so re-running resumes. Raises HubPushError for a bad folder
    or arguments; network and Hub errors propagate (see `describe_hub_error`).
    """
    check_push_arguments(repo_id, revision, create_pr)
    repo = check_converted_repo(folder)
    if point_model_card_at(repo.folder, repo_id):
        log(f"model card: usage snippets now name {repo_id}")
        check_model_card(repo.folder / CARD_NAME)
    log(f"checked {repo.folder}: {len(repo.files)} files, {repo.num_shards} shard(s), {format_size(repo.total_size)}")
    if repo.left_out:
        log(f"not uploaded (not part of a converted repo): {', '.join(repo.left_out)}")

    repo_url = api.create_repo(repo_id, private=private, repo_type=REPO_TYPE, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type=REPO_TYPE).private:
        raise HubPushError(
            f"{repo_id} already exists and is public; --private only applies to a new repo: "
            "make it private in its settings on the Hub, or push without --private"
        )
    if revision not in (None, DEFAULT_REVISION) and not revision.startswith(PR_REF_PREFIX):
        api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)

    log(f"uploading to {repo_id}" + (f" ({revision})" if revision else " (pull request)" if create_pr else ""))
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=repo.folder,
        repo_type=REPO_TYPE,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or default_commit_message(repo),
        allow_patterns=list(repo.files),
        delete_patterns=list(STALE_WEIGHT_PATTERNS),
    )
    target = commit.pr_revision if create_pr else revision
    log("comparing the Hub's files with the local ones")
    comparison = compare_with_hub(api, repo_id, repo, revision=commit.oid)
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        revision=target,
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
        repo=repo,
        comparison=comparison,
    )


def resume_advice(create_pr: bool) -> str:
    """How to resume an interrupted or failed push."""
    return _RESUME_PR if create_pr else _RESUME


def _is_network_error(error: BaseException) -> bool:
    return any(cls.__name__ in _NETWORK_ERROR_NAMES for cls in type(error).__mro__)


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _http_fix(status: int | None, repo_id: str, resume: str) -> str:
    if status == 401:
        return "the token was refused: log in again (hf auth login), set HF_TOKEN or pass --token"
    if status == 403:
        return f"the token may not write to {repo_id}: use a token with write access to its organisation"
    if status == 404:
        return f"check the name {repo_id} and that the token can see it"
    if status == 429 or (status is not None and status >= 500):
        return f"the Hub is busy or failing: wait, then {resume}"
    return resume


def describe_hub_error(error: BaseException, repo_id: str, create_pr: bool = False) -> str:
    """One line for a failed push naming the cause and the fix (print it through `mask_tokens`)."""
    resume = resume_advice(create_pr)
    causes = list(_causes(error))
    if any(isinstance(e, OfflineModeIsEnabled) for e in causes):
        return "HF_HUB_OFFLINE is set, so nothing can be pushed: unset it and re-run"
    http = next((e for e in causes if isinstance(e, HfHubHTTPError)), None)
    if http is not None:
        status = http.response.status_code if http.response is not None else None
        reason = first_line(http.server_message or "") or first_line(str(http))
        return f"the Hub refused the request for {repo_id} ({reason}): {_http_fix(status, repo_id, resume)}"
    network = next((e for e in causes if _is_network_error(e)), None)
    if network is not None:
        return (
            f"could not reach the Hub ({type(network).__name__}: {first_line(str(network))}): check the network "
            f"(and HF_ENDPOINT / proxy settings), then {resume}"
        )
    return f"upload to {repo_id} failed ({type(error).__name__}: {first_line(str(error))}): {resume}"


def mask_tokens(text: str, secrets: list[str]) -> str:
    """`text` with every token in `secrets` masked."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
