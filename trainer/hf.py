"""SFT-GO inside the Hugging Face stack: shards as a `datasets.Dataset`, a collator that keeps the
groups aligned with the labels, and `SFTGOTrainer`, a `transformers.Trainer` with the objectives of
`sftgo-train` (the same `trainer.step.objective_parts`, the same accumulated-batch denominators).

Input: a shard directory of `sftgo-prep build` (checked: manifest paths, checksums, schema, group ids
against the declared number of groups), a causal LM, and the usual `TrainingArguments`.
Output: `load_shards` -> datasets.Dataset with id, input_ids, loss_mask, group_<s>, whose
info.description records the shards' groups (SFTGOTrainer takes K from there and checks it);
`SFTGOCollator` -> (every row checked: loss_mask 0/1, a group exactly on trained tokens) dict of
input_ids, attention_mask (or position_ids when packing), labels (unshifted, HF convention: the
model predicts labels[t + 1] at position t), sftgo_groups (the group of each label, -1 where the
label is -100) and sftgo_segments (the sample of each label);
`SFTGOTrainer` -> the usual Trainer with loss = the chosen objective.
Cost: the model's forward (full logits, as the Trainer's own loss) plus O(tokens) bookkeeping; the
denominators of one optimizer step are counted once per step over its micro-batches and, under
DDP / accelerate / FSDP, summed over processes (one all-reduce of K + 2 numbers).

Denominators: `get_batch_samples` (called by Trainer once per optimizer step with all the step's
micro-batches) counts supervised tokens, supervised samples and tokens per group over those
micro-batches and all processes; every micro-batch's loss is divided by them, so the accumulated
gradient is the gradient of the whole step's loss, exactly as `sftgo-train --grad-accum N`.
Because gradients are averaged over processes by DDP, the loss is multiplied by the number of
processes (what Trainer itself does with `average_tokens_across_devices`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from sftgo.core import storage
from sftgo.core.errors import TrainingError
from sftgo.core.locks import shared
from sftgo.core.models import tokenizer_fingerprint
from sftgo.core.shards import (
    GROUP_PREFIX,
    ShardError,
    check_tokenizer,
    group_column,
    member_path,
    read_manifest,
    verify_shards,
)
from sftgo.trainer import registry
from sftgo.trainer.batching import IGNORE
from sftgo.trainer.config import ConfigError, TrainConfig, check_number, ignored_settings
from sftgo.trainer.data import check_tokens
from sftgo.trainer.objectives import lam_at
from sftgo.trainer.preflight import empty_group_message, group_id_range
from sftgo.trainer.preflight import num_groups as declared_groups
from sftgo.trainer.step import Counts, Objective, denominators, objective_parts

EXTRA = ("sftgo_groups", "sftgo_segments")
SHARDS_INFO = "sftgo-shards: "  # load_shards' line in the dataset's info.description (kept by select, map, ...)


def load_shards(
    directory: str, groups: str | None = "tfidf", verify: bool = True, tokenizer=None, storage_options=None
):
    """The shards of `directory` (a folder, or a build's URL on a store: s3://..., with `storage_options`) as a
    datasets.Dataset (columns id, input_ids, loss_mask and, with `groups`, group_<groups>), in manifest order;
    checked like sftgo-train checks them.  With `tokenizer` (the model's), shards tokenized with another vocabulary
    are refused.  A store's build is first copied to a temporary folder (each shard checked against its sha256 as
    it arrives; no lock: a store has none, so only what the manifest names is read), removed once loaded."""
    if not isinstance(directory, (str, Path)) or (groups is not None and not isinstance(groups, str)):
        raise ConfigError(f"load_shards takes a directory and a strategy name, not {directory!r} and {groups!r}.")
    if storage.is_remote(directory):
        from sftgo.core.remote import fetch_build

        options = storage.parse_options(storage_options, "storage_options")
        with tempfile.TemporaryDirectory(prefix="sftgo-load-") as tmp:
            local = fetch_build(str(directory), Path(tmp) / "build", options)
            return _load_local(local, groups, verify, tokenizer, label=str(directory))
    if storage_options:
        raise ConfigError(f"load_shards got storage_options, but {directory} is a local folder, not a store URL.")
    return _load_local(storage.local_path(directory), groups, verify, tokenizer, label=str(directory))


def _load_local(directory, groups, verify, tokenizer, label):
    import datasets

    with shared(Path(directory), "load_shards"):  # no build or score rewrites them while they are read and copied
        manifest = read_manifest(directory)
        if tokenizer is not None:
            check_tokenizer(directory, manifest, tokenizer_fingerprint(tokenizer))
        if verify:
            verify_shards(directory, manifest, strategies=(groups,) if groups else (), checksums=True)
        files = [str(member_path(directory, s["path"])) for s in manifest["shards"]]
        columns = ["id", "input_ids", "loss_mask"] + ([group_column(groups)] if groups else [])
        info = None
        if groups:  # SFTGOTrainer takes the number of groups from here (and checks what it is given against it)
            info = {
                "data": label,
                "groups": groups,
                "num_groups": declared_groups(manifest, groups),
                "top_group": group_id_range(directory, manifest, groups),
                "tokenizer": manifest["tokenizer"]["fingerprint"],
            }
        ds = datasets.load_dataset("parquet", data_files=files, split="train")  # copied into the datasets cache
    ds = ds.select_columns(columns)
    if info is not None:
        ds.info.description = SHARDS_INFO + json.dumps(info)
    return ds


def shards_info(dataset) -> dict | None:
    """What load_shards recorded about the shards a dataset came from ({data, groups, num_groups, top_group}),
    or None for a dataset from elsewhere.  A concatenation of shards with different groups is refused."""
    text = getattr(getattr(dataset, "info", None), "description", None) or ""
    found = []
    for line in text.splitlines():
        if line.startswith(SHARDS_INFO):
            try:
                found.append(json.loads(line[len(SHARDS_INFO) :]))
            except ValueError:
                continue
    if not found:
        return None
    if len({(f.get("groups"), f.get("num_groups")) for f in found}) > 1:
        raise ConfigError(
            "The dataset joins shards with different groups ("
            + "; ".join(f"{f.get('data')}: {f.get('num_groups')} '{f.get('groups')}' groups" for f in found)
            + "); train on one kind."
        )
    tops = [f.get("top_group") for f in found]
    return {**found[0], "top_group": None if None in tops else max(tops)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SFTGOCollator:
    """Pads (right) or packs (one row, position ids restarting per sample) while keeping each label's
    group.  `groups`: the strategy whose group_<s> column the rows carry (None: one group, plain SFT)."""

    def __init__(
        self, pad_token_id: int, groups: str | None = "tfidf", pack: bool = False, max_length: int | None = None
    ):
        for name, value, ok in (
            ("pad_token_id", pad_token_id, _is_int(pad_token_id) and pad_token_id >= 0),
            ("groups", groups, groups is None or (isinstance(groups, str) and groups != "")),
            ("pack", pack, isinstance(pack, bool)),
            ("max_length", max_length, max_length is None or (_is_int(max_length) and max_length >= 2)),
        ):
            if not ok:
                raise ConfigError(f"SFTGOCollator: {name}={value!r} is not valid; see its docstring.")
        self.pad_token_id, self.column, self.pack, self.max_length = (
            pad_token_id,
            group_column(groups) if groups else None,
            pack,
            max_length,
        )

    def _row(self, f: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        missing = [c for c in ("input_ids", "loss_mask", self.column) if c and c not in f]
        if missing:
            raise ShardError(
                f"SFTGOCollator: a sample has no {', '.join(missing)} (it has: {', '.join(map(str, f)) or 'nothing'}); "
                "load the shards with load_shards(DIR, groups=...) and give the collator the same groups."
            )
        ids = np.asarray(f["input_ids"], dtype=np.int64)
        loss_mask = np.asarray(f["loss_mask"], dtype=np.int64)
        grp = np.asarray(f[self.column], dtype=np.int64) if self.column else None
        where = f"Sample {f.get('id', '(no id)')!r}"
        if len(loss_mask) != len(ids) or (grp is not None and len(grp) != len(ids)):
            raise ShardError(f"{where} has columns of different lengths; every token needs its loss_mask (and group).")
        check_tokens(loss_mask, grp, None, where, column=self.column or "groups")  # the number of groups: the trainer's
        mask = loss_mask == 1
        if self.max_length and len(ids) > self.max_length:
            raise ShardError(
                f"A sample has {len(ids)} tokens, more than max_length {self.max_length}; "
                "rebuild the shards with --max-length instead of cutting samples here."
            )
        grp = np.where(mask, 0 if grp is None else grp, -1)
        return ids, np.where(mask, ids, IGNORE), grp

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [self._row(f) for f in features]
        if self.pack:
            ids, labels, grp = (np.concatenate([r[i] for r in rows])[None] for i in range(3))
            seg = np.concatenate([np.full(len(r[0]), n) for n, r in enumerate(rows)])[None]
            pos = np.concatenate([np.arange(len(r[0])) for r in rows])[None]
            # a label is predicted from the previous position: never across a sample boundary
            labels[:, 0], grp[:, 0] = IGNORE, -1
            starts = np.flatnonzero(pos[0] == 0)
            labels[0, starts], grp[0, starts] = IGNORE, -1
            out = {"input_ids": ids, "position_ids": pos, "labels": labels}
        else:
            width = max(len(r[0]) for r in rows)
            ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
            labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
            grp = np.full((len(rows), width), -1, dtype=np.int64)
            att = np.zeros((len(rows), width), dtype=np.int64)
            for n, (i, lab, g) in enumerate(rows):
                ids[n, : len(i)], labels[n, : len(i)], grp[n, : len(i)], att[n, : len(i)] = i, lab, g, 1
            seg = np.repeat(np.arange(len(rows)), width).reshape(len(rows), width)
            out = {"input_ids": ids, "attention_mask": att, "labels": labels}
        out.update(sftgo_groups=grp, sftgo_segments=seg)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def shifted(inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets, groups, segments) aligned with the predicting positions (HF's internal label shift)."""
    targets = inputs["labels"][:, 1:]
    return targets, inputs["sftgo_groups"][:, 1:], inputs["sftgo_segments"][:, 1:]


def count_batches(batches: list[dict], k: int) -> torch.Tensor:
    """[supervised tokens, supervised samples, tokens per group (K), real tokens] of micro-batches."""
    c = torch.zeros(k + 3, dtype=torch.float64)
    for b in batches:
        _, grp, seg = shifted(b)
        c[: 2 + k] += denominators(grp, seg, k)
        c[2 + k] += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    return c


class SFTGOTrainer(Trainer):
    """transformers.Trainer whose loss is sftgo-train's objective (sftgo, sft, rho1, dft, weighted or a plug-in).

    Extra arguments: objective ("sftgo"), lam (0.9), lam_schedule ("constant"), lam_end (0.0),
    reduce ("sample"), temperature (0.0), group_weight (1.0), num_groups (default: the manifest's, when
    the dataset came from load_shards, else 2; given, it must match the manifest's).  They are checked
    as sftgo-train checks its flags (ConfigError, a ValueError, naming the argument), and a setting the
    objective does not read is warned about.  Use with SFTGOCollator and load_shards; the dataset's
    group column is kept (the Trainer would otherwise drop columns the model's forward does not take).
    What the loss needs is checked when the trainer is built (check_inputs), not at the first batch."""

    def __init__(
        self,
        *args,
        objective: str = "sftgo",
        lam: float = 0.9,
        lam_schedule: str = "constant",
        lam_end: float = 0.0,
        reduce: str = "sample",
        temperature: float = 0.0,
        num_groups: int | None = None,
        group_weight: float = 1.0,
        **kwargs,
    ):
        self.check_inputs(
            objective,
            kwargs.get("data_collator", args[2] if len(args) > 2 else None),
            {
                "train_dataset": kwargs.get("train_dataset", args[3] if len(args) > 3 else None),
                "eval_dataset": kwargs.get("eval_dataset", args[4] if len(args) > 4 else None),
            },
            kwargs.get("processing_class", args[5] if len(args) > 5 else None),
        )
        k = self.sftgo_settings(
            objective,
            lam,
            lam_schedule,
            lam_end,
            reduce,
            temperature,
            num_groups,
            group_weight,
            [
                kwargs.get("train_dataset", args[3] if len(args) > 3 else None),
                kwargs.get("eval_dataset", args[4] if len(args) > 4 else None),
            ],
        )
        super().__init__(*args, **kwargs)
        self.sftgo = Objective(objective, k, reduce, temperature, group_weight)
        self.lam, self.lam_schedule, self.lam_end = lam, lam_schedule, lam_end
        self.loss_is_scaled_for_ga = True  # divided by the whole step's counts already
        self._step_counts: Counts | None = None
        self._diag = torch.zeros(2 * self.sftgo.num_groups, dtype=torch.float64)  # group loss sums, token counts

    @staticmethod
    def check_inputs(objective, collator, datasets: dict, tokenizer) -> None:
        """What the loss needs, checked when the trainer is built (not at the first batch): an SFTGOCollator,
        datasets with its columns (a dict of them, as for eval, each), groups where the objective needs them,
        the collator's groups those of the shards, and the shards tokenized with `processing_class`'s vocabulary."""
        if not isinstance(collator, SFTGOCollator):
            raise ConfigError(
                f"SFTGOTrainer needs data_collator=SFTGOCollator(...), which gives the loss each label's group; got "
                f"{type(collator).__name__}."
            )
        if collator.column is None and registry.get(objective).groups != "optional":
            raise ConfigError(f"objective={objective} needs groups: give SFTGOCollator(groups=...) a strategy.")
        for which, dataset in datasets.items():
            for name, part in dataset.items() if isinstance(dataset, dict) else [(which, dataset)]:
                columns = getattr(part, "column_names", None)
                if columns is None:  # an iterable dataset: its columns are known at the first batch
                    continue
                missing = [c for c in ("input_ids", "loss_mask", collator.column) if c and c not in columns]
                if missing:
                    raise ConfigError(
                        f"SFTGOTrainer: {name} has no column {', '.join(missing)} (it has: {', '.join(columns)}); "
                        "load it with load_shards(DIR, groups=...) naming the strategy SFTGOCollator reads."
                    )
                info = shards_info(part)
                if info is None:
                    continue
                if collator.column is not None and group_column(info["groups"]) != collator.column:
                    raise ConfigError(
                        f"SFTGOTrainer: {name} holds the '{info['groups']}' groups of {info['data']}, but "
                        f"SFTGOCollator reads {collator.column}; give both the same strategy."
                    )
                if tokenizer is not None and info.get("tokenizer") not in (None, tokenizer_fingerprint(tokenizer)):
                    raise ConfigError(
                        f"SFTGOTrainer: the shards of {info['data']} were tokenized with another vocabulary than "
                        "processing_class; rebuild them with --tokenizer set to this model, or pass its tokenizer."
                    )

    @staticmethod
    def sftgo_settings(
        objective, lam, lam_schedule, lam_end, reduce, temperature, num_groups, group_weight, datasets
    ) -> int:
        """The checks of sftgo-train (TrainConfig.validate, the same code), messages naming the arguments;
        a warning for each setting the objective does not read; returns K: num_groups, checked against the
        manifest of the shards the datasets came from (load_shards), or taken from it when not given."""
        infos = [i for i in (shards_info(d) for d in datasets if d is not None) if i is not None]
        groups = infos[0]["groups"] if infos else TrainConfig().groups
        cfg = TrainConfig(
            data="-",
            out="-",
            objective=objective,
            groups=groups,
            lam=lam,
            lam_schedule=lam_schedule,
            lam_end=lam_end,
            reduce=reduce,
            temperature=temperature,
            group_weight=group_weight,
        )
        cfg.validate(flag=str)
        if num_groups is not None:
            num_groups = check_number("num_groups", num_groups, str)
        for info in infos:
            if num_groups is not None and num_groups != info["num_groups"]:
                raise ConfigError(
                    f"num_groups={num_groups}, but the shards of {info['data']} declare "
                    f"{info['num_groups']} groups for '{info['groups']}'; leave num_groups out to take it "
                    "from them."
                )
            num_groups = info["num_groups"]
            top = info.get("top_group")
            if registry.get(objective).groups == "important" and top is not None and top < num_groups - 1:
                raise ConfigError(
                    empty_group_message(objective, info["groups"], info["data"], num_groups, top).replace(
                        "--objective ", "objective="
                    )
                )
        names = set(registry.OBJECTIVE_FIELDS)
        for note in ignored_settings(cfg, flag=str):
            if note.split(" ", 1)[0] in names:
                warnings.warn(f"SFTGOTrainer: {note}", stacklevel=3)
        return num_groups if num_groups is not None else 2

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(
            dict.fromkeys(
                self._signature_columns
                + ["loss_mask", "input_ids"]
                + [c for c in (getattr(self.train_dataset, "column_names", None) or []) if c.startswith(GROUP_PREFIX)]
            )
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and "sftgo_groups" in batch_samples[0]:
            self._step_counts = self._counts(batch_samples, device)
        return batch_samples, num_items

    def _counts(self, batches: list[dict], device) -> Counts:
        k = self.sftgo.num_groups
        for b in batches:  # a group the objective does not know would be dropped from the denominators
            g = b["sftgo_groups"]
            if g.numel() and int(g.max()) >= k:
                raise ShardError(
                    f"A batch has group id {int(g.max())}, but num_groups is {k} (ids 0..{k - 1}); pass "
                    "the num_groups of the shards (load_shards records it)."
                )
        c = count_batches(batches, k).to(device)
        if self.accelerator.num_processes > 1:
            c = self.accelerator.reduce(c, reduction="sum")
        c = c.cpu()
        return Counts(c[0].item(), c[1].item(), c[2 : 2 + k].to(device), int(c[2 + k]), 0, 0, 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        groups_full, segments_full = inputs.pop("sftgo_groups"), inputs.pop("sftgo_segments")
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        logits = outputs.logits[:, :-1].float()
        shifted_view = {
            "labels": labels,
            "sftgo_groups": groups_full,
            "sftgo_segments": segments_full,
            "input_ids": inputs["input_ids"],
            **({"attention_mask": inputs["attention_mask"]} if "attention_mask" in inputs else {}),
        }
        targets, groups, segments = shifted(shifted_view)
        keep = targets != IGNORE
        token_loss = F.cross_entropy(logits[keep], targets[keep], reduction="none")
        training = model.training and self._step_counts is not None
        counts = self._step_counts if training else self._counts([shifted_view], token_loss.device)
        lam = lam_at(self.state.global_step, max(1, self.state.max_steps), self.lam, self.lam_schedule, self.lam_end)
        parts = objective_parts(self.sftgo, token_loss, groups[keep], segments[keep], lam, counts)
        self._note(parts)
        if training and not torch.isfinite(parts.loss.detach()).item():  # as sftgo-train: stop, never train on it
            raise TrainingError(
                f"Step {self.state.global_step + 1} has a loss of {float(parts.loss.detach())}, not finite, so "
                "training stops here (save no model from this run); lower the learning rate or check the data."
            )
        loss = parts.loss * (self.accelerator.num_processes if training else 1)
        return (loss, outputs) if return_outputs else loss

    def _note(self, parts) -> None:
        k = self.sftgo.num_groups
        self._diag += torch.cat([parts.group_sum[:k].double().cpu(), parts.group_count[:k].double().cpu()])

    def log(self, logs, start_time=None):
        k = self.sftgo.num_groups
        if self._diag[k:].sum() > 0 and "loss" in logs:  # per-group loss since the last log line
            for g in range(k):
                n = float(self._diag[k + g])
                logs[f"group_{g}_loss"] = float(self._diag[g]) / n if n else float("nan")
            self._diag.zero_()
        return super().log(logs, start_time)


def trl_trainer_class():
    """SFTGOTrainer on top of TRL's SFTTrainer (for users whose scripts build an SFTTrainer): the loss,
    denominators and collator are ours, everything else TRL's.  Pass pre-tokenized shards with
    SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, max_length=None) and SFTGOCollator."""
    from trl import SFTTrainer

    return type("SFTGOSFTTrainer", (SFTGOTrainer, SFTTrainer), {"__doc__": trl_trainer_class.__doc__})
