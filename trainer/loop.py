"""The training loop: `run(config)`, readable top to bottom.

Input: a validated TrainConfig (and, under torchrun, the usual RANK/WORLD_SIZE env).
Output: RUN_DIR with metrics.jsonl, loss_curves.png, checkpoints/, model/ and summary.json;
returns a summary dict (rank 0 prints a table).  RUN_DIR is locked (RUN_DIR/.lock, held by
rank 0 for the whole run): a second training into it is refused.  It must be new, empty or a run
of ours (RUN_DIR/sftgo-run.json holds the run's id, which its checkpoints record; trainer.preflight),
so nothing else is ever overwritten.  A run whose steps trained on no token fails (exit 1).
Cost: the model's forward/backward per micro-batch (trainer.step); everything else is small:
two all-reduces of a few numbers per step under DDP, a dry pass over the sample lengths and
masks when --epochs sets the length of training.

Reading order: run -> set_up (checks, model, data, optimizer, resume) -> train (one_step,
evaluate, save per step) -> finish (final eval, model, curves, summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sftgo.core.errors import Interrupted, TrainingError
from sftgo.core.fileio import atomic_write_text
from sftgo.core.locks import LockedError, exclusive, shared
from sftgo.core.models import load_tokenizer, tokenizer_fingerprint
from sftgo.core.storage import is_remote
from sftgo.trainer import attention, compiling, fsdp, hostmem, preflight, remote, resume
from sftgo.trainer import checkpoint as ckpt
from sftgo.trainer.batching import IGNORE, Batches
from sftgo.trainer.config import ConfigError, TrainConfig, ignored_settings
from sftgo.trainer.data import ShardStream
from sftgo.trainer.distributed import autocast_for, barrier, on_rank0, setup_distributed, state_dtype, use_bf16
from sftgo.trainer.memory import MemoryMeter
from sftgo.trainer.metrics import (
    MetricsLog,
    check_trackers,
    plot_curves,
    read_jsonl,
    summary_table,
    tensorboard_enabled,
)
from sftgo.trainer.model import TokenLossModel, causal_lm, load_for_training, saved_form
from sftgo.trainer.objectives import GroupDRO, lam_at, sftgo_loss
from sftgo.trainer.optim import LRLambda, make_optimizer
from sftgo.trainer.prefetch import Prefetch
from sftgo.trainer.step import Objective, all_reduce, backward_step
from sftgo.trainer.stopping import graceful_interrupt

CUT_KEYS = resume.CUT_KEYS


# ---------------------------------------------------------------- set-up helpers
def lock_run_dir(stack: contextlib.ExitStack, out: str) -> None:
    """Hold RUN_DIR/.lock until `stack` closes; a second training into `out` is refused."""
    try:
        stack.enter_context(exclusive(Path(out), what="training run"))
    except LockedError as exc:
        raise ConfigError(str(exc)) from None


def data_identity(cfg: TrainConfig) -> dict:
    """What a checkpoint records of the data (trainer.resume.data_identity): checksums, --groups entries."""
    opts = cfg.storage_options
    return resume.data_identity(
        cfg, remote.manifest(cfg.data, opts), remote.manifest(cfg.eval_data, opts) if cfg.eval_data else None
    )


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path | None, list[str], str]:
    """Rank 0, holding the run directory's lock: refuse to clobber anything but a run of ours; on
    --resume find the checkpoint and check that it continues this run (trainer.resume).  What an
    interrupted save left is cleaned up first (checkpoint.sweep).  A run of ours that stopped before
    its first checkpoint (no checkpoint, no model, no summary) has nothing to continue: it is started
    again, with a note, whether or not --resume was given.  Returns (checkpoint or None, notes to log,
    the run's id).  On --resume, config.json is rewritten by set_up once the checkpoint is restored."""
    out = Path(cfg.out)
    preflight.check_run_dir(cfg)
    notes = [f"Note: {n}." for n in ckpt.sweep(out)] if out.is_dir() else []
    latest = ckpt.latest_checkpoint(out)
    began = (out / "metrics.jsonl").exists()
    unfinished = latest is None and began and not any((out / n).exists() for n in ("model", "summary.json"))
    if cfg.resume and latest is not None:
        saved = preflight.read_run_config(out)
        run_id = preflight.run_id(out)
        state = resume.CheckpointState.read(latest)
        notes += resume.check(cfg, saved, state, data_identity(cfg), run_id, latest)
        notes.append(f"Note: resuming from {latest.name}: training goes on from step {state.step}.")
        return latest, notes, run_id
    if unfinished:
        notes.append(
            f"Note: {out} holds a run that stopped before its first checkpoint, so there is nothing to "
            "continue: it starts again from step 0 (its metrics and TensorBoard logs are replaced)."
        )
        if (out / "tb").is_dir() and not (out / "tb").is_symlink():
            shutil.rmtree(out / "tb")
    elif cfg.resume:
        raise ConfigError(f"--resume was given but {out} has no checkpoint to resume from.")
    elif latest is not None or began:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    run_id = preflight.write_run_marker(out)
    atomic_write_text(out / "config.json", cfg.to_json())
    return None, notes, run_id


def make_batches(
    cfg: TrainConfig,
    data_dir: str,
    manifest: dict,
    group_col: str | None,
    pad_id: int,
    rank: int,
    world: int,
    *,
    shuffle: bool,
    cycle: bool,
    flat: bool = False,
    cache=None,
) -> Batches:
    stream = ShardStream(
        data_dir,
        manifest,
        group_col,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        shuffle=shuffle,
        shuffle_buffer=cfg.shuffle_buffer,
        readahead=cfg.readahead,
        cache=cache,  # a store URL's ShardCache (trainer.remote), None for a local folder
    )
    return Batches(
        stream,
        batch_tokens=cfg.batch_tokens,
        max_length=cfg.max_length,
        pack=cfg.pack,
        pool_batches=cfg.bucket_pool,
        seed=cfg.seed,
        pad_id=pad_id,
        rank=rank,
        cycle=cycle,
        flat=flat,
    )


def count_steps(cfg: TrainConfig, batches: Batches, device) -> int:
    """Optimizer steps of the run: --max-steps, or --epochs passes (the rank with the fewest
    micro-batches decides: every rank must run the same number of steps)."""
    if cfg.max_steps:
        return cfg.max_steps
    per_rank = all_reduce(torch.tensor([batches.count(0)], device=device), dist.ReduceOp.MIN).item()
    if per_rank // cfg.grad_accum == 0:
        raise ConfigError(
            f"{cfg.data} is too small for one optimizer step of {cfg.grad_accum} micro-batches per process."
        )
    return max(1, round(cfg.epochs * (per_rank // cfg.grad_accum)))


# ---------------------------------------------------------------- the run's state
@dataclasses.dataclass
class Run:
    """Everything the loop works with, built once by set_up (no closures, no globals)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    autocast: object
    tokenizer: object
    manifest: dict
    group_col: str | None
    k: int  # groups in the data
    objective: Objective  # its num_groups is max(k, 2): the losses want K >= 2
    model: torch.nn.Module
    net: TokenLossModel
    train_net: torch.nn.Module  # net, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: object
    dro: GroupDRO | None
    batches: Batches
    total_steps: int
    pad_id: int
    data_id: dict  # what checkpoints record of the data (trainer.resume.data_identity)
    run_id: str | None = None  # the run directory's id (rank 0), recorded in checkpoints
    log: MetricsLog | None = None
    step: int = 0
    worst_prev: int | None = None
    switches: int = 0
    cut: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(CUT_KEYS, 0))  # run totals
    nonfinite_skipped: int = 0  # steps skipped for a non-finite loss or gradient norm (run total)
    trained_tokens: float = 0.0  # tokens the objective trained on in this process's steps (all ranks)
    steps_run: int = 0  # optimizer steps of this invocation (a resume starts at 0)
    memory: MemoryMeter | None = None  # this process's memory peaks (trainer/memory.py)
    clock: compiling.CompileClock | None = None  # with --compile: the time spent compiling
    compile_s: float = 0.0  # compile time of this invocation (evaluations' included)
    feed: Prefetch | None = None  # the training batches, made ahead (trainer/prefetch.py), while train() runs
    host_malloc: dict = dataclasses.field(default_factory=dict)  # trainer.hostmem.apply()'s account
    caches: remote.DataCaches | None = None  # the cache folders of --data / --eval-data URLs

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_position(self) -> tuple[int, int]:
        """(epoch, micro-batches of it trained): the batches prefetched but not yet used do not count."""
        return self.feed.position if self.feed is not None else tuple(self.batches.position)

    def lam(self, step: int) -> float:
        cfg = self.cfg
        return lam_at(step, self.total_steps, cfg.lam, cfg.lam_schedule, cfg.lam_end)


def load_model(cfg: TrainConfig, resume_from: Path | None, device):
    """The model to train: the checkpoint's weights on resume (LoRA: base + the checkpoint's adapter)."""
    torch.manual_seed(cfg.seed)
    lora_resume = resume_from is not None and cfg.lora_r > 0
    from_base = resume_from is None or lora_resume or cfg.fsdp  # FSDP checkpoints hold sharded weights only
    model = load_for_training(
        cfg.model if from_base else str(resume_from),
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        adapter_dir=str(resume_from) if lora_resume else None,
        grad_checkpointing=cfg.grad_checkpointing,
        ac_every=cfg.ac_every,
        trust_remote_code=cfg.trust_remote_code,
        dtype=state_dtype(cfg, device),
    )
    return model.to(device)


def set_up(cfg: TrainConfig, rank: int, world: int, device, caches=None) -> tuple[Run, Path | None, list[str]]:
    """Checks before anything expensive, then model, data, optimizer and schedule.  Rank 0
    decides about the run directory; the others must not race it (e.g. see its fresh
    metrics.jsonl and think the run already existed)."""
    autocast = autocast_for(cfg, device)
    resume_from, notes, run_id = on_rank0(lambda: prepare_run_dir(cfg))
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model, cfg.trust_remote_code)
    manifest, group_col, k = preflight.check_data(cfg, tokenizer_fingerprint(tokenizer))
    notes = notes + preflight.data_notes(cfg, manifest)
    check_trackers(cfg.report_to)
    wanted_tb = True if "tensorboard" in cfg.report_to else cfg.tensorboard
    tb = tensorboard_enabled(wanted_tb, say=rank == 0)  # after the checks: a failed run needs no note
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(cfg, resume_from, device)
    flat = attention.padding_free(cfg.padding_free, device, use_bf16(cfg, device))
    if flat:
        attention.use_varlen(causal_lm(model), str(cfg.model or "embedded"))
        notes.append(attention.note(device, use_bf16(cfg, device)))
    net = TokenLossModel(model, cfg.ce_chunk, lookup_into_grad=world == 1 or cfg.fsdp)  # not under DDP: see the class
    train_net = net
    if cfg.fsdp:  # before the optimizer: fully_shard replaces the parameters with sharded ones
        train_net = fsdp.shard(net, model, bf16=use_bf16(cfg, device))
    compiled, note = compiling.resolve(cfg, device)
    notes = notes + ([note] if note else [])
    if compiled:  # each layer, after fully_shard and before DDP (torchtitan's order)
        compiling.compile_layers(fsdp.decoder_layers(model))
    if not cfg.fsdp and world > 1:
        train_net = torch.nn.parallel.DistributedDataParallel(  # gradients as views into the all-reduce buckets:
            net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )  # no second copy of them (clip and zero_grad(set_to_none=True) work on views; DDP re-creates them)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, as it would on different data
    cache = caches.get("data") if caches else None
    batches = make_batches(
        cfg, cfg.data, manifest, group_col, pad_id, rank, world, shuffle=True, cycle=True, flat=flat, cache=cache
    )
    total = count_steps(cfg, batches, device)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRLambda(cfg.warmup_steps, total, cfg.min_lr_ratio))
    k_loss = max(k, 2)
    objective = Objective(cfg.objective, k_loss, cfg.reduce, cfg.temperature, cfg.group_weight)
    dro = GroupDRO(k_loss, cfg.dro_step) if "dro_step" in objective.impl.settings and cfg.dro_step > 0 else None
    r = Run(
        cfg,
        rank,
        world,
        device,
        autocast,
        tokenizer,
        manifest,
        group_col,
        k,
        objective,
        model,
        net,
        train_net,
        optimizer,
        scheduler,
        dro,
        batches,
        total,
        pad_id,
        data_identity(cfg),
        run_id,
        memory=MemoryMeter(device),
        clock=compiling.CompileClock() if compiled else None,
        caches=caches,
    )
    if resume_from is not None:
        resume.restore(r, resume_from)  # then config.json says what the run continues with (not before: a refused
        on_rank0(lambda: atomic_write_text(Path(cfg.out) / "config.json", cfg.to_json()))  # resume changes nothing)
    if r.main:
        r.log = MetricsLog(
            cfg.out,
            r.step if resume_from else None,
            tb,
            tuple(t for t in cfg.report_to if t != "tensorboard"),
            cfg.public(),  # without the storage options (credentials)
        )
    return r, resume_from, notes


# ---------------------------------------------------------------- evaluation and checkpoints
@torch.no_grad()
def evaluate(cfg, net, batches, k, lam, device, autocast, objective) -> dict:
    """Loss, CE, worst and per-group loss of the eval set (all ranks' shares combined)."""
    net.eval()
    acc = torch.zeros(6 + 2 * k, dtype=torch.float64)  # ce, worst, samples, 3 cut counts, group sums, counts
    it = iter(batches)
    for i, mb in enumerate(it):
        if cfg.eval_batches and i >= cfg.eval_batches:
            it.close()  # stop its background reader now
            break
        mb = mb.to(device)
        with autocast():
            tl = net(mb.input_ids, mb.position_ids, mb.targets, **mb.attention_kwargs())
        keep = mb.targets != IGNORE
        p = sftgo_loss(
            tl.float(),
            mb.groups[keep],
            1.0,
            "sample",
            num_groups=max(k, 2),
            segments=mb.segments[keep],
            ce_denom=1.0,
            worst_denom=1.0,
        )  # sums, normalised below
        acc[:6] += torch.tensor(
            [
                float(p.ce),
                float(p.worst),
                torch.unique(mb.segments[keep]).numel(),
                mb.truncated_samples,
                mb.truncated_loss_tokens,
                mb.skipped_samples,
            ],
            dtype=torch.float64,
        )
        acc[6 : 6 + k] += p.group_sum[:k].double().cpu()
        acc[6 + k :] += p.group_count[:k].double().cpu()
    acc = all_reduce(acc.to(device)).cpu()
    net.train()
    n_tok = float(acc[6 + k :].sum())
    ce = float(acc[0]) / max(n_tok, 1)
    worst = float(acc[1]) / max(float(acc[2]), 1)
    group_loss = (acc[6 : 6 + k] / acc[6 + k :]).tolist()
    loss = objective.impl.eval_loss(ce, worst, group_loss, lam)
    return {
        "split": "eval",
        "loss": loss,
        "ce": ce,
        "worst": worst,
        "group_loss": group_loss,
        "loss_tokens": int(n_tok),
        **{key: int(v) for key, v in zip(CUT_KEYS, acc[3:6].tolist())},
    }


def run_eval(r: Run, step: int) -> None:
    if not r.cfg.eval_data:
        return
    batches = make_batches(
        r.cfg,
        r.cfg.eval_data,
        remote.manifest(r.cfg.eval_data, r.cfg.storage_options),
        r.group_col,
        r.pad_id,
        r.rank,
        r.world,
        shuffle=False,
        cycle=False,
        flat=r.batches.flat,  # the eval micro-batches in the training layout
        cache=r.caches.get("eval_data") if r.caches else None,
    )
    rec = evaluate(r.cfg, r.net, batches, r.k, r.lam(step), r.device, r.autocast, r.objective)
    if r.main:
        r.log.write({"step": step, **rec})


def save(r: Run, step: int) -> None:
    """An atomic checkpoint: rank 0 writes weights and state, every rank its RNG, rank 0 commits."""
    out = r.cfg.out
    tmp = ckpt.begin(out, step) if r.main else Path(out) / "checkpoints" / f".tmp-step-{step:07d}"
    if r.main:
        state = resume.CheckpointState(
            step,
            list(r.data_position),
            r.worst_prev,
            r.switches,
            r.dro.state_dict() if r.dro else None,
            r.world,
            r.run_id,
            resume.settings_of(r.cfg),
            **r.data_id,
            **r.cut,
            nonfinite_skipped=r.nonfinite_skipped,
        )
        ckpt.write_main(
            tmp,
            None if r.cfg.fsdp else r.model,
            r.tokenizer,
            None if r.cfg.fsdp else r.optimizer,
            r.scheduler,
            state.to_json(),
        )
    barrier()
    if r.cfg.fsdp:  # every rank writes its shards of weights and optimizer state (collective)
        fsdp.save(tmp, r.train_net, r.optimizer)
        barrier()
    ckpt.write_rng(tmp, r.rank)
    barrier()
    if r.main:
        ckpt.commit(out, tmp, step, r.cfg.keep_checkpoints)
    barrier()


# ---------------------------------------------------------------- one optimizer step
def one_step(r: Run, it) -> dict:
    """Train one optimizer step on the next grad_accum micro-batches; return its metrics record."""
    # the peak of what came before this step (an eval, a save) is the run's, not the step's
    r.memory.step_peak(restart=True)
    if r.clock is not None:  # what an evaluation compiled is not this step's
        r.compile_s += r.clock.since()
    t0 = time.perf_counter()
    micro = [next(it).to(r.device) for _ in range(r.cfg.grad_accum)]
    lam = r.lam(r.step)
    stats = backward_step(
        r.train_net,
        micro,
        r.objective,
        lam,
        group_weights=None if r.dro is None else r.dro.weights,
        autocast=r.autocast,
        grad_scale=r.world,
    )
    clip = r.cfg.clip_grad if r.cfg.clip_grad > 0 else float("inf")
    norm = fsdp.grad_norm_tensor(torch.nn.utils.clip_grad_norm_(r.model.parameters(), clip))
    # the one point where the host waits for the device in a step: the skip decision needs the loss and the
    # gradient norm, read with every other statistic of the step in a single transfer
    (grad_norm,) = stats.read(norm)
    lr = r.scheduler.get_last_lr()[0]
    updated = math.isfinite(stats.loss) and math.isfinite(grad_norm)  # the same on every rank (reduced)
    if not updated:
        nonfinite_step(r, stats.loss, grad_norm, lr)
    else:
        r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    if r.dro is not None and updated:
        r.dro.update(stats.group_loss)
    group_loss = stats.group_loss[: max(r.k, 1)]
    finite = torch.nan_to_num(group_loss, nan=-math.inf)
    worst_group = int(finite.argmax()) if torch.isfinite(finite).any() else None
    if r.worst_prev is not None and worst_group is not None and worst_group != r.worst_prev:
        r.switches += 1
    r.worst_prev = worst_group if worst_group is not None else r.worst_prev
    for key in CUT_KEYS:
        r.cut[key] += getattr(stats.counts, key)
    r.trained_tokens += float(r.objective.impl.trained_tokens(stats.counts))
    r.step += 1
    r.steps_run += 1
    compile_s = r.clock.since() if r.clock is not None else 0.0
    r.compile_s += compile_s
    dt = max(time.perf_counter() - t0 - compile_s, 1e-9)  # the step's own time, its compilation apart
    peaks = r.memory.step_peak(restart=False)
    rec = {
        "step": r.step,
        "split": "train",
        "loss": stats.loss,
        "ce": stats.ce,
        "worst": stats.worst,
        "group_loss": group_loss.tolist(),
        "group_weight": stats.group_weight[: max(r.k, 1)].tolist(),
        "worst_group": worst_group,
        "worst_switches": r.switches,
        "ties": stats.ties,
        "lam": lam,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": stats.counts.tokens,
        "loss_tokens": int(stats.counts.loss_tokens),
        "tokens_per_s": stats.counts.tokens / dt,
        "step_time_s": dt,
        **({"compile_s": compile_s} if r.clock is not None else {}),
        "skipped_nonfinite": not updated,
        "nonfinite_skipped": r.nonfinite_skipped,
        "epoch": r.data_position[0],
        **r.cut,
        **peaks,
    }
    if r.dro is not None:
        rec["dro_weights"] = r.dro.weights.tolist()
    return rec


def nonfinite_step(r: Run, loss: float, grad_norm: float, lr: float) -> None:
    """A step whose loss or gradient norm is not finite: skipped (no update, counted) while --skip-nonfinite
    allows, else the run stops here with one sentence, before anything of this step is saved."""
    if r.nonfinite_skipped < r.cfg.skip_nonfinite:
        r.nonfinite_skipped += 1
        if r.main:
            print(
                f"Note: step {r.step + 1} skipped: its loss is {loss} and its gradient norm {grad_norm} "
                f"({r.nonfinite_skipped} of --skip-nonfinite {r.cfg.skip_nonfinite} skipped so far).",
                file=sys.stderr,
                flush=True,
            )
        return
    latest = ckpt.latest_checkpoint(r.cfg.out)
    kept = f"the last good checkpoint, {latest.name}, is kept" if latest else "there is no checkpoint to keep"
    allowed = f" (after {r.nonfinite_skipped} skipped)" if r.cfg.skip_nonfinite else ""
    raise TrainingError(
        f"Step {r.step + 1} has a loss of {loss} and a gradient norm of {grad_norm}, not finite{allowed}, so training "
        f"stops here: no model is exported and {kept}; lower --lr (now {lr:g}), check the data, or pass "
        "--skip-nonfinite N to skip up to N such steps."
    )


# ---------------------------------------------------------------- the loop
def train(r: Run) -> None:
    cfg = r.cfg
    if r.step == 0:
        run_eval(r, 0)
    stop = min(r.total_steps, cfg.stop_after) if cfg.stop_after else r.total_steps
    bar = None
    if r.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=r.total_steps, initial=r.step, desc=cfg.objective, unit="step", dynamic_ncols=True)
    it = r.feed = Prefetch(r.batches, r.device)
    try:
        with graceful_interrupt(r.world) as interrupt:  # a signal stops between steps, never inside one
            while r.step < stop:
                rec = one_step(r, it)
                if r.main and (r.step % cfg.log_every == 0 or r.step == stop):
                    r.log.write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.3f}", worst_g=rec["worst_group"], tok_s=f"{rec['tokens_per_s']:.0f}"
                    )
                if cfg.eval_every and r.step % cfg.eval_every == 0 and r.step < r.total_steps:
                    run_eval(r, r.step)
                saved = (cfg.save_every and r.step % cfg.save_every == 0) or r.step == stop
                if saved:
                    save(r, r.step)
                signum = interrupt.should_stop(r.world, r.device)
                if signum:  # Ctrl-C, SIGTERM or SIGUSR1: checkpoint, then stop (the CLI says how to continue)
                    if not saved:
                        save(r, r.step)
                    raise Interrupted(signum, checkpoint=f"step-{r.step:07d}")
    finally:  # on an interrupt or error too: a reader thread left inside pyarrow at exit aborts the process
        if bar is not None:
            bar.close()
        it.close()  # r.feed keeps its position: that of the last batch trained
    if r.steps_run and not r.trained_tokens:  # e.g. rho1 whose important tokens were all cut: nothing was learned
        raise ConfigError(
            f"Training ran {r.steps_run} step(s) but --objective {cfg.objective} trained on no token "
            f"(none of the tokens it trains on reached a micro-batch; {r.cut['truncated_loss_tokens']} "
            f"supervised tokens were cut at --max-length {cfg.max_length}), so the run learned nothing "
            "and no model is saved."
        )


def finish(r: Run) -> dict:
    """The end: final eval and model (when the run is complete), curves, summary."""
    cfg = r.cfg
    summary = {
        "step": r.step,
        "total_steps": r.total_steps,
        "finished": r.step >= r.total_steps,
        **r.cut,
        "nonfinite_skipped": r.nonfinite_skipped,
    }
    if r.clock is not None:
        summary["compile_s"] = r.compile_s
    if r.step >= r.total_steps:
        run_eval(r, r.step)
        # the last checkpoint holds the optimizer state; the export needs the room (under --fsdp rank 0
        # gathers the full weights), so its moments (2 x the weights, sharded or not) go first
        r.optimizer.state.clear()
        model_dir = save_model(r)
        if model_dir is not None:
            summary["model_dir"] = str(model_dir)
    summary["peak_memory_mb_per_rank"] = r.memory.per_rank(r.rank, r.world)
    summary["host_malloc"] = r.host_malloc
    cached = r.caches.summary(r.world) if r.caches else None  # collective
    if cached is not None:
        summary["data_cache"] = cached
    if not r.main:
        return summary
    r.log.close()
    records = read_jsonl(Path(cfg.out) / "metrics.jsonl")
    plot_curves(
        records,
        Path(cfg.out) / "loss_curves.png",
        title=f"{cfg.objective} (λ={cfg.lam}, groups={cfg.groups}) — per-group loss",
    )
    table = summary_table(records)
    cuts = (
        f"truncated at --max-length {cfg.max_length}: {r.cut['truncated_samples']} samples "
        f"({r.cut['truncated_loss_tokens']} supervised tokens cut); skipped (no supervised token left): "
        f"{r.cut['skipped_samples']} samples"
        + (f"; steps skipped for a non-finite loss or gradient: {r.nonfinite_skipped}" if cfg.skip_nonfinite else "")
    )
    summary["table"] = table + "\n" + cuts
    atomic_write_text(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(summary["table"], flush=True)
    return summary


def launch_note(r: Run) -> str:
    """Say how many processes train, so a launcher that started fewer than meant is never silent."""
    if r.world == 1:
        how = "1 process (no torchrun / accelerate launch environment; torchrun --nproc_per_node N for more)"
    else:
        how = (
            f"{r.world} processes ({'FSDP2, sharded' if r.cfg.fsdp else 'DDP'}, each reading its own part of the data)"
        )
    return f"Training on {how}, {r.device.type}."


def save_model(r: Run) -> Path | None:
    """RUN_DIR/model on rank 0 (under --fsdp, every rank first gives its shards of the weights)."""
    cfg = r.cfg
    dtype, use_cache = saved_form(cfg.model, cfg.trust_remote_code) if r.main else (None, None)
    if cfg.fsdp:
        state = fsdp.full_state_dict(r.model)  # collective
        if not r.main:
            return None
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # no second copy of the weights: the gathered tensors become the model's
            model = AutoModelForCausalLM.from_config(causal_lm(r.model).config)
        model.load_state_dict(state, assign=True)
        del state
        model.tie_weights()
    elif r.main:
        model = causal_lm(r.model) if cfg.lora_r == 0 else r.model
        if cfg.save_adapter:  # the adapter alone, before save_final merges it into the base
            ckpt.save_adapter(cfg.out, model, r.tokenizer)
    else:
        return None
    return ckpt.save_final(cfg.out, model, r.tokenizer, dtype=dtype, use_cache=use_cache)


def run(cfg: TrainConfig) -> dict:
    cfg.validate()
    rank, world, device = setup_distributed(cfg.fsdp)
    host_malloc = hostmem.apply(device.type == "cpu")  # before the model load
    try:
        with contextlib.ExitStack() as lock:
            on_rank0(lambda: preflight.check_run_dir(cfg))  # before the lock creates RUN_DIR/.lock
            on_rank0(lambda: lock_run_dir(lock, cfg.out))  # rank 0 holds RUN_DIR/.lock for the whole run
            for folder in dict.fromkeys(f for f in (cfg.data, cfg.eval_data) if f):  # and every rank a shared lock
                if not is_remote(folder):  # on local shards: no build or score rewrites them (a store has no lock)
                    lock.enter_context(shared(Path(folder)))
            caches = remote.DataCaches(cfg, rank, world)  # --data / --eval-data URLs stream through these folders
            lock.callback(caches.close)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # our own bar is the one to watch
            r, _, notes = set_up(cfg, rank, world, device, caches)
            if r.log is not None:
                lock.callback(r.log.close)  # an interrupted or failed run's records and trackers are flushed too
            r.host_malloc = host_malloc
            for note in (notes + [f"Note: {n}" for n in ignored_settings(cfg)] + [launch_note(r)]) if r.main else ():
                print(note, file=sys.stderr, flush=True)
            r.memory.start_training()
            train(r)
            summary = finish(r)
            barrier()  # leave together: a rank that tears down its process group early can abort the other's
            return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
