"""sftgo-train against hostile settings, directories, checkpoints and shards: every one is refused in one
sentence (exit 1) or said, never silently trained on.  The numbers in the section titles are the
defects of the hostile-input review they cover."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sftgo.core.fileio import file_sha256
from sftgo.core.shards import ShardError, read_manifest, write_manifest
from sftgo.trainer.config import FIELDS, ConfigError, TrainConfig, ignored_settings
from sftgo.trainer.loop import run
from tests.trainer.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent / "sftgo-train")


def train_cli(*args, timeout=300):
    env = dict(os.environ, SFTGO_CACHE=os.environ.get("SFTGO_CACHE", "/tmp/sftgo-cache"), OMP_NUM_THREADS="1")
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def common(data, model, out):
    return [
        "--data",
        data,
        "--out",
        out,
        "--model",
        model,
        "--batch-tokens",
        160,
        "--max-steps",
        1,
        "--no-progress",
        "--no-tensorboard",
    ]


def one_sentence(proc, *needles):
    """Exit 1 with a single 'Error: ...' line on stderr that contains every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


cfg = functools.partial(tiny_config, max_steps=4)  # a short run on the tiny model


def train_records(out):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def rewrite_shard(shard_dir, edit, *, statistics=True):
    """Apply edit(table) -> table to every shard and record the new checksums in the manifest (so only the
    content contradicts the manifest, never the checksums)."""
    manifest = read_manifest(shard_dir)
    for s in manifest["shards"]:
        path = Path(shard_dir) / s["path"]
        pq.write_table(edit(pq.read_table(path)), path, compression="zstd", write_statistics=statistics)
        s["sha256"] = file_sha256(path)
    write_manifest(shard_dir, manifest)


def map_list_column(table, name, fn):
    """Column `name` (a list<int8> column) with fn(flat values, flat loss_mask) applied to its values."""
    col = table.column(name).combine_chunks()
    mask = table.column("loss_mask").combine_chunks().values.to_numpy().astype(np.int8)
    values = fn(col.values.to_numpy().astype(np.int8), mask)
    new = pa.ListArray.from_arrays(col.offsets, pa.array(values, pa.int8()))
    return table.set_column(table.schema.get_field_index(name), name, new)


def edit_manifest(shard_dir, fn):
    path = Path(shard_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------- 1, 2: every number has its range, before torch
FLOAT_FIELDS = [n for n, f in FIELDS.items() if f.type == "float"]
INT_FIELDS = [n for n, f in FIELDS.items() if f.type == "int"]
# a value out of range for every numeric setting (2): the test below checks that none is missing
OUT_OF_RANGE = {
    "lam": 1.5,
    "lam_end": -0.1,
    "group_weight": 0.0,
    "temperature": -1.0,
    "dro_step": -0.5,
    "epochs": -1.0,
    "lr": -1.0,
    "min_lr_ratio": -50.0,
    "weight_decay": -0.1,
    "clip_grad": -1.0,
    "skip_nonfinite": -1,
    "lora_alpha": 0.0,
    "batch_tokens": 0,
    "max_length": 1,
    "grad_accum": 0,
    "shuffle_buffer": -1,
    "readahead": -1,
    "bucket_pool": 0,
    "max_steps": -1,
    "stop_after": -1,
    "warmup_steps": -5,
    "seed": -1,
    "ce_chunk": 0,
    "ac_every": 0,
    "lora_r": -1,
    "eval_every": -1,
    "eval_batches": -1,
    "save_every": -1,
    "keep_checkpoints": -3,
    "log_every": 0,
}


def test_every_numeric_setting_has_a_tested_range():
    from sftgo.trainer.config import RANGES

    assert sorted(OUT_OF_RANGE) == sorted(FLOAT_FIELDS + INT_FIELDS)
    assert set(OUT_OF_RANGE) <= set(RANGES)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_setting_refuses_non_finite_values(name, bad):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag} must be a finite number"):
        TrainConfig(data="d", out="o", **{name: bad}).validate()


@pytest.mark.parametrize("bad", [(0.9, math.nan), (math.inf, 0.95), (0.9, 1.0), (-0.1, 0.9), (0.9,)])
def test_betas_are_two_finite_numbers_in_0_1(bad):
    with pytest.raises(ConfigError, match="^--betas must be"):
        TrainConfig(data="d", out="o", betas=bad).validate()


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
def test_every_numeric_setting_refuses_a_value_out_of_its_range(name):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag} must "):
        TrainConfig(data="d", out="o", **{name: OUT_OF_RANGE[name]}).validate()


def test_a_setting_of_the_wrong_type_is_one_sentence():
    with pytest.raises(ConfigError, match="^--max-steps must be an integer"):
        TrainConfig(data="d", out="o", max_steps=2.5).validate()
    with pytest.raises(ConfigError, match="^--lam must be a number"):
        TrainConfig(data="d", out="o", lam="0.5").validate()


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--lr", "inf"], "--lr"),
        (["--min-lr-ratio", "nan"], "--min-lr-ratio"),
        (["--objective", "weighted", "--group-weight", "nan"], "--group-weight"),
        (["--temperature", "nan"], "--temperature"),
        (["--dro-step", "inf"], "--dro-step"),
        (["--epochs", "nan", "--max-steps", "0"], "--epochs"),
        (["--lora-r", "2", "--lora-alpha", "inf"], "--lora-alpha"),
        (["--clip-grad", "nan"], "--clip-grad"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--lam-schedule", "linear", "--lam-end", "nan"], "--lam-end"),
    ],
)
def test_cli_refuses_non_finite_numbers_before_training(tmp_path, shared_shard_dir, tiny_model_dir, flags, flag):
    out = tmp_path / "run"
    r = train_cli(*common(shared_shard_dir, tiny_model_dir, out), *flags)
    one_sentence(r, flag, "finite")
    assert not out.exists()  # refused before anything was written


def test_a_toml_config_with_inf_is_refused(tmp_path, shared_shard_dir, tiny_model_dir):
    conf = tmp_path / "c.toml"
    conf.write_text("lr = inf\n")
    out = tmp_path / "run"
    one_sentence(train_cli(*common(shared_shard_dir, tiny_model_dir, out), "--config", conf), "--lr", "finite")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--min-lr-ratio", "-50"], "--min-lr-ratio"),
        (["--warmup-steps", "-5"], "--warmup-steps"),
        (["--stop-after", "-1"], "--stop-after"),
        (["--eval-batches", "-1"], "--eval-batches"),
        (["--lora-r", "-1", "--save-adapter"], "--lora-r"),
        (["--save-every", "-1"], "--save-every"),
        (["--keep-checkpoints", "-3"], "--keep-checkpoints"),
        (["--lr", "-1"], "--lr"),
        (["--shuffle-buffer", "-1"], "--shuffle-buffer"),
        (["--bucket-pool", "0"], "--bucket-pool"),
        (["--max-length", "1"], "--max-length"),
    ],
)
def test_cli_refuses_values_out_of_range_before_training(tmp_path, shared_shard_dir, tiny_model_dir, flags, flag):
    out = tmp_path / "run"
    one_sentence(train_cli(*common(shared_shard_dir, tiny_model_dir, out), *flags), flag, " must ")
    assert not out.exists()


# ---------------------------------------------------------------- 3: --out never clobbers what is not a run
def test_an_existing_directory_that_is_not_a_run_is_refused_untouched(tmp_path, shared_shard_dir, tiny_model_dir):
    proj = tmp_path / "proj"
    (proj / "model").mkdir(parents=True)
    files = {
        proj / "config.json": '{"name": "my project"}\n',
        proj / "summary.json": "{}\n",
        proj / "model" / "NOTES.txt": "my notes\n",
    }
    for path, text in files.items():
        path.write_text(text)
    one_sentence(train_cli(*common(shared_shard_dir, tiny_model_dir, proj)), str(proj), "not an sftgo-train run")
    assert {p: p.read_text() for p in files} == files
    assert sorted(p.name for p in proj.iterdir()) == ["config.json", "model", "summary.json"]  # not even a .lock


def test_out_equal_to_the_model_directory_is_refused(tmp_path, shared_shard_dir, tiny_model_dir):
    copy = tmp_path / "tinycopy"
    shutil.copytree(tiny_model_dir, copy)
    before = (copy / "config.json").read_text()
    one_sentence(train_cli(*common(shared_shard_dir, copy, copy)), "--out", "--model")
    assert (copy / "config.json").read_text() == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_equal_to_or_inside_the_data_is_refused(tmp_path, shard_dir, tiny_model_dir, where):
    before = sorted(p.name for p in shard_dir.iterdir())
    out = shard_dir if where == "same" else shard_dir / "run"
    one_sentence(train_cli(*common(shard_dir, tiny_model_dir, out)), "--out", "--data")
    assert sorted(p.name for p in shard_dir.iterdir()) == before


def test_out_inside_the_eval_data_and_model_inside_out_are_refused(
    tmp_path, shared_shard_dir, eval_dir, tiny_model_dir
):
    with pytest.raises(ConfigError, match="--out .* --eval-data"):
        run(cfg(shared_shard_dir, eval_dir / "run", tiny_model_dir, eval_data=str(eval_dir)))
    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "base")
    (out / "config.json").write_text(cfg(shared_shard_dir, out, tiny_model_dir).to_json())  # a run that never started
    with pytest.raises(ConfigError, match="--model .* --out"):
        run(cfg(shared_shard_dir, out, str(out / "base")))


def test_out_that_is_a_file_is_one_sentence(tmp_path, shared_shard_dir, tiny_model_dir):
    out = tmp_path / "file"
    out.write_text("x")
    one_sentence(train_cli(*common(shared_shard_dir, tiny_model_dir, out)), str(out), "not a directory")


def test_a_run_directory_is_reused_as_documented(tmp_path, shared_shard_dir, tiny_model_dir):
    """An empty directory, a run that failed before its first step, and --resume all still work."""
    empty = tmp_path / "empty"
    empty.mkdir()
    run(cfg(shared_shard_dir, empty, tiny_model_dir, max_steps=1))
    assert (empty / "model" / "config.json").is_file()
    failed = tmp_path / "failed"
    with pytest.raises(Exception):  # noqa: B017 (whatever the failure: the point is what it leaves behind)
        run(cfg(shared_shard_dir, failed, str(tmp_path / "no-such-model"), max_steps=1))
    assert (failed / "config.json").is_file()
    run(cfg(shared_shard_dir, failed, tiny_model_dir, max_steps=2, stop_after=1))
    summary = run(cfg(shared_shard_dir, failed, tiny_model_dir, max_steps=2, resume=True))
    assert summary["finished"] and [r["step"] for r in train_records(failed)] == [1, 2]


# ---------------------------------------------------------------- 4-6: checkpoints are untrusted
@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, shared_shard_dir, tiny_model_dir):
    """Two runs stopped at step 2 of 4: `a` (Group-DRO, lr 3e-3) and `b` (lr 0.1); tests resume copies."""
    base = tmp_path_factory.mktemp("stopped")
    run(cfg(shared_shard_dir, base / "a", tiny_model_dir, stop_after=2, dro_step=0.1))
    run(cfg(shared_shard_dir, base / "b", tiny_model_dir, stop_after=2, dro_step=0.1, lr=0.1))
    return base


@pytest.fixture
def run_a(stopped_runs, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(stopped_runs / "a", out)
    return out


def resume_a(out, data, model, **kw):
    return run(cfg(data, out, model, stop_after=0, dro_step=0.1, resume=True, **kw))


@pytest.mark.parametrize("pointer", ["absolute", "relative", "symlink", "garbage"])
def test_latest_must_name_a_checkpoint_inside_the_run(run_a, stopped_runs, shared_shard_dir, tiny_model_dir, pointer):
    other = stopped_runs / "b" / "checkpoints" / "step-0000002"
    latest = run_a / "checkpoints" / "latest"
    if pointer == "absolute":
        latest.write_text(str(other) + "\n")
    elif pointer == "relative":
        latest.write_text(os.path.relpath(other, run_a / "checkpoints") + "\n")
    elif pointer == "symlink":
        (run_a / "checkpoints" / "step-0000009").symlink_to(other)
        latest.write_text("step-0000009\n")
    else:
        latest.write_bytes(b"\xff\xfe step\n")
    with pytest.raises(ConfigError, match="latest"):
        resume_a(run_a, shared_shard_dir, tiny_model_dir)


def test_a_checkpoint_from_another_run_is_refused(run_a, stopped_runs, shared_shard_dir, tiny_model_dir):
    ckpt = run_a / "checkpoints" / "step-0000002"
    shutil.rmtree(ckpt)
    shutil.copytree(stopped_runs / "b" / "checkpoints" / "step-0000002", ckpt)
    with pytest.raises(ConfigError, match="another run"):
        resume_a(run_a, shared_shard_dir, tiny_model_dir)


def test_a_checkpoint_whose_schedule_or_optimizer_was_changed_is_refused(run_a, shared_shard_dir, tiny_model_dir):
    path = run_a / "checkpoints" / "step-0000002" / "trainer_state.pt"
    original = torch.load(path, weights_only=True)
    tensors = torch.load(path, weights_only=True)
    tensors["scheduler"]["base_lrs"] = [0.5, 0.5]
    torch.save(tensors, path)
    with pytest.raises(ConfigError, match="--lr"):
        resume_a(run_a, shared_shard_dir, tiny_model_dir)
    tensors = original
    tensors["optimizer"]["param_groups"][0]["maximize"] = True  # gradient ascent
    torch.save(tensors, path)
    with pytest.raises(ConfigError, match="maximize"):
        resume_a(run_a, shared_shard_dir, tiny_model_dir)


def test_resume_follows_the_configured_lr(run_a, shared_shard_dir, tiny_model_dir):
    from sftgo.trainer.optim import lr_factor

    resume_a(run_a, shared_shard_dir, tiny_model_dir)
    recs = train_records(run_a)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[2]["lr"] == pytest.approx(3e-3 * lr_factor(2, 0, 4, 0.1))


@pytest.mark.parametrize(
    "key, value",
    [
        ("step", -3),
        ("step", "1"),
        ("step", True),
        ("step", 3),
        ("step", 99),
        ("data_position", [0, -1]),
        ("data_position", "0,2"),
        ("data_position", [0, 99]),
        ("worst_group", 5),
        ("worst_group", "1"),
        ("worst_switches", -1),
        ("world_size", 0),
        ("truncated_samples", -4),
        ("data_sha256", "abc"),
        ("dro", {"weights": [1.0], "step_size": 0.1}),
        ("dro", {"weights": [math.nan, 0.5], "step_size": 0.1}),
        ("dro", None),
        ("run_id", 7),
    ],
)
def test_a_tampered_trainer_state_is_refused_naming_the_entry(run_a, shared_shard_dir, tiny_model_dir, key, value):
    path = run_a / "checkpoints" / "step-0000002" / "trainer_state.json"
    state = json.loads(path.read_text())
    state[key] = value
    path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=f"trainer_state.json.*'{key}'"):
        resume_a(run_a, shared_shard_dir, tiny_model_dir)
    assert [r["step"] for r in train_records(run_a)] == [1, 2]  # nothing was trained


def test_a_trainer_state_that_is_not_json_is_one_sentence(run_a, shared_shard_dir, tiny_model_dir):
    (run_a / "checkpoints" / "step-0000002" / "trainer_state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="trainer_state.json is not valid JSON"):
        resume_a(run_a, shared_shard_dir, tiny_model_dir)


def test_a_pickle_in_a_checkpoint_is_refused_in_our_own_words(run_a, shared_shard_dir, tiny_model_dir):
    import argparse

    torch.save({"scheduler": argparse.Namespace(x=1)}, run_a / "checkpoints" / "step-0000002" / "trainer_state.pt")
    with pytest.raises(ConfigError) as info:
        resume_a(run_a, shared_shard_dir, tiny_model_dir)
    message = str(info.value)
    assert "trainer_state.pt" in message and "weights_only" not in message and len(message.splitlines()) == 1


def test_resume_with_a_stop_after_already_reached_is_refused(run_a, shared_shard_dir, tiny_model_dir):
    with pytest.raises(ConfigError, match="--stop-after 2 is not past"):
        run(cfg(shared_shard_dir, run_a, tiny_model_dir, stop_after=2, dro_step=0.1, resume=True))


# ---------------------------------------------------------------- 7: the declared number of groups
def test_a_declared_group_that_no_token_is_in_is_refused_for_rho1_and_weighted(tmp_path, shard_dir, tiny_model_dir):
    edit_manifest(shard_dir, lambda m: m["strategies"]["tfidf"].update(num_groups=3))
    for objective in ("rho1", "weighted"):
        out = tmp_path / objective
        one_sentence(train_cli(*common(shard_dir, tiny_model_dir, out), "--objective", objective), "group 2", "tfidf")
        assert not out.exists()


def test_a_declared_group_that_no_token_is_in_is_said_for_sftgo(tmp_path, shard_dir, tiny_model_dir, capsys):
    edit_manifest(shard_dir, lambda m: m["strategies"]["tfidf"].update(num_groups=3))
    run(cfg(shard_dir, tmp_path / "run", tiny_model_dir, max_steps=1))
    assert "group 2" in capsys.readouterr().err


@pytest.mark.parametrize("statistics", [True, False])
def test_a_group_id_beyond_the_declared_groups_is_refused_naming_the_shard(
    tmp_path, shard_dir, tiny_model_dir, statistics
):
    rewrite_shard(
        shard_dir,
        lambda t: map_list_column(t, "group_tfidf", lambda g, m: np.where(g == 1, 2, g)),
        statistics=statistics,
    )
    with pytest.raises(ShardError, match=r"shard-0000\d\.parquet.*group"):
        run(cfg(shard_dir, tmp_path / "run", tiny_model_dir, max_steps=1))


def test_resume_refuses_a_changed_strategy_entry_in_the_manifest(run_a, shared_shard_dir, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shared_shard_dir, data)
    edit_manifest(data, lambda m: m["strategies"]["tfidf"].update(num_groups=3))  # shards (and checksums) unchanged
    with pytest.raises(ConfigError, match="tfidf.*manifest|manifest.*tfidf"):
        resume_a(run_a, data, tiny_model_dir)


def test_the_summary_table_takes_records_with_different_numbers_of_groups():
    from sftgo.trainer.metrics import summary_table

    records = [
        {"step": 1, "split": "train", "loss": 1.0, "group_loss": [1.0, 2.0, None]},
        {"step": 2, "split": "train", "loss": 0.5, "group_loss": [0.5, 1.5]},
        {"step": 2, "split": "eval", "loss": 0.5, "group_loss": [0.5]},
        {"step": 3, "split": "eval", "loss": 0.4, "group_loss": [0.4, 0.3, 0.2]},
    ]
    table = summary_table(records)
    assert "group 2" in table and "0.2000" in table


# ---------------------------------------------------------------- 8: shard content that contradicts the manifest
@pytest.mark.parametrize("statistics", [True, False])  # refused from the footers before training, or while reading
@pytest.mark.parametrize(
    "column, fn, needle",
    [
        ("group_tfidf", lambda g, m: np.full_like(g, -1), "group"),
        ("group_tfidf", lambda g, m: np.where(m == 0, 0, g), "group"),
        ("loss_mask", lambda g, m: np.where(g == 1, 2, g), "loss_mask"),
    ],
)
def test_shard_content_contradicting_the_manifest_is_refused_naming_the_shard(
    tmp_path, shard_dir, tiny_model_dir, column, fn, needle, statistics
):
    rewrite_shard(shard_dir, lambda t: map_list_column(t, column, fn), statistics=statistics)
    with pytest.raises(ShardError, match=rf"shard-0000\d\.parquet.*{needle}"):
        run(cfg(shard_dir, tmp_path / "run", tiny_model_dir, max_steps=0, epochs=1))
    assert not (tmp_path / "run" / "model").exists()


def test_contradicting_shards_are_refused_before_torch_loads(tmp_path, shard_dir, tiny_model_dir):
    rewrite_shard(shard_dir, lambda t: map_list_column(t, "group_tfidf", lambda g, m: np.full_like(g, -1)))
    out = tmp_path / "run"
    one_sentence(train_cli(*common(shard_dir, tiny_model_dir, out)), "shard-00000.parquet", "group_tfidf")
    assert not out.exists()


def test_columns_of_different_lengths_in_a_row_are_refused(tmp_path, shard_dir, tiny_model_dir):
    def shorter(table):
        col = table.column("group_tfidf").combine_chunks()
        rows = [v[:-1] for v in col.to_pylist()]
        return table.set_column(
            table.schema.get_field_index("group_tfidf"), "group_tfidf", pa.array(rows, pa.list_(pa.int8()))
        )

    rewrite_shard(shard_dir, shorter)
    with pytest.raises(ShardError, match=r"shard-0000\d\.parquet.*length"):
        run(cfg(shard_dir, tmp_path / "run", tiny_model_dir, max_steps=1))


def test_a_run_that_trained_on_no_token_of_its_objective_fails(
    tmp_path, tokenizer, fingerprint, shardkit, tiny_model_dir
):
    """rho1 on data whose important tokens all lie past --max-length: every step trains on nothing."""
    records = shardkit.make_records(16, 500, seed=3, min_len=30, max_len=30)
    for r in records:
        mask = [0] * 4 + [1] * 26
        r["loss_mask"] = mask
        r["group_tfidf"] = [-1] * 4 + [0] * 16 + [1] * 10
    data = shardkit.write_shards(
        tmp_path / "data",
        records,
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no token"):
        run(cfg(data, out, tiny_model_dir, objective="rho1", max_length=12, max_steps=2))
    assert not (out / "model").exists()


# ---------------------------------------------------------------- 10: nothing given is ignored without a word
def test_an_unknown_groups_strategy_is_refused_for_sft(tmp_path, shared_shard_dir, tiny_model_dir):
    out = tmp_path / "run"
    one_sentence(
        train_cli(*common(shared_shard_dir, tiny_model_dir, out), "--objective", "sft", "--groups", "nosuchstrategy"),
        "nosuchstrategy",
    )
    assert not out.exists()


def test_report_to_tensorboard_with_no_tensorboard_is_refused(tmp_path, shared_shard_dir, tiny_model_dir):
    out = tmp_path / "run"
    one_sentence(
        train_cli(*common(shared_shard_dir, tiny_model_dir, out), "--report-to", "tensorboard"),
        "--report-to tensorboard",
        "--no-tensorboard",
    )
    assert not out.exists()


def test_an_unknown_tracker_is_refused_before_torch():
    with pytest.raises(ConfigError, match="--report-to 'nosuch'"):
        TrainConfig(data="d", out="o", report_to=["nosuch"]).validate()


@pytest.mark.parametrize(
    "objective, setting, name",
    [
        ("rho1", dict(lam=0.5), "lam"),
        ("sft", dict(temperature=1.0), "temperature"),
        ("dft", dict(group_weight=2.0), "group_weight"),
        ("weighted", dict(dro_step=0.1), "dro_step"),
        ("rho1", dict(lam_schedule="linear"), "lam_schedule"),
        ("sft", dict(reduce="batch"), "reduce"),
        ("sftgo", dict(group_weight=2.0), "group_weight"),
        ("sftgo", dict(lam=0.0, reduce="batch"), "reduce"),
        ("sftgo", dict(lam=0.0, temperature=0.5), "temperature"),
        ("sftgo", dict(lam=0.0, dro_step=0.5), "dro_step"),
    ],
)
def test_objective_specific_settings_the_objective_does_not_read_are_noted(objective, setting, name):
    notes = ignored_settings(TrainConfig(data="d", out="o", objective=objective, **setting).validate())
    assert any(n.startswith("--" + name.replace("_", "-") + " is ignored") for n in notes), notes


def test_sft_on_data_without_the_default_groups_says_so(tmp_path, tokenizer, fingerprint, shardkit):
    from sftgo.trainer.preflight import check_data, data_notes

    data = shardkit.write_shards(
        tmp_path / "data",
        shardkit.make_records(8, 500, strategies=("other",)),
        strategies=("other",),
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
    )
    c = TrainConfig(data=str(data), out=str(tmp_path / "o"), objective="sft").validate()
    manifest, column, k = check_data(c)
    assert column is None
    assert any("'tfidf'" in n and "other" in n for n in data_notes(c, manifest))


# ---------------------------------------------------------------- 11: the Hugging Face integration checks the same
@pytest.fixture(scope="module")
def hf_parts(tiny_model_dir, tmp_path_factory):
    from transformers import TrainingArguments

    from sftgo.core.models import load_causal_lm

    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("hf")),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=2,
    )
    return load_causal_lm(tiny_model_dir, dtype=torch.float32), args


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(lam=1.5), "lam"),
        (dict(lam=math.nan), "lam"),
        (dict(temperature=-1.0), "temperature"),
        (dict(lam_end=math.inf), "lam_end"),
        (dict(group_weight=0.0, objective="weighted"), "group_weight"),
        (dict(reduce="max"), "reduce"),
        (dict(num_groups=1), "num_groups"),
    ],
)
def test_sftgo_trainer_refuses_what_sftgo_train_refuses(hf_parts, shared_shard_dir, kw, needle):
    from sftgo.trainer.hf import SFTGOCollator, SFTGOTrainer, load_shards

    model, args = hf_parts
    with pytest.raises(ConfigError, match=f"^{needle} must "):
        SFTGOTrainer(
            model=model,
            args=args,
            train_dataset=load_shards(str(shared_shard_dir)),
            data_collator=SFTGOCollator(0),
            **kw,
        )


def test_sftgo_trainer_warns_about_a_setting_its_objective_does_not_read(hf_parts, shared_shard_dir):
    from sftgo.trainer.hf import SFTGOCollator, SFTGOTrainer, load_shards

    model, args = hf_parts
    with pytest.warns(UserWarning, match="lam is ignored: only objective sftgo reads it, not rho1"):
        SFTGOTrainer(
            model=model,
            args=args,
            train_dataset=load_shards(str(shared_shard_dir)),
            data_collator=SFTGOCollator(0),
            objective="rho1",
            lam=0.5,
        )


def test_sftgo_trainer_takes_the_number_of_groups_from_the_manifest(
    hf_parts, shard_dir, tmp_path, shardkit, tokenizer, fingerprint
):
    from sftgo.trainer.hf import SFTGOCollator, SFTGOTrainer, load_shards

    model, args = hf_parts
    with pytest.raises(ConfigError, match="num_groups=3.*2 groups"):
        SFTGOTrainer(
            model=model,
            args=args,
            train_dataset=load_shards(str(shard_dir)).select(range(10)),
            data_collator=SFTGOCollator(0),
            objective="rho1",
            num_groups=3,
        )
    three = shardkit.write_shards(
        tmp_path / "three",
        shardkit.make_records(8, 500, num_groups=3),
        num_groups=3,
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
    )
    trainer = SFTGOTrainer(
        model=model, args=args, train_dataset=load_shards(str(three)), data_collator=SFTGOCollator(0), objective="rho1"
    )
    assert trainer.sftgo.num_groups == 3
    edit_manifest(shard_dir, lambda m: m["strategies"]["tfidf"].update(num_groups=3))
    with pytest.raises(ConfigError, match="group 2"):
        SFTGOTrainer(
            model=model,
            args=args,
            train_dataset=load_shards(str(shard_dir)),
            data_collator=SFTGOCollator(0),
            objective="rho1",
        )


def test_the_collator_refuses_a_loss_mask_that_is_not_0_or_1():
    from sftgo.trainer.hf import SFTGOCollator

    features = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 2, 1, 1], "group_tfidf": [-1, 0, 0, 1]}]
    with pytest.raises(ShardError, match="loss_mask"):
        SFTGOCollator(0)(features)
    features = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1], "group_tfidf": [-1, -1, 0, 1]}]
    with pytest.raises(ShardError, match="group"):
        SFTGOCollator(0)(features)


def test_the_example_reports_a_missing_data_directory_in_one_sentence(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "hf_trainer.py"),
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    one_sentence(proc, "nope")


# ---------------------------------------------------------------- where the run writes
def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_and_data_may_not_nest_through_a_symlink(shard_dir, tiny_model_dir, tmp_path):
    before = tree(shard_dir)
    into = tmp_path / "into-data"
    into.symlink_to(shard_dir)
    one_sentence(train_cli(*common(shard_dir, tiny_model_dir, into / "run")), "lies inside --data")
    around = tmp_path / "around-data"
    around.symlink_to(shard_dir.parent)
    one_sentence(train_cli(*common(shard_dir, tiny_model_dir, around)), f"--data {shard_dir} lies inside --out")
    assert tree(shard_dir) == before and not (shard_dir / "run").exists()


def test_a_read_only_run_folder_is_one_sentence(shard_dir, tiny_model_dir, tmp_path, read_only):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        for out in (ro / "run", ro):
            line = one_sentence(train_cli(*common(shard_dir, tiny_model_dir, out)), f"--out {out}", "not writable")
            assert "Errno" not in line
    assert not any(ro.iterdir())


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss_curves.png", "config.json", "model", "checkpoints"])
def test_a_link_where_the_run_writes_is_refused_and_its_target_kept(shard_dir, tiny_model_dir, tmp_path, name):
    """A run directory holding a symlink where the run writes a file or a folder: never written through
    (the target elsewhere keeps its bytes) nor replaced."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "sftgo-run.json").write_text(json.dumps({"run_id": "abc"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("mine")
    target = elsewhere if name in ("model", "checkpoints") else elsewhere / "keep"
    (out / name).symlink_to(target)
    one_sentence(train_cli(*common(shard_dir, tiny_model_dir, out)), str(out / name), "symlink")
    assert (out / name).is_symlink() and tree(elsewhere) == {"keep": b"mine"}


def test_an_out_that_is_a_regular_file_is_refused(shard_dir, tiny_model_dir, tmp_path):
    path = tmp_path / "file"
    path.write_text("mine")
    one_sentence(train_cli(*common(shard_dir, tiny_model_dir, path)), f"--out {path}", "not a directory")
    assert path.read_text() == "mine"
