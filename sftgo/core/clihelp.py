"""Command-line help that says every option's default.

Input: a click command or group, built.
Output: the same command, each option's help ending in its default: click's own `[default: X]` where it shows one,
or the help's own words on it, else `[default: none]` (an optional value left out), `[default: off]` (a
flag), or `[required]`.
Cost: one pass over the options when the CLI module is imported.
"""

from __future__ import annotations

import click


def show_defaults(command: click.Command, required: tuple[str, ...] = ()) -> click.Command:
    """Complete the help of every option of `command` and its subcommands (`required`: options the command
    refuses to run without, checked by the config rather than by click)."""
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        ctx = click.Context(cmd)
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden or p.name == "help":
                continue
            shown = (p.get_help_record(ctx) or ("", ""))[1].lower()
            if "default" in shown or "[required" in shown:  # click's [default: X], or the text says it
                continue
            if p.required or p.name in required:
                tail = "[required]"
            elif p.is_flag and not p.secondary_opts:
                tail = "[default: off]"
            else:
                tail = "[default: none]"
            p.help = f"{(p.help or '').rstrip()} {tail}".strip()
    return command
