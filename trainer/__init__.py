"""sftgo-train: a lean streaming trainer for SFT-GO (and plain SFT / Rho-1) on sftgo shards.

Read in this order:
    objectives.py  the losses (sftgo_loss, rho1, sft), λ schedules, Group-DRO, chunked token CE
    data.py        shard streaming: seeded shuffling, disjoint per rank, bounded memory
    batching.py    token-budget batches (length-bucketed padding or packing), counted truncation,
                   collation, data position
    model.py       loading (LoRA, checkpointing) and the per-token-loss module DDP wraps
    step.py        one training step anyone can call: micro-batches -> objective -> backward
    checkpoint.py  atomic checkpoints and the final model directory
    resume.py      what --resume may change (refused, allowed, applied)
    metrics.py     metrics.jsonl, TensorBoard, loss-curve PNG, summary table
    fsdp.py        FSDP2 sharding, sharded checkpoints, the consolidated final weights
    hostmem.py     on a CPU, glibc's mmap threshold fixed (freed activations go back to the kernel)
    loop.py        run(config): the training loop, top to bottom
    config.py      TrainConfig, the one typed configuration
    cli.py         the sftgo-train command
"""
