"""The loop in-process on a tiny model: exact resume, objectives, pre-flight checks, artifacts."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftgo.core.shards import ShardError
from sftgo.trainer.config import ConfigError
from sftgo.trainer.loop import run
from tests.trainer.tiny import tiny_config

cfg = functools.partial(tiny_config, max_steps=6, warmup_steps=1)  # a short run on the tiny model


def weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(pack=True, grad_accum=2, lam_schedule="cosine", max_length=64, dro_step=0.3),
    ],
)
def test_resume_equivalence_straight_vs_half_plus_resume(tmp_path, shard_dir, tiny_model_dir, extra):
    """N steps straight == N/2 steps, stop, --resume, N/2 steps (same final weights on CPU)."""
    straight = tmp_path / "straight"
    run(cfg(shard_dir, straight, tiny_model_dir, **extra))
    halves = tmp_path / "halves"
    first = run(cfg(shard_dir, halves, tiny_model_dir, stop_after=3, **extra))
    assert not first["finished"] and not (halves / "model").exists()
    assert (halves / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    run(cfg(shard_dir, halves, tiny_model_dir, resume=True, **extra))
    assert_same_weights(weights(straight), weights(halves))
    # the metrics file holds every step exactly once, as if never interrupted
    steps = [r["step"] for r in map(json.loads, (halves / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 7))
    straight_loss = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    halves_loss = [json.loads(line)["loss"] for line in (halves / "metrics.jsonl").read_text().splitlines()]
    assert straight_loss == pytest.approx(halves_loss, abs=1e-6)


def test_training_changes_weights_and_lowers_loss(tmp_path, shard_dir, tiny_model_dir):
    out = tmp_path / "run"
    run(cfg(shard_dir, out, tiny_model_dir, max_steps=12, lr=1e-2))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["ce"] < recs[0]["ce"]
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    end = weights(out)
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_sft_objective_equals_sftgo_with_lambda_zero(tmp_path, shard_dir, tiny_model_dir):
    run(cfg(shard_dir, tmp_path / "sft", tiny_model_dir, objective="sft", max_steps=3))
    run(cfg(shard_dir, tmp_path / "go0", tiny_model_dir, objective="sftgo", lam=0.0, max_steps=3))
    run(cfg(shard_dir, tmp_path / "go9", tiny_model_dir, objective="sftgo", lam=0.9, max_steps=3))
    assert_same_weights(weights(tmp_path / "sft"), weights(tmp_path / "go0"), atol=0)
    a, b = weights(tmp_path / "sft"), weights(tmp_path / "go9")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_rho1_and_epochs_mode_and_eval_records(tmp_path, shard_dir, eval_dir, tiny_model_dir):
    out = tmp_path / "rho"
    summary = run(
        cfg(
            shard_dir,
            out,
            tiny_model_dir,
            objective="rho1",
            max_steps=0,
            epochs=1,
            eval_data=str(eval_dir),
            eval_every=2,
            grad_accum=2,
        )
    )
    from sftgo.core.shards import group_column, read_manifest
    from sftgo.trainer.batching import Batches
    from sftgo.trainer.data import ShardStream

    b = Batches(
        ShardStream(str(shard_dir), read_manifest(shard_dir), group_column("tfidf"), seed=0, shuffle_buffer=8),
        batch_tokens=160,
        max_length=2048,
        pack=False,
        pool_batches=2,
        seed=0,
        pad_id=0,
    )
    assert summary["total_steps"] == b.count(0) // 2
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == summary["total_steps"]
    assert all(len(r["group_loss"]) == 2 for r in evals)
    train = [r for r in recs if r["split"] == "train"]
    # rho1 trains on group 1 only: its loss is the important group's CE
    assert all(r["loss"] == pytest.approx(r["group_loss"][1], rel=1e-5) for r in train)


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, shard_dir, tiny_model_dir):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(cfg(shard_dir, tmp_path / "none", tiny_model_dir, resume=True))
    out = tmp_path / "r"
    run(cfg(shard_dir, out, tiny_model_dir, max_steps=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg(shard_dir, out, tiny_model_dir, max_steps=1))
    with pytest.raises(ConfigError, match="different --batch-tokens"):
        run(cfg(shard_dir, out, tiny_model_dir, max_steps=1, resume=True, batch_tokens=999))


def test_foreign_tokenizer_is_refused(tmp_path, shardkit, tiny_model_dir):
    d = shardkit.write_shards(tmp_path / "foreign", shardkit.make_records(8, 100), fingerprint="another-vocab")
    with pytest.raises(ShardError, match="tokenized with"):
        run(cfg(d, tmp_path / "out", tiny_model_dir))


def test_missing_groups_column_names_the_option(tmp_path, shard_dir, tiny_model_dir):
    with pytest.raises(ShardError, match="no 'semantic' groups"):
        run(cfg(shard_dir, tmp_path / "out", tiny_model_dir, groups="semantic"))


def test_corrupted_shard_is_named(tmp_path, shard_dir, tiny_model_dir):
    shard = shard_dir / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.parquet does not match its checksum"):
        run(cfg(shard_dir, tmp_path / "out", tiny_model_dir))


def test_checkpoint_is_atomic_and_pruned(tmp_path, shard_dir, tiny_model_dir):
    out = tmp_path / "ck"
    run(cfg(shard_dir, out, tiny_model_dir, max_steps=4, save_every=1, keep_checkpoints=2))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step-0000003", "step-0000004"]  # no temporary directories left behind
    state = json.loads((out / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"][1] == 4
    assert not any(p.name.startswith(".") for p in out.iterdir() if p.name != ".lock")  # the run's lock file stays


def test_gradient_checkpointing_and_smaller_ce_chunks_do_not_change_training(tmp_path, shard_dir, tiny_model_dir):
    run(cfg(shard_dir, tmp_path / "plain", tiny_model_dir, max_steps=2))
    run(cfg(shard_dir, tmp_path / "ckpt", tiny_model_dir, max_steps=2, grad_checkpointing=True))
    run(cfg(shard_dir, tmp_path / "chunk", tiny_model_dir, max_steps=2, ce_chunk=7))
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "ckpt"), atol=1e-6)
    # other chunks sum the lm_head gradient in another order: fp32 rounding, which AdamW's g/sqrt(v)
    # turns into up to ~6e-5 on rows whose gradient is near zero; a real difference would be ~lr (3e-3)
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "chunk"), atol=3e-4)


@pytest.mark.parametrize("extra", [dict(reduce="batch"), dict(temperature=0.5), dict(dro_step=0.5)])
def test_objective_options_train_and_log(tmp_path, shard_dir, tiny_model_dir, extra):
    out = tmp_path / "opt"
    run(cfg(shard_dir, out, tiny_model_dir, max_steps=2, **extra))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in recs)
    if "dro_step" in extra:
        w = recs[-1]["dro_weights"]
        assert sum(w) == pytest.approx(1.0) and w != [0.5, 0.5]


def test_lora_trains_adapters_resumes_exactly_and_ships_a_merged_model(tmp_path, shard_dir, tiny_model_dir):
    pytest.importorskip("peft")
    extra = dict(lora_r=4, lr=1e-2, max_steps=4)
    run(cfg(shard_dir, tmp_path / "straight", tiny_model_dir, **extra))
    run(cfg(shard_dir, tmp_path / "halves", tiny_model_dir, stop_after=2, **extra))
    assert (tmp_path / "halves" / "checkpoints" / "step-0000002" / "adapter_model.safetensors").is_file()
    run(cfg(shard_dir, tmp_path / "halves", tiny_model_dir, resume=True, **extra))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "halves")
    assert not any("lora" in k for k in a)  # merged: a plain model transformers loads without peft
    assert_same_weights(a, b)
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.equal(start[k], a[k]) for k in start)


def test_three_quantile_groups_end_to_end(tmp_path, shardkit, tokenizer, fingerprint, tiny_model_dir):
    d = shardkit.write_shards(
        tmp_path / "k3", shardkit.make_records(24, 500, num_groups=3), num_groups=3, fingerprint=fingerprint
    )
    out = tmp_path / "run"
    run(cfg(d, out, tiny_model_dir, max_steps=2))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["group_loss"]) == 3 for r in recs)
    assert recs[-1]["worst_group"] in (0, 1, 2)
