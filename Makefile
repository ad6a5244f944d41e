# Everyday commands. `make demo` goes from a fresh clone to a trained Fashion-MNIST model on a CPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/fashion-mnist
DEMO_ARGS ?= --preset fashion-mnist --epochs 1 --name demo
EXTRAS ?= dev

.PHONY: venv data demo demo-steps test lint

venv: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes (the stamp is older); torch alone is a few GB.
# EXTRAS adds optional extras: `make venv EXTRAS=dev,wandb,mlflow` (CI does, so the tracker tests run).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	touch $@

# Idempotent: the script skips a folder it has already prepared.
data: venv
	$(PY) -m classifier.fashion_mnist $(DATA)

# Times everything demo-steps does, venv and data preparation included; no time is printed if a step fails.
demo:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory demo-steps && \
	seconds=$$(( $$(date +%s) - start )) && \
	echo "demo finished in $$((seconds / 60)) min $$((seconds % 60)) s"

# The demo run always starts afresh; train.py itself refuses to overwrite an existing run.
demo-steps: venv data
	rm -rf runs/demo
	$(PY) train.py $(DEMO_ARGS)
	@echo "demo run written to runs/demo/ (metrics.jsonl, checkpoints/, plots/); view: tensorboard --logdir runs"

# The lint runs first: a line over 110 characters or an unformatted file fails `make test`, so CI.
# pytest's exit code 5 (no tests collected) fails this target like any other non-zero exit.
# One pytest worker per core (pytest-xdist), each test file whole on one worker (its module fixtures
# built once), one PyTorch thread per worker: on 2 cores this about halves the suite's time (README,
# "Tests"), as two single-threaded processes keep both cores busy through the imports, subprocess
# starts and small-batch steps where one two-threaded process leaves one idle.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile --durations=25

# ruff check: errors, imports, line length (110, pyproject.toml); ruff format --check: the layout.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
