"""Training metrics: JSONL lines, TensorBoard scalars, the loss-curve PNG and the summary table.

Input: one dict per logged step (train) or evaluation (eval), rank 0 only.
Output: RUN_DIR/metrics.jsonl (one JSON object per line, NaN written as null),
RUN_DIR/loss_curves.png, RUN_DIR/tb/ (when tensorboard is installed: a defaulted TensorBoard
without the package is said once on stderr; an explicit --tensorboard without it is an error),
the same scalars to each tracker of --report-to (tensorboard, wandb, mlflow; one not installed is
an error before training starts), a printed table.
Cost: a line write per step; the PNG and table once at the end.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

from sftgo.core.fileio import atomic_write, atomic_write_text
from sftgo.trainer.config import TRACKERS, ConfigError  # TRACKERS: --report-to name -> package


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
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard, or pass --no-tensorboard."
        )
    if wanted is None and not have and say:
        print(
            "Note: tensorboard is not installed, so no TensorBoard logs are written (metrics.jsonl and "
            "loss_curves.png are); pip install tensorboard, or pass --no-tensorboard to silence this note.",
            file=sys.stderr,
            flush=True,
        )
    return have and wanted is not False


def check_trackers(names: list[str]) -> None:
    """--report-to: every name known and its package installed (one sentence otherwise)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name!r} is not a tracker sftgo knows; choose from {', '.join(TRACKERS)}.")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"--report-to {name} needs the {TRACKERS[name]} package: pip install 'sftgo[{name}]' "
                f"(or pip install {TRACKERS[name]})."
            )


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record, as split/name (group losses as split/group_G_loss)."""
    split = record.get("split", "train")
    out = {
        f"{split}/{k}": float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split") and math.isfinite(v)
    }
    for g, value in enumerate(record.get("group_loss", [])):
        if value is not None and math.isfinite(value):
            out[f"{split}/group_{g}_loss"] = float(value)
    return out


class _TensorBoard:
    def __init__(self, out: Path, config: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # on resume, what the run that died wrote past its checkpoint is purged (TensorBoard hides it), as in
        # metrics.jsonl: each step shows once
        self.writer = SummaryWriter(str(out / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, config: dict, resume_step: int | None):
        import os

        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "sftgo"), dir=str(out), config=config, name=out.name, resume="allow"
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, config: dict, resume_step: int | None):
        import os

        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local store in the run directory (no server, no database)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        mlflow.start_run(run_name=out.name)
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in config.items()})

    def log(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_TRACKER_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _resumed_records(path: Path) -> list[dict]:
    """metrics.jsonl of the run being resumed.  Its last line may have been cut by the kill (or a full
    disk) that stopped the run: that record is dropped with a note (it is past the checkpoint, which is
    written after it).  Any other line that is not one of our records is an error."""
    lines = (
        [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        if path.is_file()
        else []
    )
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            records.append(record)
        elif i == len(lines):
            print(
                f"Note: the last line of {path} is not a whole record (the run was cut off while writing it); "
                "it is dropped.",
                file=sys.stderr,
                flush=True,
            )
        else:
            raise ConfigError(
                f"{path} line {i} is not a metrics record of sftgo-train: the file was edited or "
                "damaged; repair or remove that line to resume."
            )
    return records


class MetricsLog:
    """Appends records to metrics.jsonl; on resume drops records past the resumed step
    (written after the checkpoint by the run that died), so the file has each step once."""

    def __init__(
        self,
        out,
        resume_step: int | None,
        tensorboard: bool,
        report_to: tuple[str, ...] = (),
        config: dict | None = None,
    ):
        self.path = Path(out) / "metrics.jsonl"
        if resume_step is None:
            atomic_write_text(self.path, "")  # a new file: never written through a link or into a FIFO
        else:  # replaced whole: a kill in the middle never loses the history
            kept = [r for r in _resumed_records(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.fh = open(self.path, "a", encoding="utf-8")
        names = list(dict.fromkeys([*report_to] + (["tensorboard"] if tensorboard else [])))
        self.trackers = [_TRACKER_CLASSES[n](Path(out), config or {}, resume_step) for n in names]

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(_clean(record)) + "\n")
        self.fh.flush()
        values = scalars(record) if self.trackers else {}
        for tracker in self.trackers:
            tracker.log(values, record["step"])

    def close(self) -> None:
        """Flushes and closes the file and every tracker; closing again does nothing."""
        self.fh.close()
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


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
        ax.plot(
            steps,
            nan(_smooth(ys, window)),
            color=c,
            lw=2,
            label=f"group {g} (train" + (f", mean of {window})" if window > 1 else ")"),
        )
        ev = [
            (r["step"], r["group_loss"][g])
            for r in evals
            if g < len(r.get("group_loss", [])) and r["group_loss"][g] is not None
        ]
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def summary_table(records: list[dict]) -> str:
    """First vs last train (and eval) values: loss, CE, worst term and each group's loss."""
    lines = []
    for split in ("train", "eval"):
        rs = [r for r in records if r.get("split", "train") == split]
        if not rs:
            continue
        first, last = rs[0], rs[-1]
        k = max(len(first.get("group_loss") or []), len(last.get("group_loss") or []))  # they may differ
        rows = [("loss", "loss"), ("ce", "ce"), ("worst", "worst")] + [(f"group {g}", g) for g in range(k)]
        lines.append(f"{split:<10} {'step ' + str(first['step']):>12} {'step ' + str(last['step']):>12}")

        def value(rec, key):
            if isinstance(key, int):
                groups = rec.get("group_loss") or []
                return groups[key] if key < len(groups) else None
            return rec.get(key)

        for label, key in rows:
            a, b = value(first, key), value(last, key)
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"  {label:<8} {fmt(a):>12} {fmt(b):>12}")
        if split == "train":
            lines.append(
                f"  worst-group switches: {last.get('worst_switches', 0)}; "
                f"tokens/s (last): {last.get('tokens_per_s', 0):.0f}"
            )
    return "\n".join(lines)
