"""Nothing silent in training (issue 10): no sample cut to fit a micro-batch, truncation counted,
--resume refuses changes, one training per run directory, TensorBoard, the final model's form."""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftgo.core.models import ModelNotFound, load_tokenizer
from sftgo.core.shards import read_manifest
from sftgo.trainer import resume
from sftgo.trainer.config import FIELDS, ConfigError, TrainConfig, read_config_file
from sftgo.trainer.loop import run
from tests.trainer.tiny import tiny_config

BIN = str(Path(sys.executable).parent / "sftgo-train")


cfg = functools.partial(tiny_config, max_steps=4)  # a short run on the tiny model


def train_records(out):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


# ---------------------------------------------------------------- item 1: nothing cut to fit a micro-batch
@pytest.mark.parametrize("pack", [False, True])
def test_one_epoch_with_a_small_batch_budget_trains_every_supervised_token_once(
    tmp_path, shard_dir, tiny_model_dir, pack
):
    """--batch-tokens 16 is below most samples (8..40 tokens): each supervised token is still trained."""
    out = tmp_path / "run"
    summary = run(cfg(shard_dir, out, tiny_model_dir, max_steps=0, epochs=1, batch_tokens=16, pack=pack))
    recs = train_records(out)
    assert len(recs) == summary["total_steps"]
    assert sum(r["loss_tokens"] for r in recs) == read_manifest(shard_dir)["totals"]["loss_tokens"]
    assert (summary["truncated_samples"], summary["truncated_loss_tokens"], summary["skipped_samples"]) == (0, 0, 0)
    assert max(r["tokens"] for r in recs) > 16  # the long samples were trained whole, over the budget


def test_truncation_at_max_length_is_counted_and_reported(tmp_path, shard_dir, tiny_model_dir, capsys):
    out = tmp_path / "run"
    summary = run(cfg(shard_dir, out, tiny_model_dir, max_steps=0, epochs=1, max_length=12))
    recs = train_records(out)
    total = read_manifest(shard_dir)["totals"]["loss_tokens"]
    assert summary["truncated_samples"] > 0 and summary["skipped_samples"] > 0  # some kept only prompt tokens
    assert recs[-1]["truncated_loss_tokens"] == summary["truncated_loss_tokens"] > 0
    assert sum(r["loss_tokens"] for r in recs) + summary["truncated_loss_tokens"] == total
    assert f"truncated at --max-length 12: {summary['truncated_samples']} samples" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["skipped_samples"] == summary["skipped_samples"]


# ---------------------------------------------------------------- item 3: --resume refuses changes
def test_every_setting_is_classified_for_resume():
    classes = [resume.SHAPES_RUN, resume.BY_CONTENT, resume.OPERATIONAL, resume.EXTENSIBLE]
    names = [n for c in classes for n in c]
    assert sorted(names) == sorted(FIELDS) and len(names) == len(set(names))


@pytest.fixture(scope="module")
def stopped_template(tmp_path_factory, shared_shard_dir, tiny_model_dir):
    """A run stopped at step 2 of 4, trained once for the module on the train shards; tests resume copies."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run(cfg(shared_shard_dir, out, tiny_model_dir, stop_after=2))
    return out


@pytest.fixture
def stopped_run(stopped_template, tmp_path, shard_dir):
    """A copy of the stopped run, as if trained on this test's shard_dir (the same shards, which it may change)."""
    out = tmp_path / "run"
    shutil.copytree(stopped_template, out)
    config = json.loads((out / "config.json").read_text())
    config.update(data=str(shard_dir), out=str(out))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


@pytest.mark.parametrize(
    "change, flag",
    [
        (dict(lr=1e-3), "--lr"),
        (dict(seed=1), "--seed"),
        (dict(lam=0.5), "--lam"),
        (dict(model="embedded"), "--model"),
        (dict(betas=(0.9, 0.99)), "--betas"),
        (dict(max_steps=3), "--max-steps"),
    ],
)
def test_resume_refuses_a_changed_setting_naming_it(stopped_run, shard_dir, tiny_model_dir, change, flag):
    change = dict(change)
    with pytest.raises(ConfigError, match=f"different {flag} "):
        run(cfg(shard_dir, stopped_run, change.pop("model", tiny_model_dir), resume=True, **change))


def test_resume_refuses_other_shards_at_the_same_path(
    stopped_run, shard_dir, tiny_model_dir, shardkit, tokenizer, fingerprint
):
    shutil.rmtree(shard_dir)
    shardkit.write_shards(
        shard_dir,
        shardkit.make_records(48, 500, seed=9),
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    with pytest.raises(ConfigError, match="not the ones this run was trained on"):
        run(cfg(shard_dir, stopped_run, tiny_model_dir, resume=True))


def test_resume_allows_operational_changes_and_a_moved_copy_of_the_data(
    stopped_run, shard_dir, tiny_model_dir, tmp_path
):
    moved = tmp_path / "moved"
    shutil.copytree(shard_dir, moved)
    summary = run(
        cfg(
            moved,
            stopped_run,
            tiny_model_dir,
            resume=True,
            log_every=2,
            save_every=1,
            keep_checkpoints=1,
            readahead=0,
            ce_chunk=7,
        )
    )
    assert summary["finished"] and summary["step"] == 4


def test_resume_applies_more_steps_and_says_what_happens_to_the_schedule(
    stopped_run, shard_dir, tiny_model_dir, capsys
):
    summary = run(cfg(shard_dir, stopped_run, tiny_model_dir, resume=True, max_steps=6))
    assert summary["step"] == 6 and summary["finished"]
    err = capsys.readouterr().err
    assert "--max-steps raised from 4 to 6" in err and "recomputed for 6 steps" in err
    recs = train_records(stopped_run)
    assert [r["step"] for r in recs] == list(range(1, 7))
    from sftgo.trainer.optim import lr_factor

    assert recs[2]["lr"] == pytest.approx(3e-3 * lr_factor(2, 0, 6, 0.1))  # step 3 on the 6-step schedule
    assert json.loads((stopped_run / "config.json").read_text())["max_steps"] == 6


def test_a_missing_rng_file_is_an_error(stopped_run, shard_dir, tiny_model_dir):
    (stopped_run / "checkpoints" / "step-0000002" / "rng-rank0.pt").unlink()
    with pytest.raises(ConfigError, match="has no rng-rank0.pt"):
        run(cfg(shard_dir, stopped_run, tiny_model_dir, resume=True))


# ---------------------------------------------------------------- item 4: one training per run directory
@pytest.mark.slow
def test_a_second_training_into_the_same_out_is_refused(tmp_path, shard_dir, tiny_model_dir):
    out = tmp_path / "run"
    env = dict(os.environ, SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"), OMP_NUM_THREADS="1")
    args = [
        "--data",
        shard_dir,
        "--out",
        out,
        "--model",
        tiny_model_dir,
        "--batch-tokens",
        160,
        "--no-progress",
        "--no-tensorboard",
    ]
    first = subprocess.Popen(
        [BIN, *map(str, args), "--max-steps", "100000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = out / ".lock"
        for _ in range(6000):  # wait until the first run holds the lock (its pid is written into it)
            if first.poll() is not None or (lock.is_file() and lock.read_text().strip() == str(first.pid)):
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(
            [BIN, *map(str, args), "--max-steps", "1"], env=env, capture_output=True, text=True, timeout=300
        )
        assert first.poll() is None  # the first is still training
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert lines == [
        f"Error: Another training run (pid {first.pid}) is writing to {out}; wait for it or choose another --out."
    ]


# ---------------------------------------------------------------- item 5: TensorBoard is never silently off
def test_tensorboard_missing_is_said_once_by_default_and_an_error_when_asked_for(
    tmp_path, shard_dir, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as on a machine without it (find_spec -> None)
    run(cfg(shard_dir, tmp_path / "a", tiny_model_dir, max_steps=1, tensorboard=None))
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1
    with pytest.raises(ConfigError, match="--tensorboard needs the tensorboard package"):
        run(cfg(shard_dir, tmp_path / "b", tiny_model_dir, max_steps=1, tensorboard=True))
    run(cfg(shard_dir, tmp_path / "c", tiny_model_dir, max_steps=1, tensorboard=False))
    assert "tensorboard" not in capsys.readouterr().err


# ---------------------------------------------------------------- item 16: the final model's form
def test_final_model_keeps_the_loaded_dtype_and_its_own_use_cache(tmp_path, shard_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16)
    out = tmp_path / "run"
    run(cfg(shard_dir, out, str(bf16), max_steps=2, stop_after=1))
    ckpt = load_file(str(out / "checkpoints" / "step-0000001" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in ckpt.values())  # checkpoints stay fp32 for an exact resume
    run(cfg(shard_dir, out, str(bf16), max_steps=2, resume=True))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    start = load_file(str(bf16 / "model.safetensors"))
    assert any(not torch.equal(start[k], weights[k]) for k in start)


def test_bf16_on_a_cpu_with_native_bf16_autocasts_and_keeps_fp32_weights(tmp_path, shard_dir, tiny_model_dir):
    """--precision bf16 on CPU: bf16 autocast where the CPU has native bf16 (the first step's loss is fp32's
    within bf16 rounding, the checkpoint stays fp32), one sentence where it has none."""
    from sftgo.trainer.distributed import bf16_native
    from sftgo.trainer.metrics import read_jsonl

    if not bf16_native(torch.device("cpu")):
        with pytest.raises(ConfigError, match="needs a GPU or a CPU with native bf16"):
            run(cfg(shard_dir, tmp_path / "bf16", tiny_model_dir, max_steps=1, precision="bf16"))
        return
    first = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        run(cfg(shard_dir, out, tiny_model_dir, max_steps=2, stop_after=1, precision=precision))
        first[precision] = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "train"][0]["ce"]
        ckpt = load_file(str(out / "checkpoints" / "step-0000001" / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in ckpt.values())
    assert first["bf16"] != first["fp32"]  # it did compute in bf16
    assert abs(first["bf16"] - first["fp32"]) < 0.02 * first["fp32"]


def test_a_model_directory_without_tokenizer_files_says_which_are_missing(tmp_path, tiny_model_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model_dir) / name, bare / name)
    with pytest.raises(
        ModelNotFound, match="has no tokenizer: it holds no tokenizer.json .* nor tokenizer_config.json"
    ):
        load_tokenizer(str(bare))


# ---------------------------------------------------------------- config files are typed
@pytest.mark.parametrize(
    "suffix, text",
    [(".json", '{"tensorboard": "false"}'), (".toml", 'lam = "0.3"\n'), (".yaml", "trust_remote_code: 'false'\n")],
)
def test_a_config_value_of_the_wrong_type_is_one_sentence_naming_the_key(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    key = {".json": "tensorboard", ".toml": "lam", ".yaml": "trust_remote_code"}[suffix]
    with pytest.raises(ConfigError, match=f"Setting '{key}' must be"):
        read_config_file(str(path))


def test_a_yaml_config_file_sets_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: d\nout: o\nbetas: [0.9, 0.99]\nmax-steps: 5\ntensorboard: false\n")
    values = read_config_file(str(path))
    assert values == {"data": "d", "out": "o", "betas": (0.9, 0.99), "max_steps": 5, "tensorboard": False}
    assert dataclasses.replace(TrainConfig(), **values).validate().betas == (0.9, 0.99)
