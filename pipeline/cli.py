"""`sftgo-prep`: thin click commands that turn flags into a config and call run().

Errors a user can cause print one sentence and exit 1 (2 for usage errors); --debug
shows the traceback.
"""
from __future__ import annotations

import functools
import sys

import click

from sftgo.pipeline.config import BuildConfig, load_config_file

BUILD_EXAMPLE = """
\b
Example:
  sftgo-prep build data/alpaca.jsonl data/chat.jsonl --out out/shards --eta 0.3
  sftgo-prep build train.parquet --out shards --format messages --workers 4 --rejects rejects.jsonl
  sftgo-prep build hf:tatsu-lab/alpaca --out shards --scheduler tcp://10.0.0.5:8786
"""

SCORE_EXAMPLE = """
\b
Example:
  sftgo-prep score out/shards --strategy reference
  sftgo-prep score out/shards --strategy reference --reference-mode excess --base-model HuggingFaceTB/SmolLM2-360M
  sftgo-prep score out/shards --strategy semantic --compressor-model ./llmlingua-2-checkpoint
"""

INSPECT_EXAMPLE = """
\b
Example:
  sftgo-prep inspect out/shards
  sftgo-prep inspect out/shards --sample 3 --html report.html
  sftgo-prep inspect out/shards --strategy tfidf,reference --html compare.html
"""


def _user_errors(fn):
    """Turn expected failures into one clear sentence (and a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, debug=False, **kwargs):
        from sftgo.pipeline.build import BuildError
        from sftgo.pipeline.executor import TaskError
        from sftgo.core.shards import ShardError
        from sftgo.core.models import ModelNotFound
        from sftgo.pipeline.readers import InputError

        try:
            return fn(*args, **kwargs)
        except (ValueError, BuildError, TaskError, ShardError, ModelNotFound, InputError, OSError) as exc:
            if debug:
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted; run the same command again to resume.", err=True)
            sys.exit(130)

    return click.option("--debug", is_flag=True, help="Show full tracebacks.")(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option("0.1.0", prog_name="sftgo-prep")
def main():
    """Prepare instruction data for SFT-GO: tokenize with the chat template, score every
    token's importance and write group masks as columns of Parquet shards."""


def _strategy_options(fn):
    """Options of the importance strategies, shared by `build` and `score`."""
    options = [
        click.option("--eta", type=float, default=0.3, show_default=True,
                     help="Fraction of each sample's response tokens in the important group."),
        click.option("--reference-model", default=None, help="Reference LM of `reference` [default: embedded SmolLM2]."),
        click.option("--reference-mode", type=click.Choice(["loss", "excess"]), default="loss", show_default=True,
                     help="loss: the reference LM's token loss; excess: base loss - reference loss (Rho-1)."),
        click.option("--base-model", default=None, help="Base LM for --reference-mode excess."),
        click.option("--score-batch-tokens", type=int, default=8192, show_default=True,
                     help="Token budget of one no-grad forward batch (reference/semantic)."),
        click.option("--compressor-model", default=None,
                     help="LLMLingua-2-compatible checkpoint for `semantic` [default: MiniLM embedding occlusion]."),
        click.option("--workers", type=int, default=2, show_default=True, help="Processes of the local Dask cluster."),
        click.option("--scheduler", default=None, help="Address of an existing Dask scheduler (instead of a local cluster)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing build / recompute existing groups."),
        click.option("--trust-remote-code", is_flag=True, help="Allow custom tokenizer/model code from the hub."),
        click.option("--quiet", is_flag=True, help="No progress output."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


STRATEGY_FIELDS = ("eta", "reference_model", "reference_mode", "base_model", "score_batch_tokens", "compressor_model")


def _explicit(ctx: click.Context) -> set[str]:
    """Names of the options the user actually typed (so they override the config file)."""
    return {k for k in ctx.params if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}


@main.command(epilog=BUILD_EXAMPLE)
@click.argument("inputs", nargs=-1)
@click.option("--out", help="Output directory for shards and manifest.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON or TOML file of options; flags override it.")
@click.option("--strategy", default="tfidf", show_default=True, help="Importance strategies, comma-separated: tfidf, reference, semantic.")
@click.option("--num-groups", type=int, default=2, show_default=True, help="2 = top-eta vs rest; K > 2 = K rank quantiles.")
@click.option("--tokenizer", default=None, help="Hub id, local dir or .gguf file [default: embedded SmolLM2-135M-Instruct].")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "alpaca", "messages", "sharegpt", "prompt_completion"]), help="Record format.")
@click.option("--field-map", default="", help="Rename fields, e.g. 'instruction=question,output=answer'.")
@click.option("--split", default="train", show_default=True, help="Split of a hub dataset or DatasetDict folder.")
@click.option("--max-length", type=int, default=2048, show_default=True, help="Longest sample in tokens.")
@click.option("--overflow", type=click.Choice(["truncate", "drop"]), default="truncate", show_default=True,
              help="Longer samples are truncated or dropped (counted as rejected).")
@click.option("--tfidf-unit", type=click.Choice(["word", "token"]), default="word", show_default=True,
              help="TF-IDF over words of the response or over token ids.")
@click.option("--rows-per-shard", type=int, default=5000, show_default=True, help="Records per partition / output shard.")
@click.option("--rejects", default=None, type=click.Path(dir_okay=False), help="Write rejected records with reasons to this JSONL file.")
@_strategy_options
@click.pass_context
@_user_errors
def build(ctx, inputs, config_file, **opts):
    """Build shards from INPUTS (JSONL, JSON, Parquet, CSV, datasets folders, hf:NAME)."""
    from sftgo.pipeline.build import run
    from sftgo.pipeline.formats import parse_field_map

    values = load_config_file(config_file, BuildConfig.__dataclass_fields__) if config_file else {}
    given = _explicit(ctx)
    flags = {
        "inputs": list(inputs),
        "out": opts["out"],
        "strategies": [s.strip() for s in opts["strategy"].split(",") if s.strip()],
        **{k: opts[k] for k in STRATEGY_FIELDS},
        "num_groups": opts["num_groups"],
        "tokenizer": opts["tokenizer"],
        "format": opts["fmt"],
        "field_map": parse_field_map(opts["field_map"]) if opts["field_map"] else {},
        "split": opts["split"],
        "max_length": opts["max_length"],
        "overflow": opts["overflow"],
        "tfidf_unit": opts["tfidf_unit"],
        "rows_per_shard": opts["rows_per_shard"],
        "workers": opts["workers"],
        "scheduler": opts["scheduler"],
        "rejects": opts["rejects"],
        "overwrite": opts["overwrite"],
        "trust_remote_code": opts["trust_remote_code"],
        "progress": not opts["quiet"],
    }
    source = {"inputs": "inputs", "strategies": "strategy", "format": "fmt", "progress": "quiet"}
    for key, value in flags.items():
        if key not in values or source.get(key, key) in given:
            values[key] = value
    manifest = run(BuildConfig(**values))
    t = manifest["totals"]
    click.echo(
        f"Wrote {t['records_written']} records ({t['tokens']} tokens, {t['loss_tokens']} supervised) "
        f"in {len(manifest['shards'])} shard(s) to {values['out']}; rejected {t['records_rejected']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in manifest['rejected'].items())})" if t["records_rejected"] else "")
        + "."
    )


@main.command(epilog=SCORE_EXAMPLE)
@click.argument("directory", type=click.Path())
@click.option("--strategy", required=True, help="Strategies to add, comma-separated: tfidf, reference, semantic.")
@_strategy_options
@click.pass_context
@_user_errors
def score(ctx, directory, strategy, **opts):
    """Add a strategy's importance and group columns to an existing build (no re-tokenizing)."""
    from sftgo.pipeline.config import STRATEGIES
    from sftgo.pipeline.score import run

    new = [s.strip() for s in strategy.split(",") if s.strip()]
    unknown = [s for s in new if s not in STRATEGIES]
    if unknown or not new:
        raise ValueError(f"Unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(STRATEGIES)}.")
    given = _explicit(ctx)
    options = {k: opts[k] for k in STRATEGY_FIELDS if k in given or k != "eta"}
    options["trust_remote_code"] = opts["trust_remote_code"]
    if options.get("reference_mode") == "excess" and not options.get("base_model"):
        raise ValueError("--reference-mode excess needs --base-model (score = base loss - reference loss).")
    manifest = run(directory, new, options, opts["workers"], opts["scheduler"], opts["overwrite"], not opts["quiet"])
    click.echo(f"Added {', '.join(new)} groups to {len(manifest['shards'])} shard(s) in {directory}; "
               f"strategies now: {', '.join(manifest['params']['strategies'])}.")


@main.command(epilog=INSPECT_EXAMPLE)
@click.argument("directory", type=click.Path())
@click.option("--strategy", default=None, help="Strategies to show, comma-separated for side by side [default: the first one].")
@click.option("--sample", type=int, default=0, show_default=True, help="Row number of the sample shown in colour.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None, help="Also write an HTML page highlighting many samples.")
@click.option("--samples", type=int, default=50, show_default=True, help="How many samples the HTML page shows.")
@click.option("--color/--no-color", default=None, help="Colour the terminal output [default: when it is a terminal].")
@_user_errors
def inspect(directory, strategy, sample, html_path, samples, color):
    """Summarise a shard directory and show a sample's tokens coloured by group."""
    from sftgo.pipeline import inspect as inspect_mod

    click.echo(inspect_mod.run(directory, strategy, sample, html_path, samples, color), color=color)


if __name__ == "__main__":
    main()
