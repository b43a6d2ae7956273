"""Pushing a converted repo to the Hub, driven through an autospec'd HfApi (no network here).

The fake Hub answers `list_repo_tree` from the local files, with LFS sha256 and
git blob ids computed here independently, so the post-upload comparison is
checked against what the Hub would really report.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import Mock, create_autospec

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash

from fireredasr_converter import __version__, hub_cli
from fireredasr_converter.cli import main, push_main
from fireredasr_converter.hub import HubPushError, check_converted_repo, check_model_card, push_to_hub

REPO_ID = "my-org/fireredasr-llm-tiny"
REPO_URL = f"https://huggingface.co/{REPO_ID}"
COMMIT_OID = "0123456789abcdef0123456789abcdef01234567"
FAKE_TOKEN = "hf_FakeTokenForTests1234567890abcdefXYZ"
SHARD = "model-00001-of-00001.safetensors"
EXPECTED_FILES = sorted(
    [
        "README.md",
        "config.json",
        "generation_config.json",
        "merges.txt",
        SHARD,
        "model.safetensors.index.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
)


@pytest.fixture
def repo(converted_fp32, tmp_path):
    """A private copy of the converted tiny repo (a push rewrites the card's usage snippets)."""
    return Path(shutil.copytree(converted_fp32, tmp_path / "converted"))


def hub_listing(folder: Path, names=EXPECTED_FILES, lfs_suffix=".safetensors") -> list:
    """What `list_repo_tree(recursive=True)` reports after an upload of `names`."""
    entries = [RepoFile(path=".gitattributes", size=1519, oid="a6344aac8c09253b3b630fb776ae94478aa0275b")]
    for name in names:
        data = (folder / name).read_bytes()
        if name.endswith(lfs_suffix):
            lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 135}
            entries.append(RepoFile(path=name, size=len(data), oid="f" * 40, lfs=lfs))
        else:
            entries.append(RepoFile(path=name, size=len(data), oid=git_hash(data)))
    return entries


class PushApi:
    """The HfApi methods a push calls, as HfApi defines them: the fake's calls are checked against
    their signatures, and any other method raises. (Autospeccing all of HfApi's ~370 members
    took 0.15 s of CPU per test.)"""

    create_repo = HfApi.create_repo
    repo_info = HfApi.repo_info
    create_branch = HfApi.create_branch
    upload_folder = HfApi.upload_folder
    list_repo_tree = HfApi.list_repo_tree


def fake_api(folder: Path, *, private_on_hub: bool = True, pr_url: str | None = None):
    api = create_autospec(PushApi, instance=True)
    api.create_repo.return_value = RepoUrl(REPO_URL)
    api.repo_info.return_value = SimpleNamespace(private=private_on_hub)
    api.upload_folder.return_value = CommitInfo(
        commit_url=f"{REPO_URL}/commit/{COMMIT_OID}",
        commit_message="m",
        commit_description="",
        oid=COMMIT_OID,
        pr_url=pr_url,
    )
    api.list_repo_tree.side_effect = lambda *args, **kwargs: iter(hub_listing(folder))
    return api


def upload_kwargs(folder: Path, **overrides) -> dict:
    kwargs = dict(
        repo_id=REPO_ID,
        folder_path=folder,
        repo_type="model",
        revision=None,
        create_pr=False,
        commit_message=f"Upload FireRedASR-LLM converted by fireredasr-convert {__version__} (fp32, 1 shard(s))",
        allow_patterns=EXPECTED_FILES,
        delete_patterns=["model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"],
    )
    return {**kwargs, **overrides}


def test_push_to_the_default_branch_makes_exactly_these_calls(repo):
    api = fake_api(repo)
    result = push_to_hub(api, repo, REPO_ID)
    assert [call[0] for call in api.method_calls] == ["create_repo", "upload_folder", "list_repo_tree"]
    api.create_repo.assert_called_once_with(REPO_ID, private=False, repo_type="model", exist_ok=True)
    api.upload_folder.assert_called_once_with(**upload_kwargs(repo))
    api.list_repo_tree.assert_called_once_with(REPO_ID, recursive=True, revision=COMMIT_OID, repo_type="model")
    assert result.comparison.mismatches == [] and result.comparison.extra_files == []
    assert result.comparison.lfs_files == 1
    assert result.browse_url == REPO_URL and result.serve_command == f"vllm serve {REPO_ID}"


def test_private_push_to_a_new_branch(repo):
    api = fake_api(repo)
    result = push_to_hub(api, repo, REPO_ID, private=True, revision="fp32", commit_message="FireRedASR-LLM fp32")
    assert [call[0] for call in api.method_calls] == [
        "create_repo", "repo_info", "create_branch", "upload_folder", "list_repo_tree"
    ]  # fmt: skip
    api.create_repo.assert_called_once_with(REPO_ID, private=True, repo_type="model", exist_ok=True)
    api.repo_info.assert_called_once_with(REPO_ID, repo_type="model")
    api.create_branch.assert_called_once_with(REPO_ID, branch="fp32", repo_type="model", exist_ok=True)
    expected = upload_kwargs(repo, revision="fp32", commit_message="FireRedASR-LLM fp32")
    api.upload_folder.assert_called_once_with(**expected)
    assert result.serve_command == f"vllm serve {REPO_ID} --revision fp32"
    assert result.browse_url == f"{REPO_URL}/tree/fp32"


def test_private_is_not_silently_ignored_for_an_existing_public_repo(repo):
    api = fake_api(repo, private_on_hub=False)
    with pytest.raises(HubPushError, match=f"{REPO_ID} already exists and is public"):
        push_to_hub(api, repo, REPO_ID, private=True)
    api.upload_folder.assert_not_called()


def test_create_pr_opens_a_pull_request_against_the_default_branch(repo):
    api = fake_api(repo, pr_url=f"{REPO_URL}/discussions/3")
    result = push_to_hub(api, repo, REPO_ID, create_pr=True)
    api.create_branch.assert_not_called()
    api.upload_folder.assert_called_once_with(**upload_kwargs(repo, create_pr=True))
    assert result.revision == "refs/pr/3" and result.browse_url == f"{REPO_URL}/discussions/3"
    assert result.serve_command == f"vllm serve {REPO_ID} --revision refs/pr/3"


def test_pull_request_ref_resumes_without_creating_a_branch(repo):
    api = fake_api(repo)
    push_to_hub(api, repo, REPO_ID, revision="refs/pr/3")
    api.create_branch.assert_not_called()
    api.upload_folder.assert_called_once_with(**upload_kwargs(repo, revision="refs/pr/3"))


def test_rerun_repeats_the_same_idempotent_calls(repo):
    """A second run (e.g. after a network failure) asks for the same upload; upload_folder skips what is there."""
    api = fake_api(repo)
    push_to_hub(api, repo, REPO_ID, revision="fp32")
    card = (repo / "README.md").read_text()
    push_to_hub(api, repo, REPO_ID, revision="fp32")
    assert (repo / "README.md").read_text() == card
    first, second = api.upload_folder.call_args_list
    assert first == second
    assert all(call.kwargs["exist_ok"] for call in api.create_repo.call_args_list + api.create_branch.call_args_list)


@pytest.mark.parametrize(
    ("repo_id", "revision", "create_pr", "problem"),
    [
        ("fireredasr-llm-tiny", None, False, "is not ORG/NAME"),
        ("my-org/sub/name", None, False, "is not ORG/NAME"),
        ("my-org/bad name", None, False, "is not a valid Hub repo id"),
        (REPO_ID, "fp32", True, "drop --revision"),
    ],
)
def test_bad_arguments_are_refused_before_any_call(repo, repo_id, revision, create_pr, problem):
    api = fake_api(repo)
    with pytest.raises(HubPushError, match=problem):
        push_to_hub(api, repo, repo_id, revision=revision, create_pr=create_pr)
    assert api.method_calls == []


def test_comparison_reports_every_kind_of_mismatch(repo):
    def damaged_listing(*args, **kwargs):
        listing = {entry.path: entry for entry in hub_listing(repo)}
        shard = listing[SHARD]
        shard.lfs = SimpleNamespace(size=shard.size, sha256="0" * 64, pointer_size=135)
        listing["config.json"].blob_id = "1" * 40
        listing["tokenizer.json"].size += 1
        del listing["vocab.json"]
        listing["notes.txt"] = RepoFile(path="notes.txt", size=3, oid="2" * 40)
        return iter(listing.values())

    api = fake_api(repo)
    api.list_repo_tree.side_effect = damaged_listing
    comparison = push_to_hub(api, repo, REPO_ID).comparison
    local_sha256 = hashlib.sha256((repo / SHARD).read_bytes()).hexdigest()
    size = (repo / "tokenizer.json").stat().st_size
    assert sorted(comparison.mismatches) == sorted(
        [
            "vocab.json: missing on the Hub",
            f"{SHARD}: LFS sha256 {'0' * 64} on the Hub, {local_sha256} here",
            f"config.json: git blob {'1' * 40} on the Hub differs from the file here",
            f"tokenizer.json: {size + 1} bytes on the Hub, {size} here",
        ]
    )
    assert comparison.extra_files == ["notes.txt"]


def test_matching_hashes_pass_even_with_large_files_outside_lfs(repo):
    """Files the Hub keeps in plain git are compared by blob id, whatever their size."""
    api = fake_api(repo)
    api.list_repo_tree.side_effect = lambda *args, **kwargs: iter(hub_listing(repo, lfs_suffix=".none"))
    comparison = push_to_hub(api, repo, REPO_ID).comparison
    assert comparison.mismatches == [] and comparison.lfs_files == 0


def _remove(folder, name):
    (folder / name).unlink()


def _truncate(folder, name):
    with open(folder / name, "r+b") as f:
        f.truncate((folder / name).stat().st_size - 64)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda f: _remove(f, "config.json"), "config.json is missing"),
        (lambda f: _remove(f, "model.safetensors.index.json"), "model.safetensors.index.json is missing"),
        (lambda f: _remove(f, "tokenizer.json"), "tokenizer.json is missing"),
        (lambda f: _remove(f, "preprocessor_config.json"), "preprocessor_config.json is missing"),
        (lambda f: _remove(f, "generation_config.json"), "generation_config.json is missing"),
        (lambda f: _remove(f, "README.md"), "README.md is missing"),
        (lambda f: _remove(f, SHARD), f"shard {SHARD} listed in model.safetensors.index.json is missing"),
        (lambda f: _truncate(f, SHARD), f"shard {SHARD} is damaged"),
        (
            lambda f: (f / "model.safetensors.index.json").write_text(
                (f / "model.safetensors.index.json").read_text().replace('"total_size": ', '"total_size": 1')
            ),
            "model.safetensors.index.json says 1",
        ),
        (lambda f: shutil.copy(f / SHARD, f / "model.safetensors"), "model.safetensors is not listed in"),
        (
            lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text().replace("<speech>", "<x>")),
            "tokenizer.json does not have <speech>",
        ),
        (
            lambda f: (f / "README.md").write_text((f / "README.md").read_text().replace("- vllm\n", "", 1)),
            "tags lacks vllm",
        ),
    ],
)
def test_incomplete_repo_is_refused_naming_the_missing_item(repo, damage, problem):
    damage(repo)
    api = fake_api(repo)
    with pytest.raises(HubPushError, match=problem) as refused:
        push_to_hub(api, repo, REPO_ID)
    assert "\n" not in str(refused.value)
    assert api.method_calls == []


def test_only_the_converted_files_are_uploaded(repo):
    (repo / "notes.txt").write_text("local notes")
    checked = check_converted_repo(repo)
    assert checked.files == EXPECTED_FILES and checked.left_out == ["notes.txt"]
    assert checked.total_size == sum((repo / name).stat().st_size for name in EXPECTED_FILES)


def test_model_card_parses_and_carries_hub_metadata(converted_fp32):
    card = ModelCard.load(converted_fp32 / "README.md")
    check_model_card(converted_fp32 / "README.md")
    metadata = card.data.to_dict()
    assert metadata["pipeline_tag"] == "automatic-speech-recognition"
    assert metadata["base_model"] == ["Qwen/Qwen2-7B-Instruct", "FireRedTeam/FireRedASR-LLM-L"]
    assert metadata["language"] == ["zh", "en"] and metadata["license"] == "apache-2.0"
    assert {"vllm", "fireredasr"} <= set(metadata["tags"]) and metadata["library_name"] == "vllm"
    # The metadata survives the round trip the Hub's YAML check applies.
    assert yaml.safe_load(card.data.to_yaml()) == metadata
    # Which converter and which options produced the repo.
    assert f"fireredasr-vllm {__version__}" in card.text and "--dtype fp32" in card.text


def test_push_points_the_usage_snippets_at_the_hub_repo(repo):
    push_to_hub(fake_api(repo), repo, REPO_ID)
    text = (repo / "README.md").read_text()
    assert "path/to/this/repo" not in text
    assert f"vllm serve {REPO_ID}" in text and f'LLM(model="{REPO_ID}")' in text and f'model="{REPO_ID}", file=' in text
    push_to_hub(fake_api(repo), repo, "other-org/fireredasr")
    text = (repo / "README.md").read_text()
    assert REPO_ID not in text and "vllm serve other-org/fireredasr" in text
    check_model_card(repo / "README.md")


# --- command line -----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every socket connection; HF_HUB_OFFLINE on as well."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"test: network access to {address} refused")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def hub_home(monkeypatch, tmp_path):
    """An empty Hugging Face home: no stored login, no HF_TOKEN."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return home


@pytest.fixture
def hub_factory(monkeypatch, repo):
    """Replaces the HfApi the commands build with an autospec'd fake, recording the constructor arguments."""
    built = SimpleNamespace(kwargs=None, api=fake_api(repo))

    def factory(**kwargs):
        built.kwargs = kwargs
        return built.api

    monkeypatch.setattr(hub_cli, "HfApi", factory)
    return built


def error_line(result) -> str:
    """The failure's one line: the last on stderr, and the only one starting with `error:`."""
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    return lines[-1]


def assert_token_nowhere(token: str, outputs: list[str], folders: list[Path]) -> None:
    for text in outputs:
        assert token not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


def test_conversion_without_push_makes_no_network_call(tiny_release, tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(hub_cli, "HfApi", Mock(side_effect=AssertionError("HfApi built without --push-to-hub")))
    args = [str(tiny_release.model_dir), str(tmp_path / "out"), "--dtype", "fp32", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").exists()
    assert no_network == []


def test_push_command_uses_the_token_and_never_shows_it(repo, hub_factory, hub_home, capfd):
    result = CliRunner().invoke(push_main, [str(repo), REPO_ID, "--token", FAKE_TOKEN, "--private"])
    assert result.exit_code == 0, result.output
    assert hub_factory.kwargs["token"] == FAKE_TOKEN
    assert result.stdout.splitlines() == [REPO_URL, f"vllm serve {REPO_ID}"]
    assert "verified: all 10 files on the Hub match" in result.stderr
    captured = capfd.readouterr()
    assert_token_nowhere(FAKE_TOKEN, [result.output, captured.out, captured.err], [repo.parent])


@pytest.mark.parametrize("source", ["HF_TOKEN", "stored login"])
def test_token_in_a_hub_error_is_masked(repo, hub_factory, hub_home, monkeypatch, source):
    token = FAKE_TOKEN
    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        hub_home.mkdir()
        (hub_home / "token").write_text(token)
    response = Mock(status_code=403, headers={}, request=None)
    hub_factory.api.upload_folder.side_effect = HfHubHTTPError(
        f"403 Forbidden: request with Authorization: Bearer {token}", response=response
    )
    result = CliRunner().invoke(push_main, [str(repo), REPO_ID])
    assert result.exit_code == 1
    assert hub_factory.kwargs["token"] is None  # HF_TOKEN is found by huggingface_hub itself
    line = error_line(result)
    assert line.startswith("error: the Hub refused the request") and "403 Forbidden" in line
    assert "use a token with write access" in line and "Bearer ***" in line
    assert_token_nowhere(token, [result.output], [repo])


def test_unreachable_hub_fails_with_one_line(repo, hub_home, monkeypatch):
    """The real HfApi against a closed local port: connection refused, as with no network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(hub_cli, "HfApi", lambda **kwargs: HfApi(endpoint=f"http://127.0.0.1:{port}", **kwargs))
    result = CliRunner().invoke(push_main, [str(repo), REPO_ID, "--token", FAKE_TOKEN])
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith("error: could not reach the Hub (ConnectError")
    assert "re-run the same command to resume" in line
    assert_token_nowhere(FAKE_TOKEN, [result.output], [repo.parent])


def test_offline_mode_is_named(repo, hub_factory, hub_home):
    hub_factory.api.create_repo.side_effect = OfflineModeIsEnabled("Cannot reach the Hub: offline mode is enabled")
    result = CliRunner().invoke(push_main, [str(repo), REPO_ID, "--token", FAKE_TOKEN])
    assert result.exit_code == 1 and "HF_HUB_OFFLINE is set" in error_line(result)


def test_missing_token_is_refused_before_any_call(repo, hub_factory, hub_home):
    result = CliRunner().invoke(push_main, [str(repo), REPO_ID])
    assert result.exit_code == 1 and "no Hub token" in error_line(result)
    assert hub_factory.kwargs is None


def test_mismatch_after_upload_exits_non_zero(repo, hub_factory, hub_home):
    def listing_with_a_short_shard(*args, **kwargs):
        listing = hub_listing(repo)
        next(entry for entry in listing if entry.path == SHARD).size -= 1
        return iter(listing)

    hub_factory.api.list_repo_tree.side_effect = listing_with_a_short_shard
    result = CliRunner().invoke(push_main, [str(repo), REPO_ID, "--token", FAKE_TOKEN])
    assert result.exit_code == 1
    assert f"mismatch: {SHARD}: " in result.stderr and "differs from" in error_line(result)
    assert result.stdout == ""


def test_convert_then_push(tiny_release, tmp_path, hub_factory, hub_home):
    out = tmp_path / "out"
    hub_factory.api.list_repo_tree.side_effect = lambda *args, **kwargs: iter(hub_listing(out))
    args = [str(tiny_release.model_dir), str(out), "--dtype", "fp32", "--quiet", "--push-to-hub", REPO_ID]
    result = CliRunner().invoke(main, [*args, "--revision", "fp32", "--token", FAKE_TOKEN])
    assert result.exit_code == 0, result.output
    hub_factory.api.create_branch.assert_called_once_with(REPO_ID, branch="fp32", repo_type="model", exist_ok=True)
    assert hub_factory.api.upload_folder.call_args.kwargs["folder_path"] == out
    assert result.stdout.splitlines()[-1] == f"vllm serve {REPO_ID} --revision fp32"
    assert_token_nowhere(FAKE_TOKEN, [result.output], [tmp_path])


def test_push_options_need_push_to_hub_and_dry_run_pushes_nothing(tiny_release, tmp_path, hub_factory, hub_home):
    src, out = str(tiny_release.model_dir), str(tmp_path / "out")
    stray = CliRunner().invoke(main, [src, out, "--private", "--revision", "fp32"])
    assert stray.exit_code == 2 and "--private, --revision only apply with --push-to-hub" in stray.stderr
    dry = CliRunner().invoke(main, [src, out, "--dry-run", "--push-to-hub", REPO_ID, "--token", FAKE_TOKEN])
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines()[-1] == f"dry run: nothing pushed to {REPO_ID}"
    assert hub_factory.kwargs is None and not (tmp_path / "out").exists()


def test_bad_repo_id_is_refused_before_converting(tiny_release, tmp_path, hub_factory, hub_home):
    args = [str(tiny_release.model_dir), str(tmp_path / "out"), "--push-to-hub", "fireredasr", "--token", FAKE_TOKEN]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "'fireredasr' is not ORG/NAME" in error_line(result)
    assert not (tmp_path / "out").exists() and hub_factory.kwargs is None


@pytest.mark.slow
def test_push_console_script_in_a_real_process(tmp_path):
    script = Path(sys.executable).parent / "fireredasr-push"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    completed = subprocess.run(
        [str(script), str(tmp_path / "missing"), REPO_ID, "--token", FAKE_TOKEN],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert completed.returncode == 1
    assert completed.stderr.splitlines()[-1] == f"error: {tmp_path / 'missing'} is not a folder: " + (
        "give the output folder of fireredasr-convert"
    )


def test_push_names_a_wrong_folder_before_asking_for_a_token(tmp_path, hub_factory, hub_home):
    result = CliRunner().invoke(push_main, [str(tmp_path / "nowhere"), REPO_ID])
    assert result.exit_code == 1
    assert "is not a folder" in error_line(result) and "token" not in error_line(result)
    assert hub_factory.kwargs is None


def test_push_of_a_stock_export_says_which_target_to_convert_with(repo, hub_factory, hub_home):
    config = json.loads((repo / "config.json").read_text())
    config["architectures"] = ["FireRedASR2ForConditionalGeneration"]
    (repo / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(push_main, [str(repo), REPO_ID, "--token", FAKE_TOKEN])
    assert result.exit_code == 1
    line = error_line(result)
    assert "--target stock-vllm export" in line and "--target plugin" in line
    assert hub_factory.kwargs is None
