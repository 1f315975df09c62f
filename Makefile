# The README's two commands: `make run` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/ml100k.yaml
# The CPU build of torch 2.13.0 lies on disk on these machines; the constraint keeps any
# dependency from pulling a multi-GB CUDA build instead.
PIP := $(BIN)/pip install --quiet --constraint constraints.txt

.PHONY: run test lint venv clean

$(BIN)/gcnee: pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,serve]'
	touch $(BIN)/gcnee

venv: $(BIN)/gcnee

run: venv
	$(BIN)/gcnee fit --config $(CONFIG) $(ARGS)

test: venv
	$(BIN)/ruff check .
	$(BIN)/pytest $(ARGS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
