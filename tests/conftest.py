"""Fixtures and markers for the whole suite. Shared helpers (tolerances, the nn.LSTM/FastBiLSTM
pair, the forward-and-all-gradients helper) are plain functions in helpers.py.

Markers (registered in pytest.ini):
  cuda         needs a CUDA GPU: skipped here when none is visible
  slow         over a few seconds each on a 2-core CPU: `pytest -m "not slow and not interpreter"` is the inner loop,
               plain `pytest` (what CI runs) includes them
  interpreter  runs Triton kernels under TRITON_INTERPRET=1 when there is no GPU
"""
import pytest
import torch

from bilstm_fast.kernels import available_backends

# The backends FastBiLSTM can run on for the CPU tensors these tests use. A backend listed by
# available_backends("cpu") is run by every test that takes the `backend` fixture: parity,
# robustness and property tests. (Triton runs on CUDA tensors: test_triton.py, test_cuda.py.)
CPU_BACKENDS = available_backends("cpu")


@pytest.fixture(params=CPU_BACKENDS, scope="session")
def backend(request):
    """Each backend that runs on the CPU, by name (session-scoped so hypothesis tests take it)."""
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(no_gpu)
