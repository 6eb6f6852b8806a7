"""Recurrence backends for one LSTM layer (all directions at once). Imported as bilstm_fast.kernels.

Each backend module exposes `recurrence_forward` and `recurrence_backward` with the contract
documented in vectorized.py.
"""
import importlib

BACKENDS = ("auto", "vectorized", "triton")


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
