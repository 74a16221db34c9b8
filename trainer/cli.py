"""`sftgo-train`: flags (and an optional --config file) -> TrainConfig -> trainer.loop.run.

Input: command-line flags; --config FILE (JSON, TOML by .toml, YAML by .yaml/.yml; values
type-checked) whose values the flags given explicitly override.
Output: exit code 0 on success; otherwise one sentence on stderr and exit code 1 (2 for
usage errors), with the traceback only under --debug.
Cost: argument parsing, every setting's range (TrainConfig.validate) and the pre-flight checks of the
run directory and the data (trainer.preflight, without torch: a refusal takes well under a second);
the work is in trainer.loop.
"""

from __future__ import annotations

import signal
import sys

import click

from sftgo.core.clihelp import show_defaults
from sftgo.core.config import field_default, field_docs
from sftgo.core.errors import SftgoError, signals_interrupt, unexpected
from sftgo.trainer.config import CHOICES as SETTING_CHOICES
from sftgo.trainer.config import FIELDS, TrainConfig, choices, make_config, read_config_file

EXIT_BASE = 128  # a process stopped by signal N exits 128 + N, as shells report it

EXAMPLE = """\b
Example:
  sftgo-train --data out/demo/shards --out runs/go --objective sftgo --groups tfidf \\
              --lam 0.9 --max-steps 200 --batch-tokens 4096 --eval-data out/demo/eval
  sftgo-train --data out/demo/shards --out runs/go --max-steps 200 --resume
  sftgo-train --data s3://bucket/shards --out runs/go --cache-limit 2GB --max-steps 200
  torchrun --nproc_per_node 2 -m sftgo.trainer.cli --data DIR --out RUN_DIR ...
"""


DOCS = field_docs(TrainConfig)
LISTS = ("report_to",)  # comma-separated on the command line


def _help(name: str) -> str:
    """The dataclass field docstring, for --help."""
    return DOCS.get(name, "")


def opt(name: str, **kw):
    flag = "--" + name.replace("_", "-")
    default = field_default(TrainConfig, name)
    if name in LISTS:
        return click.option(flag, name, default=None, metavar="A,B", help=_help(name))
    if isinstance(default, bool) or FIELDS[name].type == "bool | None":  # None: decided at run time
        shown = "" if default is None else f" [default: {default}]"
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=_help(name) + shown)
    kw.setdefault("type", TYPES.get(name) or (type(default) if default not in (None, "") else str))
    if name in METAVARS:
        kw.setdefault("metavar", METAVARS[name])
    return click.option(
        flag,
        name,
        default=None,
        help=_help(name) + (f" [default: {default}]" if default not in (None, "", {}) else ""),
        **kw,
    )


OPTIONS = [
    "data",
    "out",
    "model",
    "eval_data",
    "storage_options",
    "cache_dir",
    "cache_limit",
    "objective",
    "groups",
    "group_weight",
    "lam",
    "lam_schedule",
    "lam_end",
    "reduce",
    "temperature",
    "dro_step",
    "batch_tokens",
    "max_length",
    "pack",
    "padding_free",
    "grad_accum",
    "shuffle_buffer",
    "readahead",
    "bucket_pool",
    "max_steps",
    "epochs",
    "stop_after",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "clip_grad",
    "skip_nonfinite",
    "seed",
    "precision",
    "ce_chunk",
    "grad_checkpointing",
    "ac_every",
    "fsdp",
    "compile",
    "lora_r",
    "lora_alpha",
    "trust_remote_code",
    "eval_every",
    "eval_batches",
    "save_every",
    "keep_checkpoints",
    "resume",
    "log_every",
    "progress",
    "tensorboard",
    "report_to",
    "save_adapter",
]
METAVARS = {"data": "DIR|URL", "out": "RUN_DIR", "eval_data": "DIR|URL", "model": "NAME", "groups": "STRATEGY"}
METAVARS.update(storage_options="JSON", cache_dir="DIR", cache_limit="SIZE")
TYPES = {"storage_options": str}  # a JSON object on the command line, a dict in a config file
CHOICES = {name: click.Choice(list(choices(name))) for name in SETTING_CHOICES}  # objectives: plug-ins too


def build_command():
    def command(**kwargs):
        debug = kwargs.pop("debug")
        config_file = kwargs.pop("config")
        cfg = None
        try:
            file_values = read_config_file(config_file) if config_file else {}
            given = {k: v for k, v in kwargs.items() if v is not None}
            for name in LISTS:
                if name in given:
                    given[name] = [s.strip() for s in given[name].split(",") if s.strip()]
            cfg = make_config(file_values, **given)
            from sftgo.trainer.preflight import check_data, check_run_dir

            check_run_dir(cfg)  # an --out that is not ours to write into is refused before torch loads,
            check_data(cfg, checksums=False)  # and so is a bad manifest or shard
            from sftgo.trainer.loop import run

            with signals_interrupt():  # SIGTERM / SIGUSR1 while loading: as Ctrl-C; the loop stops at a step boundary
                run(cfg)
        except (Exception, KeyboardInterrupt) as exc:  # one sentence unless --debug
            if debug:
                raise
            _fail(exc, cfg)

    for name in reversed(OPTIONS):
        command = opt(name, **({"type": CHOICES[name]} if name in CHOICES else {}))(command)
    command = click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=False),
        default=None,
        help="JSON, TOML or YAML file of settings (field names as in --help, dashes or underscores); flags "
        "override it.",
    )(command)
    command = click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(command)
    return click.command(
        help="Fine-tune a causal LM on sftgo shards with the SFT-GO objective (worst-group) or a baseline: "
        "sft, rho1, dft or weighted (--objective).\n\n" + EXAMPLE,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    )(command)


def _interrupted(exc: KeyboardInterrupt, cfg) -> str:
    """What an interrupted run can do next: continue from the checkpoint it saved or its last one, or start again."""
    from sftgo.trainer import checkpoint as ckpt

    saved = getattr(exc, "checkpoint", None)
    if saved is not None:
        return f"Interrupted by {exc}; saved the checkpoint {saved}: continue with --resume."

    try:
        latest = ckpt.latest_checkpoint(cfg.out) if cfg is not None else None
    except Exception:  # a damaged pointer: --resume will say what is wrong with it
        latest = None
    if latest is not None:
        return f"Interrupted; the last checkpoint ({latest.name}) is intact: continue with --resume."
    return (
        "Interrupted before the run saved a checkpoint (see --save-every), so there is nothing to continue: "
        "run the same command again to start over."
    )


def _fail(exc: Exception, cfg=None) -> None:
    from sftgo.core.text import safe_text

    if isinstance(exc, SftgoError):  # meant for the user: its message as it is
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message = _interrupted(exc, cfg)
    elif isinstance(exc, OSError):  # a file that cannot be read or written: its path and the fix
        from sftgo.core.fileio import os_error_sentence

        message = os_error_sentence(exc)
    else:
        message = unexpected(exc, "Training")
    click.echo(f"Error: {safe_text(message)}", err=True)  # paths and names may come from the data
    # a stop by a signal exits as the shell reports one (128 + its number: 130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1)
    sys.exit(EXIT_BASE + getattr(exc, "signum", signal.SIGINT) if isinstance(exc, KeyboardInterrupt) else 1)


cli = show_defaults(build_command(), required=("data", "out"))


def main(argv=None):
    return cli.main(args=argv, prog_name="sftgo-train")


if __name__ == "__main__":
    main()
