"""The shared core: what pipeline, grouping and trainer all rely on (nothing here imports them).

  shards.py   the shard contract: column names, schema, manifest read/write/verify, checksums,
              atomic writes, the directory lock
  models.py   model and tokenizer resolution (embedded GGUF, local dirs, hub ids)
"""
