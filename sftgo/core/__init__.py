"""The shared core: what pipeline, grouping and trainer all rely on (nothing here imports them).

shards.py   the shard contract: column names, schema, manifest read/write/verify
fileio.py   atomic writes, file checksums, the process umask, one remove helper
locks.py    the directory lock (exclusive for writers, shared for readers)
errors.py   SftgoError, the type of every error meant for the user, and ConfigError
models.py   model and tokenizer resolution (embedded GGUF, local dirs, hub ids)
config.py   JSON/TOML/YAML config files, checked against the dataclass field types
text.py     data-derived text made safe for a terminal
machine.py  the CPU's model name, for bench and experiment reports
"""
