"""sftgo-train: a lean streaming trainer on sftgo shards, for SFT-GO and its baselines.

The objectives (docs/method.md): sftgo (worst-group), sft (plain token-mean CE), rho1 (CE over the
important group only), dft (each token's CE times its detached probability) and weighted (CE with a
fixed weight on the important group).

Read in this order:
    objectives.py  the losses (sftgo, sft, rho1, dft, weighted), λ schedules, Group-DRO, chunked token CE
    data.py        shard streaming: seeded shuffling, disjoint per rank, bounded memory
    batching.py    token-budget batches (length-bucketed padding or packing), counted truncation,
                   collation (padded rows or one flat padding-free row), data position
    attention.py   padding-free attention: each sample of a flat row attends to itself (varlen kernels)
    model.py       loading (LoRA, checkpointing) and the per-token-loss module DDP wraps
    step.py        one training step anyone can call: micro-batches -> objective -> backward
    preflight.py   the checks before torch loads: run directory, manifest, shards, groups
    checkpoint.py  atomic checkpoints and the final model directory
    resume.py      what --resume may change (refused, allowed, applied)
    metrics.py     metrics.jsonl, TensorBoard, loss-curve PNG, summary table
    fsdp.py        FSDP2 sharding, sharded checkpoints, the consolidated final weights
    hostmem.py     on a CPU, glibc's mmap threshold fixed (freed activations go back to the kernel)
    stopping.py    Ctrl-C stops the run between two steps, not inside one
    loop.py        run(config): the training loop, top to bottom
    config.py      TrainConfig, the one typed configuration
    cli.py         the sftgo-train command
    hf.py          the same objectives inside a Hugging Face Trainer (load_shards, SFTGOCollator, SFTGOTrainer)
"""
