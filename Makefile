# `make demo` and `make test` each set everything up on a fresh machine (a .venv in the repo).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-all

.PHONY: demo test setup train protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# Retrain the committed checkpoint (about 2.5 minutes on one GPU; many hours on a 2-core CPU).
train: $(STAMP)
	$(VENV)/bin/splitinfer-export train --device auto --epochs 40 --split 2 --seed 1 \
		--canvases-per-epoch 14000 --out checkpoints/vit-cluttered-mnist.pt

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) artifacts results .pytest_cache
