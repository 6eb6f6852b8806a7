"""Recurrence backends for one LSTM layer (all directions at once). Imported as bilstm_fast.kernels.

Each backend module exposes `recurrence_forward` and `recurrence_backward` with the contract
in contract.py. A new backend: its module here, its name in BACKENDS, recurrence_module and
available_backends; the tests (the `backend` fixture) and the benchmark (a `fast-<name>` column)
then pick it up.
"""
import importlib

BACKENDS = ("auto", "vectorized", "triton")


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device):
    """The concrete backends that run on `device` (a torch.device or a string), in the order
    'auto' prefers them. The tests' `backend` fixture and the benchmark's implementation list
    both come from here: a new backend is tested and benchmarked once it is listed here."""
    device_type = getattr(device, "type", str(device).split(":")[0])
    names = []
    if device_type == "cuda" and triton_available():
        names.append("triton")
    names.append("vectorized")
    return names


def resolve_backend(name, device):
    """Name of the backend that runs on `device`: 'auto' prefers Triton on CUDA."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "vectorized"
    return name


def recurrence_module(name):
    """The module implementing a resolved backend name."""
    module = {"vectorized": "vectorized", "triton": "triton_recurrence"}[name]
    return importlib.import_module(f"{__name__}.{module}")
