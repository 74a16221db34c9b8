"""The training loop: `run(config)`, readable top to bottom.

Input: a validated TrainConfig (and, under torchrun, the usual RANK/WORLD_SIZE env).
Output: RUN_DIR with metrics.jsonl, loss_curves.png, checkpoints/ and model/; returns a
summary dict (rank 0 prints a table).
Cost: the model's forward/backward per micro-batch; everything else is small: two
all-reduces of a few numbers per step under DDP, a dry pass over the sample lengths
(num_tokens column only) when --epochs sets the length of training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sftgo.core.shards import atomic_write_text, read_manifest, verify_shards
from sftgo.core.models import load_tokenizer, tokenizer_fingerprint
from sftgo.trainer import checkpoint as ckpt
from sftgo.trainer.batching import IGNORE, Batches
from sftgo.trainer.config import ConfigError, TrainConfig
from sftgo.trainer.data import ShardStream
from sftgo.trainer.metrics import MetricsLog, plot_curves, read_jsonl, summary_table
from sftgo.trainer.model import TokenLossModel, causal_lm, load_for_training
from sftgo.trainer.objectives import GroupDRO, lam_at, rho1_loss, sftgo_loss

# settings that change the data order or the meaning of a step: a resume must keep them
RESUME_KEYS = ("data", "objective", "groups", "batch_tokens", "max_length", "pack", "grad_accum", "seed",
               "shuffle_buffer", "bucket_pool", "max_steps", "epochs", "lora_r")


# ---------------------------------------------------------------- set-up helpers
def setup_distributed():
    """(rank, world_size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def on_rank0(fn):
    """Run fn on rank 0 only and give every rank its result, or raise its error everywhere."""
    if not dist.is_initialized():
        return fn()
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except ConfigError as exc:
            box[1] = str(exc)
    dist.broadcast_object_list(box, src=0)  # our own small values (a path or a message), never user data
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]


def check_data(cfg: TrainConfig, tokenizer) -> tuple[dict, str | None, int]:
    """Pre-flight checks (one clear sentence each): manifest, tokenizer fingerprint, the
    --groups column, every shard's checksum and schema; for train and eval data.
    Returns (manifest, group column or None, number of groups)."""
    manifest = read_manifest(cfg.data)
    groups = cfg.groups
    if cfg.objective == "sft" and groups and groups not in manifest.get("strategies", {}):
        groups = None  # plain SFT needs no groups; with them it only logs per-group loss
    strategies = (groups,) if groups else ()
    fp = tokenizer_fingerprint(tokenizer)
    verify_shards(cfg.data, manifest, strategies=strategies, checksums=True, tokenizer_fingerprint=fp)
    if cfg.eval_data:
        verify_shards(cfg.eval_data, read_manifest(cfg.eval_data), strategies=strategies, checksums=True,
                      tokenizer_fingerprint=fp)
    if not manifest["shards"]:
        raise ConfigError(f"{cfg.data} holds no shards (0 records written).")
    k = int(manifest["strategies"][groups].get("num_groups", 2)) if groups else 1
    if cfg.objective == "rho1" and k < 2:
        raise ConfigError(f"--objective rho1 needs at least 2 groups; '{groups}' has {k}.")
    return manifest, (f"group_{groups}" if groups else None), k


def prepare_run_dir(cfg: TrainConfig, rank: int) -> Path | None:
    """Refuse to clobber a run; on --resume find the checkpoint and check settings match."""
    out = Path(cfg.out)
    latest = ckpt.latest_checkpoint(out)
    if cfg.resume:
        if latest is None:
            raise ConfigError(f"--resume was given but {out} has no checkpoint to resume from.")
        saved = json.loads((out / "config.json").read_text())
        for key in RESUME_KEYS:
            now = dataclasses.asdict(cfg)[key]
            if json.loads(json.dumps(now)) != saved.get(key):
                raise ConfigError(f"--resume with a different --{key.replace('_', '-')} ({saved.get(key)!r} before, {now!r} now) would not continue the same run.")
        return latest
    if latest is not None or (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", cfg.to_json())
    return None


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


class _LRLambda:
    """A picklable-free callable (LambdaLR saves callables' __dict__, not functions)."""

    def __init__(self, warmup, total, min_ratio):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step):
        return lr_factor(step, self.warmup, self.total, self.min_ratio)


def make_optimizer(model, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW exists on CPU and CUDA (torch >= 2.4) and is what HF Trainer uses by default
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type in ("cpu", "cuda"))


# ---------------------------------------------------------------- the objective on one micro-batch
def objective_parts(cfg, token_loss, groups, segments, k, lam, denoms, dro):
    """LossParts of one micro-batch; denominators are those of the whole global step."""
    n_tok, n_smp, n_grp = denoms
    if cfg.objective == "sftgo":
        return sftgo_loss(token_loss, groups, lam, cfg.reduce, num_groups=k, segments=segments, ce_denom=n_tok,
                          worst_denom=n_smp, group_denom=n_grp, temperature=cfg.temperature or None,
                          group_weights=None if dro is None else dro.weights)
    if cfg.objective == "rho1":
        return rho1_loss(token_loss, groups, num_groups=k, segments=segments, important_denom=n_grp[k - 1],
                         ce_denom=n_tok)
    return sftgo_loss(token_loss, groups, 0.0, num_groups=k, segments=segments, ce_denom=n_tok)


def step_counts(micro, k, device) -> torch.Tensor:
    """[supervised tokens, supervised samples, tokens per group (k), real tokens] of a step."""
    c = torch.zeros(k + 3, dtype=torch.float64)
    for mb in micro:
        g = mb.groups[mb.groups >= 0]
        c[0] += g.numel()
        c[1] += torch.unique(mb.segments[mb.groups >= 0]).numel()
        c[2 : 2 + k] += torch.bincount(g, minlength=k)[:k].double()
        c[2 + k] += mb.num_tokens
    return all_reduce(c.to(device)).cpu()


@torch.no_grad()
def evaluate(cfg, net, batches, k, lam, device, autocast) -> dict:
    """Loss, CE, worst and per-group loss of the eval set (all ranks' shares combined)."""
    net.eval()
    acc = torch.zeros(3 + 2 * k, dtype=torch.float64)  # ce_sum, worst_sum, samples, group sums, group counts
    it = iter(batches)
    for i, mb in enumerate(it):
        if cfg.eval_batches and i >= cfg.eval_batches:
            it.close()  # stop its background reader now
            break
        mb = mb.to(device)
        with autocast():
            tl = net(mb.input_ids, mb.position_ids, mb.targets)
        keep = mb.targets != IGNORE
        p = sftgo_loss(tl.float(), mb.groups[keep], 1.0, "sample", num_groups=max(k, 2), segments=mb.segments[keep],
                       ce_denom=1.0, worst_denom=1.0)  # sums, normalised below
        acc[0] += float(p.ce)
        acc[1] += float(p.worst)
        acc[2] += torch.unique(mb.segments[keep]).numel()
        acc[3 : 3 + k] += p.group_sum[:k].double().cpu()
        acc[3 + k :] += p.group_count[:k].double().cpu()
    acc = all_reduce(acc.to(device)).cpu()
    net.train()
    n_tok = float(acc[3 + k :].sum())
    ce = float(acc[0]) / max(n_tok, 1)
    worst = float(acc[1]) / max(float(acc[2]), 1)
    group_loss = (acc[3 : 3 + k] / acc[3 + k :]).tolist()
    loss = ce if cfg.objective == "sft" else (1 - lam) * ce + lam * worst
    if cfg.objective == "rho1":
        loss = group_loss[k - 1]
    return {"split": "eval", "loss": loss, "ce": ce, "worst": worst, "group_loss": group_loss, "loss_tokens": int(n_tok)}


# ---------------------------------------------------------------- run
def run(cfg: TrainConfig) -> dict:
    cfg.validate()
    rank, world, device = setup_distributed()
    try:
        return _run(cfg, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    main = rank == 0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar is the one to watch
    use_bf16 = device.type == "cuda" and cfg.precision != "fp32" and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not use_bf16:
        raise ConfigError("--precision bf16 needs a GPU with bf16 support; use auto or fp32 here.")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    # 1. checks before anything expensive (rank 0 decides about the run directory; the others
    #    must not race it, e.g. see its fresh metrics.jsonl and think the run already existed)
    resume_from = on_rank0(lambda: prepare_run_dir(cfg, rank))
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model, cfg.trust_remote_code)
    manifest, group_column, k = check_data(cfg, tokenizer)
    k_loss = max(k, 2)  # the loss functions want K >= 2; a single group just leaves group 1 empty
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 2. model, optimizer, schedule
    torch.manual_seed(cfg.seed)
    lora_resume = resume_from is not None and cfg.lora_r > 0
    model = load_for_training(cfg.model if (resume_from is None or lora_resume) else str(resume_from),
                              lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              adapter_dir=str(resume_from) if lora_resume else None,
                              grad_checkpointing=cfg.grad_checkpointing, trust_remote_code=cfg.trust_remote_code)
    model.to(device)
    net = TokenLossModel(model, cfg.ce_chunk)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, as it would on different data

    def batches_for(data_dir, shuffle, cycle):
        man = manifest if data_dir == cfg.data else read_manifest(data_dir)
        stream = ShardStream(data_dir, man, group_column, seed=cfg.seed, rank=rank, world_size=world,
                             shuffle=shuffle, shuffle_buffer=cfg.shuffle_buffer, readahead=cfg.readahead)
        return Batches(stream, batch_tokens=cfg.batch_tokens, max_length=cfg.max_length, pack=cfg.pack,
                       pool_batches=cfg.bucket_pool, seed=cfg.seed, pad_id=pad_id, rank=rank, cycle=cycle)

    train_batches = batches_for(cfg.data, shuffle=True, cycle=True)
    if cfg.max_steps:
        total_steps = cfg.max_steps
    else:  # every rank must run the same number of steps: the fewest micro-batches decide
        per_rank = all_reduce(torch.tensor([train_batches.count(0)], device=device), dist.ReduceOp.MIN).item()
        total_steps = max(1, round(cfg.epochs * (per_rank // cfg.grad_accum)))
        if per_rank // cfg.grad_accum == 0:
            raise ConfigError(f"{cfg.data} is too small for one optimizer step of {cfg.grad_accum} micro-batches per process.")
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LRLambda(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    dro = GroupDRO(k_loss, cfg.dro_step) if cfg.objective == "sftgo" and cfg.dro_step > 0 else None

    start_step, worst_prev, switches = 0, None, 0
    if resume_from is not None:
        state = ckpt.load_state(resume_from, rank, optimizer, scheduler)
        if state.get("world_size", 1) != world:  # each rank's share of the data depends on the world size
            raise ConfigError(f"{resume_from} was written by {state.get('world_size', 1)} process(es); resume it with the same number, not {world}.")
        start_step = state["step"]
        train_batches.position = tuple(state["data_position"])
        worst_prev, switches = state["worst_group"], state["worst_switches"]
        if dro is not None:
            dro.load_state_dict(state["dro"])

    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    train_net = ddp or net

    log = MetricsLog(cfg.out, start_step if resume_from else None, cfg.tensorboard) if main else None
    eval_batches = (lambda: batches_for(cfg.eval_data, shuffle=False, cycle=False)) if cfg.eval_data else None

    def run_eval(step):
        if eval_batches is None:
            return
        rec = evaluate(cfg, net, eval_batches(), k, lam_at(step, total_steps, cfg.lam, cfg.lam_schedule, cfg.lam_end),
                       device, autocast)
        if main:
            log.write({"step": step, **rec})

    def save(step):
        tmp = ckpt.begin(cfg.out, step) if main else Path(cfg.out) / "checkpoints" / f".tmp-step-{step:07d}"
        if main:
            state = {"step": step, "data_position": list(train_batches.position), "worst_group": worst_prev,
                     "worst_switches": switches, "dro": dro.state_dict() if dro else None, "world_size": world}
            ckpt.write_main(tmp, model, tokenizer, optimizer, scheduler, state)
        if world > 1:
            dist.barrier()
        ckpt.write_rng(tmp, rank)
        if world > 1:
            dist.barrier()
        if main:
            ckpt.commit(cfg.out, tmp, step, cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()

    # 3. the loop
    if start_step == 0:
        run_eval(0)
    stop = min(total_steps, cfg.stop_after) if cfg.stop_after else total_steps
    bar = None
    if main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"{cfg.objective}", unit="step", dynamic_ncols=True)
    it = iter(train_batches)
    step = start_step
    while step < stop:
        t0 = time.perf_counter()
        micro = [next(it).to(device) for _ in range(cfg.grad_accum)]
        counts = step_counts(micro, k_loss, device)
        denoms = (counts[0].item(), counts[1].item(), counts[2 : 2 + k_loss].to(device))
        lam = lam_at(step, total_steps, cfg.lam, cfg.lam_schedule, cfg.lam_end)
        acc = torch.zeros(4 + 2 * k_loss, dtype=torch.float64)  # loss, ce, worst, ties, group sums, group counts
        for i, mb in enumerate(micro):
            sync = ddp is None or i == len(micro) - 1  # DDP: all-reduce gradients on the last micro-batch only
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                with autocast():
                    token_loss = train_net(mb.input_ids, mb.position_ids, mb.targets)
                keep = mb.targets != IGNORE
                parts = objective_parts(cfg, token_loss.float(), mb.groups[keep], mb.segments[keep], k_loss, lam,
                                        denoms, dro)
                # denominators are global; DDP averages gradients over ranks, so undo its 1/world
                (parts.loss * world).backward()
            acc[:4] += torch.tensor([parts.loss.item(), float(parts.ce), float(parts.worst), parts.ties], dtype=torch.float64)
            acc[4 : 4 + k_loss] += parts.group_sum.double().cpu()
            acc[4 + k_loss :] += parts.group_count.double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        acc = all_reduce(acc.to(device)).cpu()
        group_loss = (acc[4 : 4 + k_loss] / acc[4 + k_loss :])[:max(k, 1)]
        if dro is not None:
            dro.update(acc[4 : 4 + k_loss] / acc[4 + k_loss :])
        finite = torch.nan_to_num(group_loss, nan=-math.inf)
        worst_group = int(finite.argmax()) if torch.isfinite(finite).any() else None
        if worst_prev is not None and worst_group is not None and worst_group != worst_prev:
            switches += 1
        worst_prev = worst_group if worst_group is not None else worst_prev
        step += 1
        dt = time.perf_counter() - t0
        if main:
            rec = {"step": step, "split": "train", "loss": acc[0].item(), "ce": acc[1].item(), "worst": acc[2].item(),
                   "group_loss": group_loss.tolist(), "worst_group": worst_group, "worst_switches": switches,
                   "ties": int(acc[3].item()), "lam": lam, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": int(counts[2 + k_loss].item()), "loss_tokens": int(counts[0].item()),
                   "tokens_per_s": counts[2 + k_loss].item() / dt, "step_time_s": dt,
                   "epoch": train_batches.position[0]}
            if dro is not None:
                rec["dro_weights"] = dro.weights.tolist()
            if step % cfg.log_every == 0 or step == stop:
                log.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", worst_g=worst_group, tok_s=f"{rec['tokens_per_s']:.0f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            run_eval(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
            save(step)
    if bar is not None:
        bar.close()
    it.close()  # stop the background Parquet reader now, not during interpreter shutdown

    # 4. the end: eval, final model, curves, summary
    summary = {"step": step, "total_steps": total_steps, "finished": step >= total_steps}
    if step >= total_steps:
        run_eval(step)
        if main:
            summary["model_dir"] = str(ckpt.save_final(cfg.out, causal_lm(model) if cfg.lora_r == 0 else model, tokenizer))
    if main:
        log.close()
        records = read_jsonl(Path(cfg.out) / "metrics.jsonl")
        plot_curves(records, Path(cfg.out) / "loss_curves.png",
                    title=f"{cfg.objective} (λ={cfg.lam}, groups={cfg.groups}) — per-group loss")
        table = summary_table(records)
        summary["table"] = table
        atomic_write_text(Path(cfg.out) / "summary.json", json.dumps({k_: v for k_, v in summary.items()}, indent=2) + "\n")
        print(table, flush=True)
    return summary
