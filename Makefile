# Two entry points for a fresh machine (see README.md): `make quickstart` and `make test`.
# Both create .venv and install everything first; torch/torchvision come from the machine's local
# wheel store through plain pip (uv/poetry would download several GB).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install quickstart test test-slow bench
install: $(STAMP)

# train → evaluate (k-NN) → export on the real CIFAR-10 sample bundled in data/, then the demo on it
# (http://127.0.0.1:7860, Ctrl-C stops it; `make quickstart DEMO=0` stops after the evaluation)
DEMO ?= 1
quickstart: $(STAMP)
	$(BIN)/sslhub train recipes/simclr_cifar10.yaml --out runs/quickstart --overwrite \
	  --set encoder.model_args.channels=[32,64,128,256] --set data.batch_size=128 \
	  --set train.max_steps=40 --set optim.warmup_epochs=1
	$(BIN)/sslhub eval knn --model runs/quickstart/export --train data/cifar10-sample --test data/cifar10-sample
	@if [ "$(DEMO)" = 1 ]; then echo "demo of runs/quickstart/export on http://127.0.0.1:7860 (Ctrl-C stops it)"; \
	  GRADIO_ANALYTICS_ENABLED=False $(BIN)/python demos/app.py; fi

# the import contracts (pyproject.toml [tool.importlinter]: no cycles, layers), then the default test tier
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m pip install -q 'lightly>=1.5'
	$(BIN)/python bench/train_throughput.py
