"""The commands `fireredasr-convert SRC OUT` and `fireredasr-push OUT ORG/NAME`: options, errors, exit status.

The conversion is `pipeline.convert`; the push options and output are
`hub_cli`'s, the push itself `hub`'s.
"""

from __future__ import annotations

from pathlib import Path

import click

from .aed_release import is_aed_release
from .errors import ConversionError
from .hub import HubPushError
from .hub_cli import PushRequest, check_push_request, hub_options, run_push
from .pipeline import DEFAULT_TARGET, TARGETS, convert
from .plan import DEFAULT_MAX_SHARD_SIZE, parse_size
from .repo_format import DTYPES
from .safe_io import sigterm_as_interrupt


class _Size(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ConversionError as error:
            self.fail(str(error), param, ctx)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--llm-dir", type=click.Path(path_type=Path), help="Qwen2-7B-Instruct folder, if SRC has no working link to it."
)
@click.option(
    "--dtype", type=click.Choice(list(DTYPES)), default="bf16", show_default=True, help="dtype of every output tensor."
)
@click.option(
    "--max-shard-size",
    type=_Size(),
    default=DEFAULT_MAX_SHARD_SIZE,
    show_default=True,
    help="Largest output shard (5GB, 500MB, 2GiB).",
)
@click.option("--lora-alpha", type=click.IntRange(min=1), help="LoRA alpha; the original trained with 16.")
@click.option(
    "--target",
    type=click.Choice(list(TARGETS)),
    default=DEFAULT_TARGET,
    show_default=True,
    help="Output format: this project's vLLM plugin, or stock vLLM's FireRedASR2 model (docs/stock-vllm.md).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty (the old OUT survives a failure).")
@click.option("--dry-run", is_flag=True, help="Check the release and print the plan; write nothing.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--push-to-hub", metavar="ORG/NAME", help="Then upload OUT to this Hub model repo (docs/hub.md).")
@hub_options
def main(
    src, out, llm_dir, dtype, max_shard_size, lora_alpha, target, overwrite, dry_run, quiet, push_to_hub, **hub_settings
):
    """Convert the FireRedASR release in SRC into a self-contained Hugging Face-style repo at OUT.

    SRC is the release folder: FireRedASR-LLM (model.pth.tar, asr_encoder.pth.tar, cmvn.ark
    and a Qwen2-7B-Instruct link or folder) or FireRedASR-AED (model.pth.tar, cmvn.ark,
    dict.txt, train_bpe1000.model; found by its dict.txt). OUT gets safetensors shards,
    config.json, the tokenizer (LLM: Qwen2's with <speech>; AED: dict.txt and the
    SentencePiece model), preprocessor and generation configs and a model card.
    --target stock-vllm writes the layout of stock vLLM's FireRedASR2 model instead (LLM only).
    With --push-to-hub, OUT is then uploaded as `fireredasr-push OUT ORG/NAME` does.
    SIGTERM stops it as Ctrl-C does: nothing is left behind.
    """
    with sigterm_as_interrupt():
        _convert_and_push(
            src, out, llm_dir, dtype, max_shard_size, lora_alpha, target, overwrite, dry_run, quiet, push_to_hub,
            hub_settings,
        )  # fmt: skip


def _convert_and_push(
    src, out, llm_dir, dtype, max_shard_size, lora_alpha, target, overwrite, dry_run, quiet, push_to_hub, hub_settings
):
    push = _push_request(push_to_hub, hub_settings)
    if push is not None and target != DEFAULT_TARGET:
        raise click.UsageError(f"--push-to-hub uploads the {DEFAULT_TARGET} format only; drop --target {target}")
    if push is not None and is_aed_release(src):
        raise click.UsageError(
            "--push-to-hub uploads FireRedASR-LLM repos only so far; convert the AED release without it"
        )
    try:
        if push is not None:
            check_push_request(push)  # before a long conversion
        result = convert(
            src,
            out,
            llm_dir=llm_dir,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            dry_run=dry_run,
            lora_alpha=lora_alpha,
            quiet=quiet,
            target=target,
        )
    except (ConversionError, HubPushError) as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        raise SystemExit(130) from None
    if dry_run:
        click.echo("\n".join(result.plan))
        click.echo(f"dry run: nothing written to {result.out}")
        if push is not None:
            click.echo(f"dry run: nothing pushed to {push.repo_id}")
    elif push is not None:
        run_push(result.out, push)


def _push_request(repo_id: str | None, hub_settings: dict) -> PushRequest | None:
    if repo_id is None:
        given = [f"--{name.replace('_', '-')}" for name, value in hub_settings.items() if value]
        if given:
            raise click.UsageError(f"{', '.join(given)} only apply with --push-to-hub ORG/NAME")
        return None
    return PushRequest(repo_id=repo_id, **hub_settings)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="ORG/NAME")
@hub_options
def push_main(out, repo_id, **hub_settings):
    """Upload the converted repo in OUT to the Hugging Face Hub model repo ORG/NAME.

    Checks that OUT is a complete converted repo, creates the repo (and branch)
    if needed, uploads with huggingface_hub, then compares the Hub's files with
    OUT. Re-running after a failure resumes. Prints the repo URL and the
    `vllm serve` command. See docs/hub.md.
    """
    with sigterm_as_interrupt():
        run_push(out, PushRequest(repo_id=repo_id, **hub_settings))
