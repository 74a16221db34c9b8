"""`sftgo-prep inspect`: what is in a shard directory, as text and optionally HTML.

Input: a finished build directory (manifest.json + shards), or its URL on a store; the manifest and the shards are
untrusted (hand-edited, damaged or foreign): they are verified (checksums and schema, as the
trainer does) before anything is shown, and every piece of text taken from them (token pieces,
ids, strategy names, rejection reasons, manifest values, paths) is printed with its control and
other non-printing characters escaped (`\\x1b`, `\\u202e`), so only our own colour codes reach
the terminal raw.
Output: a text report -- records, tokens, supervised tokens, group fractions per
strategy, how much strategies agree (Jaccard of their important tokens), rejects by
reason, a histogram of sample lengths, one sample's tokens coloured by group for each
strategy shown -- and, with --html, a page highlighting many samples' tokens, the
strategies side by side (hover a token for its group and importance score).
Cost: reads every shard once to verify its checksum (sha256 at disk speed), then the group
and length columns of every shard (column projection); decodes only the samples shown
(the tokenizer named in the manifest is loaded).
"""

from __future__ import annotations

import html
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sftgo.core import models
from sftgo.core.fileio import atomic_write_text, check_writable, output_target, overlap
from sftgo.core.locks import LOCK, shared
from sftgo.core.shards import (
    MANIFEST,
    ShardError,
    group_column,
    importance_column,
    read_manifest,
    strategy_order,
    verify_build,
)
from sftgo.core.storage import is_remote, is_url, local_path
from sftgo.core.text import safe_text as printable
from sftgo.grouping import registry

ANSI = {-1: "\x1b[2m", 0: "\x1b[36m", 1: "\x1b[1;30;43m"}
RESET = "\x1b[0m"
HTML_COLORS = {-1: "color:#8a8a8a", 0: "background:#dbeafe", 1: "background:#f59e0b;font-weight:600"}
TOKEN_TEXT = "\n\t"  # the only non-printing characters a sample's token text keeps raw


def _group_style(table: dict, g: int, k: int):
    if k > 2 and g >= 0:  # K quantile groups: highest group brightest
        return table[1] if g == k - 1 else table[0]
    return table.get(g, table[0])


def _histogram(lengths: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    if not len(lengths):
        return ["  (no samples)"]
    counts, edges = np.histogram(lengths, bins=bins)
    top = counts.max() or 1
    return [
        f"  {int(edges[i]):>6}-{int(edges[i + 1]):<6} {'#' * int(round(width * c / top)):<{width}} {c}"
        for i, c in enumerate(counts)
    ]


def _load_rows(directory: Path, manifest: dict, columns: list[str], start: int, count: int) -> list[dict]:
    rows, seen = [], 0
    for shard in manifest["shards"]:
        n = shard["rows"]
        if seen + n > start and len(rows) < count:
            table = pq.read_table(directory / shard["path"], columns=columns)
            lo = max(0, start - seen)
            rows.extend(table.slice(lo, count - len(rows)).to_pylist())
        seen += n
    return rows


def _token_pieces(tok, ids: list[int]) -> list[str]:
    return [printable(tok.decode([i]), keep=TOKEN_TEXT) for i in ids]


def _top(k: int) -> int:
    return k - 1 if k > 2 else 1


def summary(directory: Path, manifest: dict, shown: list[str]) -> list[str]:
    t = manifest["totals"]
    strategies = strategy_order(manifest)
    lines = [
        f"Shards:       {printable(directory)}  ({len(manifest['shards'])} file(s), "
        f"tokenizer {printable(manifest['tokenizer']['name'])})",
        f"Records:      {t['records_written']} written of {t['records_in']} read, {t['records_rejected']} rejected, "
        f"{t.get('truncated', 0)} truncated",
        f"Tokens:       {t['tokens']} total, {t['loss_tokens']} supervised "
        f"({100.0 * t['loss_tokens'] / max(t['tokens'], 1):.1f}%)",
    ]
    if manifest.get("rejected"):
        lines.append("Rejected by reason:")
        lines += [f"  {printable(reason):<24} {n}" for reason, n in manifest["rejected"].items()]
    tops = {s: _top(manifest["strategies"][s].get("num_groups", 2)) for s in strategies}
    pairs = [(a, b) for i, a in enumerate(strategies) for b in strategies[i + 1 :]]
    lengths, counts = [], {s: np.zeros(0, dtype=np.int64) for s in strategies}
    agree = {p: [0, 0] for p in pairs}  # |A and B|, |A or B| over important tokens
    for shard in manifest["shards"]:
        table = pq.read_table(directory / shard["path"], columns=["num_tokens"] + [group_column(s) for s in strategies])
        lengths.append(table["num_tokens"].to_numpy())
        groups = {s: table[group_column(s)].combine_chunks().flatten().to_numpy().astype(np.int64) for s in strategies}
        for s, g in groups.items():
            c = np.bincount(g[g >= 0]) if (g >= 0).any() else np.zeros(0, dtype=np.int64)
            size = max(len(c), len(counts[s]))
            counts[s] = np.pad(counts[s], (0, size - len(counts[s]))) + np.pad(c, (0, size - len(c)))
        for a, b in pairs:
            ia, ib = groups[a] == tops[a], groups[b] == tops[b]
            agree[(a, b)][0] += int((ia & ib).sum())
            agree[(a, b)][1] += int((ia | ib).sum())
    for s in strategies:
        total = counts[s].sum() or 1
        fracs = ", ".join(f"group {g}: {100.0 * n / total:.1f}%" for g, n in enumerate(counts[s]))
        eta = printable(manifest["strategies"][s].get("eta"))
        lines.append(f"Groups [{printable(s)}] (eta={eta}, of supervised tokens): {fracs or 'none'}")
    for (a, b), (inter, union) in agree.items():
        lines.append(
            f"Agreement {printable(a)} vs {printable(b)}: Jaccard of the important tokens {inter / max(union, 1):.3f}"
        )
    lines.append("Sample length (tokens):")
    lines += _histogram(np.concatenate(lengths) if lengths else np.zeros(0))
    return lines


def colour_sample(tok, row: dict, strategy: str, k: int, color: bool) -> str:
    out = []
    for piece, g in zip(_token_pieces(tok, row["input_ids"]), row[group_column(strategy)]):
        if color:
            out.append(f"{_group_style(ANSI, g, k)}{piece}{RESET}")
        else:  # plain text: mark important tokens with [[...]] and prompt tokens stay bare
            out.append(f"[[{piece}]]" if g == _top(k) else piece)
    return "".join(out)


def _html_tokens(pieces: list[str], row: dict, strategy: str, k: int) -> str:
    spans = []
    name = html.escape(printable(strategy))
    for piece, g, score in zip(pieces, row[group_column(strategy)], row[importance_column(strategy)]):
        style = _group_style(HTML_COLORS, g, k)
        spans.append(f"<span style='{style}' title='{name}: group {g}, score {score:.4f}'>{html.escape(piece)}</span>")
    return f"<div class='s'>{''.join(spans)}</div>"


def html_page(tok, rows: list[dict], shown: list[str], ks: dict, title: str) -> str:
    title = html.escape(printable(title))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{title}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em}",
        ".s{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;border:1px solid #ddd;"
        "padding:.8em;margin:.3em 0 1.2em;border-radius:6px;line-height:1.6}",
        f".row{{display:grid;grid-template-columns:repeat({len(shown)},minmax(0,1fr));gap:1em}}",
        ".legend span{padding:0 .4em;margin-right:1em}",
        "</style></head><body>",
        f"<h1>{title}</h1>",
        "<p class='legend'>"
        + f"<span style='{HTML_COLORS[-1]}'>prompt / not supervised</span>"
        + f"<span style='{HTML_COLORS[0]}'>rest</span>"
        + f"<span style='{HTML_COLORS[1]}'>important (top group)</span> "
        + "Hover a token for its group and importance score.</p>",
    ]
    for row in rows:
        pieces = _token_pieces(tok, row["input_ids"])
        parts.append(
            f"<h3>{html.escape(printable(row['id']))} <small>({len(pieces)} tokens)</small></h3><div class='row'>"
        )
        for s in shown:
            parts.append(f"<div><b>{html.escape(printable(s))}</b>{_html_tokens(pieces, row, s, ks[s])}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _verified(path: Path, strategy: str | None) -> tuple[dict, list[str], int]:
    """(manifest, strategies shown, rows): the manifest type-checked and checked against every shard
    (core.shards.verify_build: counts, checksums, schema of every strategy, row counts) before a byte
    of it is shown."""
    manifest = read_manifest(path)
    have = strategy_order(manifest)
    shown = [s.strip() for s in strategy.split(",")] if strategy else have[:1]
    for s in shown:
        if s not in have:
            raise ShardError(f"{path} has no '{s}' groups (it has: {', '.join(have) or 'none'}).")
    verify_build(path, manifest)
    return manifest, shown, manifest["totals"]["records_written"]


def _build_owns(path: Path, manifest: dict, target: Path) -> str | None:
    """The name of what of the build in `path` the file `target` is (resolved through symlinks), or
    None: the folder itself, the manifest, the lock, shards, artifacts, the work folders and
    temporaries (hidden names)."""
    home, target = path.resolve(), target.resolve()
    if target == home:
        return "the build directory"
    if home not in target.parents:
        return None
    name = target.relative_to(home).parts[0]
    artifacts = set(registry.artifacts_of(registry.names())) | {
        a["path"] for e in manifest["strategies"].values() for a in e.values() if isinstance(a, dict) and "path" in a
    }
    owned = {MANIFEST, LOCK} | {s["path"] for s in manifest["shards"]} | artifacts
    if name in owned or name.startswith(".") or (name.startswith("shard-") and name.endswith(".parquet")):
        return name
    return None


def _check_html(path: Path, manifest: dict, html_path: str | None) -> None:
    """Refuse an --html path that is (or leads through symlinks to) a file or folder of the build, or that
    sftgo could not write (core.fileio.output_target: a file, a FIFO, a character device or a link to one)."""
    if not html_path:
        return
    owned = _build_owns(path, manifest, Path(html_path))
    if owned:
        raise ShardError(
            f"--html {html_path} points at {owned}, which the build in {path} owns; write the page elsewhere."
        )
    if overlap(html_path, path):  # an output inside the folder it reads: the next build would take it for data
        raise ShardError(f"--html {html_path} lies inside the build {path} it reports on; write the page elsewhere.")
    where, direct = output_target(html_path, "--html", stream=True, follow=True)
    if not direct:
        check_writable(where, "--html")


def _check_request(sample: int, samples: int, rows: int) -> None:
    if samples < 0:
        raise ShardError(f"--samples {samples} is negative; give how many samples the HTML page shows.")
    if rows == 0 and sample != 0:
        raise ShardError(f"--sample {sample} is out of range: the build has no records.")
    if rows and not 0 <= sample < rows:
        raise ShardError(f"--sample {sample} is out of range: the build has {rows} records (0 to {rows - 1}).")


@dataclass
class InspectConfig:
    """The settings of `sftgo-prep inspect` (what its --config file may set)."""

    strategy: str | None = None
    """Strategies to show, comma-separated for side by side; None = the first one."""
    sample: int = 0
    """Row number of the sample shown in colour."""
    html: str | None = None
    """Also write an HTML page highlighting many samples, to this file."""
    samples: int = 50
    """How many samples the HTML page shows."""
    color: bool | None = None
    """Colour the terminal output; None = when it is a terminal."""


def run(
    directory: str,
    strategy: str | None = None,
    sample: int = 0,
    html_path: str | None = None,
    samples: int = 50,
    color: bool | None = None,
) -> str:
    """Text report; `strategy` names one or more (comma-separated) strategies to show side by side.
    Errors are a ShardError of one sentence, its data-derived text escaped like the report.  A build on a store
    (`directory` a URL: s3://...; credentials from the backend's environment) is read-only: it is copied to a
    temporary folder (each shard checked against its sha256 as it arrives), reported as the URL and removed; a
    store has no lock, so only what its manifest names is read.  The --html page is always a local file."""
    if is_remote(directory):
        return _remote_report(directory, strategy, sample, html_path, samples, color)
    try:
        folder = local_path(directory)  # (a file:// URL: its path)
        with shared(folder, "report"):  # no build or score rewrites the shards while they are read
            return _report(folder, strategy, sample, html_path, samples, color)
    except ShardError as exc:  # messages quote paths and names from the manifest and the command line
        raise ShardError(printable(exc)) from exc


def _remote_report(url: str, strategy, sample, html_path, samples, color) -> str:
    """run() for a build on a store: the report of a verified temporary copy, naming the URL."""
    from sftgo.core.remote import fetch_build

    if html_path and is_url(html_path):
        raise ShardError(f"--html {html_path} is a URL; the page is written to a local file: give a local path.")
    with tempfile.TemporaryDirectory(prefix="sftgo-inspect-") as tmp:
        local = Path(tmp) / "build"
        try:
            fetch_build(url, local)
            return _report(local, strategy, sample, html_path, samples, color).replace(str(local), url)
        except ShardError as exc:
            raise ShardError(printable(str(exc).replace(str(local), url))) from exc


def _report(
    path: Path, strategy: str | None, sample: int, html_path: str | None, samples: int, color: bool | None
) -> str:
    manifest, shown, rows = _verified(path, strategy)
    _check_request(sample, samples, rows)
    _check_html(path, manifest, html_path)
    lines = summary(path, manifest, shown)
    if not shown:
        return "\n".join(lines)
    if not rows:
        lines += ["", "No records to show: the build wrote 0 records."]
    if color is None:
        color = sys.stdout.isatty()
    ks = {s: manifest["strategies"][s].get("num_groups", 2) for s in shown}
    tok, _ = models.load_build_tokenizer(manifest["tokenizer"]["name"])  # without torch where it encodes alike
    if models.tokenizer_fingerprint(tok) != manifest["tokenizer"]["fingerprint"]:
        raise ShardError(
            f"The tokenizer {manifest['tokenizer']['name']!r} available here differs from the one that built {path}."
        )
    columns = ["id", "input_ids"] + [c(s) for s in shown for c in (group_column, importance_column)]
    if rows:
        row = _load_rows(path, manifest, columns, sample, 1)[0]
        legend = "important" if not color else f"{ANSI[1]}important{RESET} {ANSI[0]}rest{RESET} {ANSI[-1]}prompt{RESET}"
        for s in shown:
            lines += [
                "",
                f"Sample {sample} ({printable(row['id'])}), groups by {printable(s)} [{legend}]:",
                colour_sample(tok, row, s, ks[s], color),
            ]
    if html_path:
        page_rows = _load_rows(path, manifest, columns, 0, samples)
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        page = html_page(tok, page_rows, shown, ks, f"sftgo shards: {path} ({', '.join(shown)})")
        atomic_write_text(html_path, page, "--html", stream=True, follow=True)
        lines.append(f"\nWrote {printable(html_path)} ({len(page_rows)} samples).")
    return "\n".join(lines)
