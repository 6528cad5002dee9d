# vlaprep: `make demo` (set up + run the main job on generated data), `make test` (set up + run tests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, pinned: an unpinned torch (pulled in by an extra) would fetch GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[validate,test]'
	# timm + torchvision for OpenVLA's code (tests/pipelines/validate, benchmarks/validate_benchmark.py), kept out of the main
	# env: PyPI's torchvision cannot import against the CPU torch, which would break transformers' image models.
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/openvla-deps timm==0.9.16 torchvision==0.28.0
	touch $(STAMP)

demo: setup
	$(BIN)/vlaprep demo --output $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/stats_benchmark.py
	$(BIN)/python benchmarks/shards_benchmark.py

clean:
	rm -rf $(DEMO_OUT) build *.egg-info
