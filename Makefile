# One-command entry points. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embedkit-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo test install bench clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## demo: embed the bundled MitoCheck cells with the offline efficientnet_lite0 encoder, then probe them
demo: $(STAMP)
	$(BIN)/embedkit embed tests/data/mitocheck --store store/demo.h5 --encoder efficientnet_lite0 --group-by mitocheck
	$(BIN)/embedkit probe store/demo.h5 --heads all --out results/demo

## test: the whole test suite (CPU only, no network)
test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf store/demo.h5 store/demo.h5.partial results/demo
