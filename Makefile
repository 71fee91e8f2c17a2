# One-command entry points. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedkit-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo test install bench clean-demo

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,formats]'
	touch $(STAMP)

install: $(STAMP)

## demo: the study in configs/mitocheck_demo.yaml on the bundled MitoCheck cells (offline efficientnet_lite0):
## embed, probe with every head, a t-SNE map, CAMs of misclassified cells and the HTML report
demo: $(STAMP)
	$(BIN)/embedkit run configs/mitocheck_demo.yaml

## test: the whole test suite (CPU only, no network), one pytest-xdist worker per core (at most 4);
## each test file runs in one worker, so its fixtures are built once
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean-demo:
	rm -rf store/demo.h5 store/demo.h5.shards store/demo.h5.lock results/demo
