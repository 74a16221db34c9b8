"""Training metrics: JSONL lines, TensorBoard scalars, the loss-curve PNG and the summary table.

Input: one dict per logged step (train) or evaluation (eval), rank 0 only.
Output: RUN_DIR/metrics.jsonl (one JSON object per line, NaN written as null),
RUN_DIR/loss_curves.png, RUN_DIR/tb/ (when tensorboard is installed: a defaulted TensorBoard
without the package is said once on stderr; an explicit --tensorboard without it is an error),
a printed table.
Cost: a line write per step; the PNG and table once at the end.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

from sftgo.trainer.config import ConfigError


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensorboard_enabled(wanted: bool | None, say: bool = True) -> bool:
    """Whether to write TensorBoard logs. wanted=None (the default) means "when installed", and
    says once on stderr (when `say`) that it is not; wanted=True without the package is an error."""
    have = importlib.util.find_spec("tensorboard") is not None
    if wanted and not have:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard, or pass --no-tensorboard.")
    if wanted is None and not have and say:
        print("Note: tensorboard is not installed, so no TensorBoard logs are written (metrics.jsonl and "
              "loss_curves.png are); pip install tensorboard, or pass --no-tensorboard to silence this note.",
              file=sys.stderr, flush=True)
    return have and wanted is not False


class MetricsLog:
    """Appends records to metrics.jsonl; on resume drops records past the resumed step
    (written after the checkpoint by the run that died), so the file has each step once."""

    def __init__(self, out, resume_step: int | None, tensorboard: bool):
        self.path = Path(out) / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.fh = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:  # trainer.metrics.tensorboard_enabled decided it is installed
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tb"))

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(_clean(record)) + "\n")
        self.fh.flush()
        if self.tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "split") and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, record["step"])
            for g, value in enumerate(record.get("group_loss", [])):
                if value is not None and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/group_{g}_loss", value, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _smooth(values, window):
    """Trailing mean over the last `window` defined values (no lag at the start, unlike an EMA)."""
    out, recent = [], []
    for v in values:
        if v is not None:
            recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


def plot_curves(records: list[dict], path, title: str = "") -> None:
    """Per-group loss per step (train: raw faint + EMA; eval: markers) and λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    k = max((len(r.get("group_loss", [])) for r in records), default=0)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = [r["step"] for r in train]
    window = max(1, len(train) // 10)
    nan = lambda ys: [float("nan") if y is None else y for y in ys]  # noqa: E731
    for g in range(k):
        c = colors[g % len(colors)]
        ys = [r["group_loss"][g] if g < len(r.get("group_loss", [])) else None for r in train]
        if window > 1:
            ax.plot(steps, nan(ys), color=c, alpha=0.25, lw=1)
        ax.plot(steps, nan(_smooth(ys, window)), color=c, lw=2,
                label=f"group {g} (train" + (f", mean of {window})" if window > 1 else ")"))
        ev = [(r["step"], r["group_loss"][g]) for r in evals if g < len(r.get("group_loss", [])) and r["group_loss"][g] is not None]
        if ev:
            ax.plot(*zip(*ev), "o--", color=c, ms=5, label=f"group {g} (eval)")
    if train:
        ax.plot(steps, nan(_smooth([r["ce"] for r in train], window)), color="black", lw=1, ls=":", label="CE (train)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "per-group loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_table(records: list[dict]) -> str:
    """First vs last train (and eval) values: loss, CE, worst term and each group's loss."""
    lines = []
    for split in ("train", "eval"):
        rs = [r for r in records if r.get("split", "train") == split]
        if not rs:
            continue
        first, last = rs[0], rs[-1]
        k = len(last.get("group_loss", []))
        rows = [("loss", "loss"), ("ce", "ce"), ("worst", "worst")] + [(f"group {g}", g) for g in range(k)]
        lines.append(f"{split:<10} {'step ' + str(first['step']):>12} {'step ' + str(last['step']):>12}")
        for label, key in rows:
            a = first["group_loss"][key] if isinstance(key, int) else first.get(key)
            b = last["group_loss"][key] if isinstance(key, int) else last.get(key)
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"  {label:<8} {fmt(a):>12} {fmt(b):>12}")
        if split == "train":
            lines.append(f"  worst-group switches: {last.get('worst_switches', 0)}; "
                         f"tokens/s (last): {last.get('tokens_per_s', 0):.0f}")
    return "\n".join(lines)
