# `make demo` and `make test` each set everything up on a fresh machine (a .venv in the repo).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-all

.PHONY: demo test setup train protos clean emulate-aarch64

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all]"
	# timm imports torchvision; PyPI's newer torchvision does not load beside the CPU torch 2.13
	# wheel, 0.16.2 does (a ViT never calls its compiled ops). --no-deps keeps its torch pin away.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps timm==1.0.31 torchvision==0.16.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# Retrain the committed checkpoint: from scratch with four learned bottlenecks, then a fine-tune
# (about 5 + 3 minutes on one GPU; many hours on a 2-core CPU).
train: $(STAMP)
	$(VENV)/bin/splitinfer-export train --device auto --epochs 50 --split 1 --seed 1 \
		--canvases-per-epoch 14000 --bottleneck-dims 64,32,16,8 --out checkpoints/vit-cluttered-mnist.base.pt
	$(VENV)/bin/splitinfer-export train --device auto --epochs 30 --seed 2 --lr 5e-4 \
		--canvases-per-epoch 14000 --init-from checkpoints/vit-cluttered-mnist.base.pt \
		--out checkpoints/vit-cluttered-mnist.pt

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

# The edge under aarch64 user-mode emulation against a server on loopback (root, slow; see README).
emulate-aarch64: $(STAMP)
	bash scripts/emulate_aarch64.sh

clean:
	rm -rf $(VENV) .venv-ort116 artifacts results .pytest_cache
