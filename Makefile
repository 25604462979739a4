# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FUSION ?= llava
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo install clean bench notebooks

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the releases available on this machine's disk.
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# two pytest-xdist workers, one per core, each test module on one worker (its module fixtures run once)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadscope $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --fusion $(FUSION)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py all

# run the notebooks with their real settings and save them with their outputs (~20 min on 2 cores)
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py

clean:
	rm -rf $(VENV) outputs lightning_logs
