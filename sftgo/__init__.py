"""sftgo: token-importance supervised fine-tuning (SFT-GO, arXiv 2506.15021).

Installed as one package (the repository keeps the folders at its top level):
  sftgo.core      the shard contract (columns, manifest), atomic writes and checksums, locks,
                  the user-facing error types, typed config files, model/tokenizer resolution
                  -- imported by all below
  sftgo.grouping  importance strategies (one file each, one registry) and group assignment
  sftgo.pipeline  `sftgo-prep`: read -> normalise -> tokenize -> score -> group -> write (Dask)
  sftgo.trainer   `sftgo-train`: streaming, batching, objectives, the training step, the loop
Imports flow one way: core <- grouping <- pipeline; core <- trainer.
"""

__version__ = "0.1.0"
