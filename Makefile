# The two commands of the README: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
RUN ?= runs/demo
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Trains the tiny recipe on the built-in synthetic dataset (CPU is fine), exports G_ema, writes a sample grid.
demo: install
	$(BIN)/ganpipe train recipes/stylegan2/tiny.yaml run_dir=$(RUN) --resume auto
	$(BIN)/ganpipe export $(RUN) --out $(RUN)/export
	$(BIN)/ganpipe generate $(RUN)/export --seeds 0-31 --trunc 0.7 --out $(RUN)/generated.png
	@echo "demo run dir: $(RUN) (samples/, checkpoints/, export/, generated.png)"

# Triton kernels, where present, run on the CPU under the interpreter.
test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check pipeline tests tools

clean-demo:
	rm -rf $(RUN)
