# vlaprep: `make demo` (set up + run the main job on generated data), `make test` (set up + run tests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[validate,test]'
	touch $(STAMP)

demo: setup
	$(BIN)/vlaprep demo --output demo_out

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf demo_out build *.egg-info
