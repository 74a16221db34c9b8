"""SFT-GO through the Hugging Face `Trainer`: sftgo shards in, a fine-tuned model out (CPU is fine).

    python examples/hf_trainer.py --data out/demo/shards --out runs/hf --max-steps 10 \\
        [--model NAME] [--objective sftgo|sft|rho1|dft|weighted] [--groups tfidf] [--lam 0.9] [--grad-accum 2]

Input: a shard directory of `sftgo-prep build` and a causal LM (default: the embedded SmolLM2).
Output: RUN_DIR with the Trainer's checkpoints, `trainer_log.jsonl` (loss and per-group loss per
logging step) and the final model in RUN_DIR/model.  Everything else the Trainer offers (accelerate,
DeepSpeed, FSDP, report_to, callbacks) works as usual: this is a plain `transformers.Trainer`.
Cost: the model's forward and backward per micro-batch; about a second a step for SmolLM2-135M on
2 CPU cores at 2 samples per micro-batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import TrainingArguments

from sftgo.core.errors import SftgoError
from sftgo.core.models import load_causal_lm, load_tokenizer
from sftgo.core.text import safe_text
from sftgo.trainer import registry
from sftgo.trainer.hf import SFTGOCollator, SFTGOTrainer, load_shards


def main() -> None:
    """Bad data, a missing model or a bad setting: one sentence on stderr and exit code 1."""
    try:
        train()
    except SftgoError as exc:
        print(f"Error: {safe_text(str(exc))}", file=sys.stderr)
        sys.exit(1)


def train() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, help="shard directory written by sftgo-prep build (required)")
    ap.add_argument("--out", required=True, help="run directory: checkpoints, trainer_log.jsonl, model/ (required)")
    ap.add_argument("--model", default=None, help="model to fine-tune [default: the embedded SmolLM2-135M-Instruct]")
    ap.add_argument("--max-steps", type=int, required=True, help="optimizer steps to train (required)")
    ap.add_argument(
        "--objective",
        default="sftgo",
        choices=registry.names(),
        help="training objective (installed plug-ins too) [default: sftgo]",
    )
    ap.add_argument(
        "--group-weight",
        type=float,
        default=1.0,
        help="--objective weighted: the weight on the important group [default: 1.0]",
    )
    ap.add_argument(
        "--groups", default="tfidf", help="strategy whose group_<name> column defines the groups [default: tfidf]"
    )
    ap.add_argument(
        "--lam", type=float, default=0.9, help="--objective sftgo: λ, the worst-group weight [default: 0.9]"
    )
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate [default: 1e-4]")
    ap.add_argument("--batch-size", type=int, default=2, help="samples per micro-batch [default: 2]")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step [default: 1]")
    args = ap.parse_args()

    dataset = load_shards(args.data, groups=args.groups)  # first: bad data is refused before a model loads
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model).train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTGOTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=SFTGOCollator(pad, groups=args.groups),
        objective=args.objective,
        lam=args.lam,
        group_weight=args.group_weight,
    )
    trainer.train()
    out = Path(args.out)
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    log = [r for r in trainer.state.log_history if "loss" in r]
    (out / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    first, last = log[0], log[-1]
    groups = sorted(k for k in last if k.startswith("group_"))
    print(f"{args.objective} (λ={args.lam}, groups={args.groups}): {len(log)} logged steps")
    for key in ["loss", *groups]:
        print(f"  {key:14s} {first[key]:.4f} -> {last[key]:.4f}")
    print(f"Model: {out / 'model'}")


if __name__ == "__main__":
    main()
