# `make demo` and `make test` each set everything up on a fresh machine (a .venv in the repo).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-all
# The device and server roles without torch: what a Pi owner or an operator installs.
EDGE_VENV  := .venv-edge
EDGE_STAMP := $(EDGE_VENV)/.installed-edge

.PHONY: demo test test-torch-free setup train train-text bench-text protos clean emulate-aarch64 test-models

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

test: $(STAMP) $(EDGE_STAMP)
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-torch-free

$(EDGE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[edge,cloud,text,dev]"
	touch $(EDGE_STAMP)

# tests/protos, tests/edge and tests/cloud in a venv without torch, from the committed model folders
test-torch-free: $(EDGE_STAMP)
	@$(EDGE_VENV)/bin/python -c "import importlib.util, sys; sys.exit('torch is installed in $(EDGE_VENV)' if importlib.util.find_spec('torch') else 0)"
	$(EDGE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/protos tests/edge tests/cloud

# Rewrite tests/models (the committed tiny model folders) after a change to what export writes
test-models: $(STAMP)
	$(PY) scripts/make_test_models.py

# Retrain the committed checkpoint: from scratch with four learned bottlenecks, then a fine-tune
# (about 5 + 3 minutes on one GPU; many hours on a 2-core CPU).
train: $(STAMP)
	$(VENV)/bin/splitinfer-export train --device auto --epochs 50 --split 1 --seed 1 \
		--canvases-per-epoch 14000 --bottleneck-dims 64,32,16,8 --out checkpoints/vit-cluttered-mnist.base.pt
	$(VENV)/bin/splitinfer-export train --device auto --epochs 30 --seed 2 --lr 5e-4 \
		--canvases-per-epoch 14000 --init-from checkpoints/vit-cluttered-mnist.base.pt \
		--out checkpoints/vit-cluttered-mnist.pt

# The BBC News heads of benchmarks/text_classification.py (about a minute on one GPU; slow on a CPU),
# and the benchmark itself (fine-tune if asked, export, serve, classify the test articles; < 20 min on 2 cores)
train-text: $(STAMP)
	$(PY) -m splitinfer.export.text_finetune --out checkpoints/minilm-bbcnews-heads.pt \
		--report checkpoints/minilm-bbcnews-heads.json

bench-text: $(STAMP)
	$(PY) benchmarks/text_classification.py

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

# The edge under aarch64 user-mode emulation against a server on loopback (root, slow; see docs/device.md).
emulate-aarch64: $(STAMP)
	bash scripts/emulate_aarch64.sh

clean:
	rm -rf $(VENV) $(EDGE_VENV) .venv-ort116 artifacts results .pytest_cache
