"""sftgo.trainer.hf (issue 11.3): the collator's labels and groups equal sftgo-train's batching
after HF's one-position shift; SFTGOTrainer's loss and gradients equal sftgo-train's step on the
same micro-batches (accumulated-batch denominators included); a 3-step Trainer run with
gradient_accumulation_steps=2 ends with the same weights as sftgo-train's step function driven
over the same batches; and the shipped example runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sftgo.core.models import load_causal_lm
from sftgo.core.shards import group_column
from sftgo.trainer.batching import IGNORE, collate
from sftgo.trainer.hf import SFTGOCollator, SFTGOTrainer, load_shards
from sftgo.trainer.model import TokenLossModel
from sftgo.trainer.step import Objective, backward_step

ROOT = Path(__file__).resolve().parents[2]


def _samples(features: list[dict]) -> list[dict]:
    """The same rows as sftgo-train's ShardStream yields them."""
    out = []
    for f in features:
        mask = np.asarray(f["loss_mask"], np.int8)
        groups = np.where(mask == 1, np.asarray(f[group_column("tfidf")], np.int8), -1).astype(np.int8)
        out.append(
            {
                "id": f["id"],
                "input_ids": np.asarray(f["input_ids"], np.int32),
                "loss_mask": mask,
                "groups": groups,
                "length": len(mask),
            }
        )
    return out


@pytest.fixture
def dataset(shard_dir):
    return load_shards(str(shard_dir), groups="tfidf")


@pytest.mark.parametrize("pack", [False, True])
def test_collator_keeps_groups_aligned_with_the_shifted_labels(dataset, pack):
    features = [dataset[i] for i in range(6)]
    hf = SFTGOCollator(0, groups="tfidf", pack=pack)(features)
    rows = [_samples(features)] if pack else [[s] for s in _samples(features)]
    ours = collate(rows, 0, pack)
    # HF models predict labels[t + 1] at position t: shift, then compare with our targets
    np.testing.assert_array_equal(hf["input_ids"].numpy(), ours.input_ids.numpy())
    np.testing.assert_array_equal(hf["labels"][:, 1:].numpy(), ours.targets[:, :-1].numpy())
    np.testing.assert_array_equal(hf["sftgo_groups"][:, 1:].numpy(), ours.groups[:, :-1].numpy())
    assert (ours.targets[:, -1] == IGNORE).all()
    if pack:
        np.testing.assert_array_equal(hf["position_ids"].numpy(), ours.position_ids.numpy())
        assert "attention_mask" not in hf
    else:
        assert (hf["attention_mask"].sum(1).numpy() == [len(f["input_ids"]) for f in features]).all()


def _trainer(model, dataset, tmp_path, objective, accum, trl=False, **kw):
    from transformers import TrainingArguments

    if trl:  # the same trainer on top of TRL's SFTTrainer, fed our pre-tokenized shards
        from trl import SFTConfig

        from sftgo.core.models import load_tokenizer
        from sftgo.trainer.hf import trl_trainer_class

        TrainingArguments = SFTConfig  # noqa: N806
        kw.update(max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
        extra = {"processing_class": load_tokenizer(None)}
    cls = trl_trainer_class() if trl else SFTGOTrainer
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=accum,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        **kw,
    )
    return cls(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SFTGOCollator(0, groups="tfidf"),
        objective=objective,
        lam=0.9,
        **(extra if trl else {}),
    )


@pytest.mark.parametrize("objective, trl", [("sftgo", False), ("sft", False), ("rho1", False), ("sftgo", True)])
def test_loss_and_gradients_equal_sftgo_train(dataset, tiny_model_dir, tmp_path, objective, trl):
    features = [dataset[i] for i in range(6)]
    ours_model = load_causal_lm(tiny_model_dir, dtype=torch.float32).train()
    hf_model = load_causal_lm(tiny_model_dir, dtype=torch.float32).train()
    micro = [
        collate([[s] for s in _samples(features[:3])], 0, False),
        collate([[s] for s in _samples(features[3:])], 0, False),
    ]
    stats = backward_step(TokenLossModel(ours_model), micro, Objective(objective, 2), 0.9)

    trainer = _trainer(hf_model, dataset, tmp_path, objective, accum=2, trl=trl)
    collator = SFTGOCollator(0, groups="tfidf")
    batches, n_items = trainer.get_batch_samples(
        iter([collator(features[:3]), collator(features[3:])]), 2, torch.device("cpu")
    )
    loss = sum(float(trainer.training_step(hf_model, b, n_items)) for b in batches)
    assert loss == pytest.approx(stats.loss, rel=1e-5)
    for (name, p), q in zip(ours_model.named_parameters(), hf_model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_three_accumulated_steps_give_the_same_weights(dataset, tiny_model_dir, tmp_path):
    ours_model = load_causal_lm(tiny_model_dir, dtype=torch.float32).train()
    hf_model = load_causal_lm(tiny_model_dir, dtype=torch.float32).train()
    trainer = _trainer(hf_model, dataset, tmp_path, "sftgo", accum=2, max_steps=3)
    trainer.train()

    # sftgo-train's step function over the same micro-batches (3 samples each, dataset order)
    opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    net = TokenLossModel(ours_model)
    features = [dataset[i] for i in range(18)]
    for step in range(3):
        chunk = features[6 * step : 6 * step + 6]
        micro = [
            collate([[s] for s in _samples(chunk[:3])], 0, False),
            collate([[s] for s in _samples(chunk[3:])], 0, False),
        ]
        backward_step(net, micro, Objective("sftgo", 2), 0.9)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(ours_model.named_parameters(), hf_model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-4, atol=1e-6, msg=name)
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3 and all("group_1_loss" in r and "group_0_loss" in r for r in logged)


def test_example_runs_end_to_end(shard_dir, tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "hf_trainer.py"),
            "--data",
            str(shard_dir),
            "--out",
            str(tmp_path / "run"),
            "--model",
            tiny_model_dir,
            "--max-steps",
            "2",
            "--grad-accum",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "group_1_loss" in proc.stdout and (tmp_path / "run" / "model" / "config.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
