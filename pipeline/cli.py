"""`sftgo-prep`: thin click commands that turn flags into a config and call run().

Errors a user can cause print one sentence and exit 1 (2 for usage errors); --debug
shows the traceback.
"""

from __future__ import annotations

import functools
import signal
import sys

import click

from sftgo.core.clihelp import show_defaults
from sftgo.core.config import field_default, field_docs, load_config_file
from sftgo.core.errors import ConfigError, SftgoError, signals_interrupt, unexpected
from sftgo.core.fileio import os_error_sentence
from sftgo.core.text import safe_text
from sftgo.pipeline.config import FORMATS, THRESHOLDS, BuildConfig
from sftgo.pipeline.gpus import GPU_MODES

DOCS = field_docs(BuildConfig)

BUILD_EXAMPLE = """
\b
Example:
  sftgo-prep build data/alpaca.jsonl data/chat.jsonl --out out/shards --eta 0.3
  sftgo-prep build train.parquet --out shards --format messages --workers 4 --rejects rejects.jsonl
  sftgo-prep build hf:tatsu-lab/alpaca --out shards --scheduler tcp://10.0.0.5:8786
  sftgo-prep build 's3://bucket/data/*.jsonl' --out shards --storage-options '{"endpoint_url": "http://10.0.0.9:9000"}'
"""

SCORE_EXAMPLE = """
\b
Example:
  sftgo-prep score out/shards --strategy reference
  sftgo-prep score out/shards --strategy reference --reference-mode excess --base-model HuggingFaceTB/SmolLM2-360M
  sftgo-prep score out/shards --strategy semantic --compressor-model ./llmlingua-2-checkpoint
  sftgo-prep score s3://bucket/shards --strategy tfidf --eta 0.2 --overwrite --scheduler tcp://10.0.0.5:8786
"""

INSPECT_EXAMPLE = """
\b
Example:
  sftgo-prep inspect out/shards
  sftgo-prep inspect out/shards --sample 3 --html report.html
  sftgo-prep inspect out/shards --strategy tfidf,reference --html compare.html
"""


def _user_errors(fn):
    """Turn failures into one clear sentence (and a traceback only with --debug): the message as it is for
    every SftgoError (a task that failed on a Dask worker arrives as one, TaskError), the path and the fix for
    an OSError (a file that cannot be read or written: core.fileio.os_error_sentence); anything else is
    unexpected and named by its type."""

    @functools.wraps(fn)
    def wrapper(*args, debug=False, **kwargs):
        try:
            with signals_interrupt():  # SIGTERM / SIGUSR1 (a scheduler's kill) stop the cluster as Ctrl-C does
                return fn(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except (SftgoError, OSError) as exc:
            if debug:
                raise
            message = str(exc) if isinstance(exc, SftgoError) else os_error_sentence(exc)
            click.echo(f"Error: {safe_text(message)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            from sftgo.pipeline.executor import abandon_clusters

            abandon_clusters()
            signum = getattr(exc, "signum", signal.SIGINT)
            by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            click.echo(f"Interrupted{by}; run the same command again to resume.", err=True)
            sys.exit(128 + signum)
        except Exception as exc:  # not foreseen (a bug): still one sentence, the traceback with --debug
            if debug:
                raise
            click.echo(f"Error: {safe_text(unexpected(exc, 'sftgo-prep'))}", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show full tracebacks.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option("0.1.0", prog_name="sftgo-prep")
def main():
    """Prepare instruction data for SFT-GO: tokenize with the chat template, score every
    token's importance and write group masks as columns of Parquet shards."""


def field(name: str, *decls: str, **kw):
    """A click option for BuildConfig field `name`: its default and help come from the dataclass
    (each default is written once, there)."""
    default = field_default(BuildConfig, name)
    flag = decls or ("--" + name.replace("_", "-"),)
    if isinstance(default, bool):
        return click.option(*flag, name, is_flag=True, default=default, help=DOCS.get(name, ""))
    kw.setdefault("type", type(default) if default not in (None, "") and not isinstance(default, (list, dict)) else str)
    shown = "" if default in (None, "", [], {}) else f" [default: {default}]"
    return click.option(*flag, name, default=default, show_default=False, help=DOCS.get(name, "") + shown, **kw)


def _strategy_options(fn):
    """Options of the importance strategies and the cluster, shared by `build` and `score`."""
    options = [
        field("eta"),
        field("threshold", type=click.Choice(THRESHOLDS)),
        field("reference_model", metavar="NAME"),
        field("reference_mode", type=click.Choice(["loss", "excess"])),
        field("base_model", metavar="NAME"),
        field("score_batch_tokens"),
        field("compressor_model", metavar="DIR"),
        field("semantic_encoder", metavar="DIR"),
        field("tfidf_unit", type=click.Choice(["word", "token"])),
        field("tfidf_token_pattern", metavar="REGEX"),
        field("workers"),
        field("scheduler", metavar="ADDRESS"),
        field("gpu_workers", type=click.Choice(GPU_MODES)),
        field("overwrite"),
        field("trust_remote_code"),
        click.option("--quiet", is_flag=True, help="No progress output."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


CONFIG_HELP = "JSON, TOML or YAML file of settings (field names, dashes or underscores); flags override it."
STRATEGY_FIELDS = (
    "eta",
    "threshold",
    "reference_model",
    "reference_mode",
    "base_model",
    "score_batch_tokens",
    "compressor_model",
    "semantic_encoder",
    "tfidf_unit",
    "tfidf_token_pattern",
)


def _explicit(ctx: click.Context) -> set[str]:
    """Names of the options the user actually typed (so they override the config file)."""
    return {k for k in ctx.params if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}


def _strategy_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


@main.command(epilog=BUILD_EXAMPLE)
@click.argument("inputs", nargs=-1)
@field("out", metavar="DIR")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--strategy",
    default=",".join(field_default(BuildConfig, "strategies")),
    show_default=True,
    help="Importance strategies, comma-separated (built in: tfidf, reference, semantic; installed plug-ins: "
    "entry points of the group sftgo.strategies).",
)
@field("num_groups")
@field("tokenizer", metavar="NAME")
@field("format", "--format", type=click.Choice(FORMATS))
@click.option(
    "--field-map",
    default="",
    metavar="MAP",
    help="Rename fields: canonical=name in your data, e.g. 'instruction=question,output=answer'.",
)
@field("split")
@field("max_length")
@field("overflow", type=click.Choice(["truncate", "drop"]))
@field("max_record_bytes", type=int, metavar="BYTES")
@field("rows_per_shard")
@field("rejects", metavar="FILE", type=click.Path(dir_okay=False))
@field("storage_options", metavar="JSON")
@_strategy_options
@click.pass_context
@_user_errors
def build(ctx, inputs, config_file, strategy, field_map, quiet, **opts):
    """Build shards from INPUTS (JSONL, JSON, Parquet, CSV, datasets folders, hf:NAME, s3:// and other URLs)."""
    from sftgo.core.storage import parse_options
    from sftgo.pipeline.build import run
    from sftgo.pipeline.formats import parse_field_map

    values = load_config_file(config_file, BuildConfig) if config_file else {}
    given = _explicit(ctx)
    flags = {
        **opts,
        "inputs": list(inputs),
        "strategies": _strategy_list(strategy),
        "field_map": parse_field_map(field_map) if field_map else {},
        "storage_options": parse_options(opts["storage_options"]),
        "progress": not quiet,
    }
    source = {"strategies": "strategy", "progress": "quiet"}
    for key, value in flags.items():
        if key not in values or source.get(key, key) in given:
            values[key] = value
    manifest, wrote = run(BuildConfig(**values))
    t, where = manifest["totals"], safe_text(str(values["out"]))
    what = (
        f"{t['records_written']} records ({t['tokens']} tokens, {t['loss_tokens']} supervised) "
        f"in {len(manifest['shards'])} shard(s)"
    )
    rejected = f"rejected {t['records_rejected']}" + (
        f" ({', '.join(f'{k}: {v}' for k, v in manifest['rejected'].items())})" if t["records_rejected"] else ""
    )
    if t.get("truncated"):
        rejected += f"; truncated {t['truncated']} to --max-length {manifest['params']['max_length']}"
    if t.get("unsupervised_by_weight"):
        rejected += f"; {t['unsupervised_by_weight']} assistant turn(s) left unsupervised by weight 0"
    click.echo(
        f"Wrote {what} to {where}; {rejected}."
        if wrote
        else f"Nothing written: {where} already holds this build, {what}; {rejected}."
    )


# what a `score` config file may set (the build's other settings are fixed by the build)
SCORE_SETTINGS = (
    *STRATEGY_FIELDS,
    "strategies",
    "workers",
    "scheduler",
    "gpu_workers",
    "overwrite",
    "trust_remote_code",
    "progress",
    "storage_options",
)


@main.command(epilog=SCORE_EXAMPLE)
@click.argument("directory", type=click.Path())
@click.option(
    "--strategy",
    default=None,
    help="Strategies to add, comma-separated (built in: tfidf, reference, semantic; installed plug-ins too).",
)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@field("storage_options", metavar="JSON")
@_strategy_options
@click.pass_context
@_user_errors
def score(ctx, directory, strategy, config_file, quiet, **opts):
    """Add a strategy's importance and group columns to an existing build (no re-tokenizing); DIRECTORY may be a
    URL of an object store (s3://...)."""
    from sftgo.core.storage import parse_options
    from sftgo.pipeline.score import run

    skip = tuple(name for name in field_docs(BuildConfig) if name not in SCORE_SETTINGS)
    from_file = load_config_file(config_file, BuildConfig, skip=skip) if config_file else {}
    values, given = dict(from_file), _explicit(ctx)
    flags = {
        **opts,
        "progress": not quiet,
        **({"strategies": _strategy_list(strategy)} if strategy is not None else {}),
    }
    source = {"strategies": "strategy", "progress": "quiet"}
    for key, value in flags.items():
        if key not in values or source.get(key, key) in given:
            values[key] = value
    new = values.get("strategies")
    if not new:
        raise ConfigError("Give the strategies to add with --strategy (or `strategies` in --config).")
    # the build's own settings stay unless given here (eta and threshold apply to the new strategies)
    options = {k: values[k] for k in STRATEGY_FIELDS if k in given or k in from_file}
    options["trust_remote_code"] = values["trust_remote_code"]
    options["gpu_workers"] = values["gpu_workers"]
    manifest = run(
        directory,
        new,
        options,
        values["workers"],
        values["scheduler"],
        values["overwrite"],
        values["progress"],
        parse_options(values["storage_options"]),
    )
    click.echo(
        f"Added {', '.join(new)} groups to {len(manifest['shards'])} shard(s) in {safe_text(directory)}; "
        f"strategies now: {', '.join(manifest['params']['strategies'])}."
    )


@main.command(epilog=INSPECT_EXAMPLE)
@click.argument("directory", type=click.Path())
@click.option(
    "--strategy", default=None, help="Strategies to show, comma-separated for side by side [default: the first one]."
)
@click.option("--sample", type=int, default=0, show_default=True, help="Row number of the sample shown in colour.")
@click.option(
    "--html",
    "html",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write an HTML page highlighting many samples.",
)
@click.option("--samples", type=int, default=50, show_default=True, help="How many samples the HTML page shows.")
@click.option("--color/--no-color", default=None, help="Colour the terminal output [default: when it is a terminal].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.pass_context
@_user_errors
def inspect(ctx, directory, config_file, **opts):
    """Summarise a shard directory and show a sample's tokens coloured by group."""
    from sftgo.core.config import check_fields
    from sftgo.pipeline import inspect as inspect_mod

    values = load_config_file(config_file, inspect_mod.InspectConfig) if config_file else {}
    given = _explicit(ctx)
    values.update({k: v for k, v in opts.items() if k in given or k not in values})
    cfg = inspect_mod.InspectConfig(**values)
    check_fields(cfg)
    click.echo(inspect_mod.run(directory, cfg.strategy, cfg.sample, cfg.html, cfg.samples, cfg.color), color=cfg.color)


show_defaults(main, required=("out",))  # every option's --help says its default

if __name__ == "__main__":
    main()
