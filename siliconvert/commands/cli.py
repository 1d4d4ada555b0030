"""The command line: a thin shell over pipeline.py. Exit codes: 0 ok, 1 a gate failed, 2 bad input."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import sys
import warnings
from pathlib import Path

import click

from siliconvert import __version__
from siliconvert.children import Interrupted, stopping_on_signals
from siliconvert.errors import GateFailed, SiliconvertError

INTERNAL_ERROR = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="siliconvert")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Convert a Hugging Face checkpoint to Core ML, MLX and GGUF, run each artifact on its own
    runtime, and compare it with the reference before you release it."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Parse and check the recipe and its source; build nothing.")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt checkpoints (loaded weights-only).")
@click.option("--force", is_flag=True, help="Write release folders even for artifacts that failed a gate.")
def recipe(recipe_file: Path, check: bool, allow_pickle: bool, force: bool) -> None:
    """Run RECIPE_FILE: convert, validate, gate, report."""
    from siliconvert.commands.pipeline import open_source, preflight, run_recipe
    from siliconvert.recipe import load_recipe

    parsed = load_recipe(recipe_file)
    if check:  # the same checks a run makes before its first tensor, on the real source
        preflight(parsed, open_source(parsed.source, allow_pickle), recipe_file)
        click.echo(f"{recipe_file}: ok ({len(parsed.targets)} targets, output {parsed.output_dir(recipe_file)})")
        return
    outcome = run_recipe(parsed, recipe_file, allow_pickle=allow_pickle, force_release=force)
    _finish(outcome)


@cli.command()
@click.argument("recipe_file", type=click.Path(path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt checkpoints (loaded weights-only).")
@click.option("--fixed", help="Only these fixed recipes, comma-separated (Q4_K_M,4bit-g64,mixed_3_6-g64); "
              "default all.")
def sweep(recipe_file: Path, allow_pickle: bool, fixed: str | None) -> None:
    """Size against KLD for RECIPE_FILE's source: planned artifacts beside every fixed type of its formats."""
    from siliconvert.commands.sweep import run_sweep
    from siliconvert.recipe import load_recipe

    parsed = load_recipe(recipe_file)
    run_sweep(parsed, recipe_file, allow_pickle=allow_pickle, only=fixed.split(",") if fixed else None)
    click.echo(f"sweep: {parsed.output_dir(recipe_file) / 'sweep' / 'sweep.md'}")


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.option("--source", required=True, help="The checkpoint the artifact was made from (folder or hub id).")
@click.option("--corpus", default="builtin", show_default=True, help="'builtin' or a UTF-8 text file.")
@click.option("--output", type=click.Path(path_type=Path), help="Where report.json goes [./build/validate-NAME].")
@click.option("--tokens", default=1024, show_default=True, help="Tokens scored.")
@click.option("--context", default=256, show_default=True, help="Window length.")
@click.option("--tokenizer", type=click.Choice(["lenient", "strict"]), default="lenient", show_default=True,
              help="strict: a tokenizer difference from a known rule of the runtime fails too.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Measure prefill and decode speed, time to first token and peak memory.")
def validate(artifact: Path, source: str, corpus: str, output: Path | None, tokens: int, context: int,
             tokenizer: str, latency: bool) -> None:
    """Score one existing ARTIFACT against its source (same report format as `recipe`)."""
    from siliconvert.commands.pipeline import Outcome, check_positions, open_source, prepare_output, validate_artifacts
    from siliconvert.format import detect_artifact
    from siliconvert.recipe import validate_settings

    settings = validate_settings(corpus=corpus, tokens=tokens, context=context, tokenizer=tokenizer, latency=latency)
    found = detect_artifact(artifact)
    checkpoint = open_source(source)
    check_positions(checkpoint, [("--context", context)], "command line")
    out_dir = prepare_output(output or Path("build") / f"validate-{artifact.name}")
    report = validate_artifacts(checkpoint, source, [found], settings, {found.path: settings.gates}, out_dir)
    _finish(Outcome(report, [found], out_dir), releasing=False)


@cli.command()
@click.argument("path")
def inspect(path: str) -> None:
    """Say what PATH is: a checkpoint (architecture, sizes) or an artifact (format, quantization)."""
    from siliconvert.commands.inspect import describe

    click.echo(json.dumps(describe(path), indent=2))


@cli.command()
@click.argument("release_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo", required=True, help="Hub repo id, org/name.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; touch no network.")
def push(release_dir: Path, repo: str, private: bool, dry_run: bool) -> None:
    """Upload RELEASE_DIR (a folder under <output>/release/) to the Hugging Face Hub."""
    from siliconvert.commands.push import push as push_release

    for line in push_release(release_dir, repo, private=private, dry_run=dry_run):
        click.echo(line)
    click.echo(f"{'would upload' if dry_run else 'uploaded'} to https://huggingface.co/{repo}")


@cli.command()
def doctor() -> None:
    """Which runtimes and devices exist here."""
    from siliconvert.commands.inspect import runtimes

    click.echo(f"siliconvert {__version__} · Python {platform.python_version()} · {platform.platform()}")
    click.echo(f"cores {os.cpu_count()} · free disk here {shutil.disk_usage('.').free / 1e9:.1f} GB")
    for name, status in runtimes().items():
        click.echo(f"  {name:<14} {status}")


def _finish(outcome, releasing: bool = True) -> None:
    out = outcome.out_dir
    if outcome.report is None:
        click.echo(f"built {len(outcome.artifacts)} artifacts in {out / 'artifacts'} (validation off)")
        return
    click.echo(f"report: {out / 'report.md'}")
    for folder in outcome.releases:
        click.echo(f"release: {folder}")
    if outcome.failures:
        stopped = "release stopped" if releasing else "gate failed"  # `validate` asks for no release
        raise GateFailed(f"{stopped}: " + "; ".join(outcome.failures))
    click.echo("all gates passed")


def main(argv: list[str] | None = None) -> None:
    """The `siliconvert` command; `argv` (default sys.argv[1:]) lets tests run it in-process."""
    args = sys.argv[1:] if argv is None else list(argv)
    # --debug belongs to the group, but the error hint asks for it anywhere: move it to the front (not after `--`).
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    if debug:
        args = ["--debug"] + [arg for i, arg in enumerate(args) if i >= end or arg != "--debug"]
    warnings.showwarning = _one_line_warning
    try:
        with stopping_on_signals():
            cli.main(args=args, prog_name="siliconvert", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns a KeyboardInterrupt into Abort
        cause = e if isinstance(e, Interrupted) else e.__cause__
        signum = cause.signum if isinstance(cause, Interrupted) else signal.SIGINT
        click.echo(f"interrupted by {signal.Signals(signum).name}: the run's child processes were stopped; what "
                   f"was being written is left under hidden names for the next run to sweep", err=True)
        sys.exit(128 + signum)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except SiliconvertError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:
        if debug:
            raise
        click.echo(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(INTERNAL_ERROR)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)
