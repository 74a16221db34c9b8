"""sftgo-prep: instruction data -> chat-formatted, tokenized, scored and grouped Parquet shards (Dask).

cli.py is the command; build.py runs a build (readers.py, formats.py, chat.py and prepare.py are its
first pass, finalize.py its second), score.py adds a strategy to a build, inspect.py shows one.
The importance strategies themselves live in sftgo.grouping; the shard contract in sftgo.core.shards.
"""
