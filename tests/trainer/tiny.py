"""The settings of a short training run on the tiny test model and the test shards: a TrainConfig of a few
160-token steps that ends in seconds on a CPU (tests override any field with keyword arguments)."""

from __future__ import annotations

from sftgo.trainer.config import TrainConfig


def tiny_config(data, out, model, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        model=model,
        max_steps=2,
        batch_tokens=160,
        lr=3e-3,
        progress=False,
        tensorboard=False,
        shuffle_buffer=8,
        bucket_pool=2,
    )
    return TrainConfig(**{**base, **kw})
