# skutag: the same commands run here, in CI (.ci/run) and on a newcomer's machine.
VENV          ?= .venv
PY            := $(VENV)/bin/python
SKUTAG        := $(VENV)/bin/skutag
STAMP         := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Where PyPI's default torch wheel is a CUDA build, point this at a CPU index, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX   ?=
PYTEST_ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench bench-writer bench-intake bench-submit bench-pipeline bench-backfill bench-engine bench-gpu bench-memory bench-review clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with skutag and its dev tools (CPU torch where there is no NVIDIA GPU)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
	  $(PY) -m pip install -q torch; \
	else \
	  echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: install ## tag a generated sample catalog end to end: no server, no GPU, no network
	$(SKUTAG) demo

test: install ## run the whole test suite (needs Postgres and Redis; .ci/run starts them)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install ## the unit tests only: no services, no worker subprocesses
	$(PY) -m pytest -m "not postgres and not redis and not slow" $(PYTEST_ARGS)

lint: install ## ruff, mypy and hadolint (deploy/*.Dockerfile), as CI runs them
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint deploy/*.Dockerfile

format: install ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: bench-writer bench-intake bench-submit bench-pipeline bench-backfill bench-review ## every CPU benchmark (results go to docs/benchmarks.md by hand)

bench-review: install ## review app: queue page p95 at 1M results / 100k queued, bulk accept of 10k (minutes: seeds Postgres)
	$(SKUTAG) bench review

bench-writer: install ## writer vs naive per-row insert, into the local Postgres
	$(SKUTAG) bench writer

bench-intake: install ## image intake vs the article's snippet, per core
	$(SKUTAG) bench intake

bench-submit: install ## jobs/s from a catalog file into Redis vs one .delay() per job
	$(SKUTAG) bench submit

bench-backfill: install ## backfill planning / enqueue / memory on synthetic catalogs up to 1M items
	$(SKUTAG) bench backfill

bench-pipeline: install ## Redis + Celery + Postgres end to end vs a plain in-process loop
	$(SKUTAG) bench pipeline

bench-memory: install ## peak RSS of `skutag run` on 1,000 large images vs 1,000 small ones
	$(SKUTAG) bench memory

bench-engine: install ## CPU, tiny models (both tokenizers): forward passes per image and images/s
	$(SKUTAG) bench engine

bench-gpu: install ## the real Qwen3-VL-8B architecture, random weights: int8 / nf4 / bf16 vs the article's way
	$(SKUTAG) bench gpu

clean: ## remove the virtualenv, caches and demo output
	rm -rf $(VENV) .skutag .mypy_cache .ruff_cache .pytest_cache skutag.db
