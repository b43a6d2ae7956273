"""The Hub push on the command line: options shared by `fireredasr-convert --push-to-hub` and `fireredasr-push`.

`run_push` is what both commands call: it builds the `HfApi`, prints progress
and the result, and turns every failure into one line and a non-zero exit. The
checks, the upload and the comparison are in `hub`, not here.

The token goes only into `HfApi(token=...)`; without --token, huggingface_hub
finds it itself (`HF_TOKEN`, then the stored login). It is looked up here only
to refuse early when there is none, and to mask it in every error message, in
case a library error ever quotes a request. It is never printed or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
from huggingface_hub import HfApi, get_token

from . import __version__
from .errors import first_line
from .hub import (
    HubPushError,
    check_converted_repo,
    check_push_arguments,
    describe_hub_error,
    mask_tokens,
    push_to_hub,
    resume_advice,
)


@dataclass(frozen=True)
class PushRequest:
    """What the command line asked for; the token never appears in repr()."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = field(default=None, repr=False)


def hub_options(command):
    """The options both `fireredasr-convert --push-to-hub` and `fireredasr-push` take."""
    options = [
        click.option("--private", is_flag=True, help="Create the repo as private (an existing public one is refused)."),
        click.option("--revision", metavar="BRANCH", help="Push to this branch (made if new), or to refs/pr/N."),
        click.option("--create-pr", is_flag=True, help="Open a pull request against the default branch instead."),
        click.option("--commit-message", metavar="TEXT", help="Commit title (default: converter version and dtype)."),
        click.option("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN, then the `hf auth login` one)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_push_request(request: PushRequest) -> None:
    """Everything that can be checked without the network; run before a long conversion."""
    check_push_arguments(request.repo_id, request.revision, request.create_pr)
    try:
        token = request.token or get_token()
    except Exception as error:  # e.g. a failed OIDC exchange; its message does not carry a token
        reason = first_line(str(error))
        raise HubPushError(f"cannot get a Hub token ({reason}): run `hf auth login` or pass --token") from None
    if not token:
        raise HubPushError("no Hub token: run `hf auth login`, set HF_TOKEN, or pass --token")


def run_push(folder: Path, request: PushRequest) -> None:
    """Push `folder` as the command line asked; exits non-zero with one line on any failure."""
    def log(line: str) -> None:
        click.echo(line, err=True)

    secrets = _known_tokens(request)
    try:
        # The folder before the token: a wrong folder is named before the user is sent to log in.
        check_converted_repo(folder)
        check_push_request(request)
        api = HfApi(token=request.token, library_name="fireredasr-vllm", library_version=__version__)
        result = push_to_hub(
            api,
            folder,
            request.repo_id,
            private=request.private,
            revision=request.revision,
            create_pr=request.create_pr,
            commit_message=request.commit_message,
            log=log,
        )
    except HubPushError as error:
        _fail(str(error), secrets)
    except KeyboardInterrupt:
        _fail(f"interrupted: {resume_advice(request.create_pr)}", secrets, 130)
    except Exception as error:
        _fail(describe_hub_error(error, request.repo_id, request.create_pr), secrets)

    log(f"commit: {result.commit_url}")
    comparison = result.comparison
    for name in comparison.extra_files:
        log(f"also on the Hub, not from {result.repo.folder}: {name}")
    if comparison.mismatches:
        for line in comparison.mismatches:
            log(f"mismatch: {line}")
        _fail(
            f"the Hub copy of {result.repo_id} differs from {result.repo.folder} in "
            f"{len(comparison.mismatches)} file(s): re-run the same command to upload them again",
            secrets,
        )
    log(
        f"verified: all {len(result.repo.files)} files on the Hub match {result.repo.folder} "
        f"({comparison.lfs_files} by LFS sha256, the rest by git blob id)"
    )
    click.echo(result.browse_url)
    click.echo(result.serve_command)


def _known_tokens(request: PushRequest) -> list[str]:
    """The tokens a message could leak: the one given and the one huggingface_hub would use."""
    try:
        resolved = get_token()
    except Exception:  # a failed OIDC exchange: no token to leak
        resolved = None
    return [token for token in (request.token, resolved) if token]


def _fail(message: str, secrets: list[str], code: int = 1) -> None:
    click.echo(f"error: {mask_tokens(message, secrets)}", err=True)
    raise SystemExit(code)
