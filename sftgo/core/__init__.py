"""The shared core: what pipeline, grouping and trainer all rely on (nothing here imports them).

  shards.py   the shard contract: manifest read/write/verify, checksums, atomic writes
  models.py   model and tokenizer resolution (embedded GGUF, local dirs, hub ids)
"""
