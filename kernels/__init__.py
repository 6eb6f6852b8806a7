"""Recurrence backends for one LSTM layer (all directions at once). Imported as bilstm_fast.kernels.

Each backend module exposes `recurrence_forward` and `recurrence_backward` with the contract
in contract.py. A new backend: its module here, its name in BACKENDS, recurrence_module and
available_backends; the tests (the `backend` fixture) and the benchmark (a `fast-<name>` column)
then pick it up.
"""
import importlib
import warnings

import torch

BACKENDS = ("auto", "vectorized", "triton", "native")

_warned_native = False


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def native_available():
    """Whether the native CPU extension is built and loads here."""
    from bilstm_fast.kernels import native

    return native.available()


def available_backends(device):
    """The concrete backends that run on `device` (a torch.device or a string), in the order
    'auto' prefers them. The tests' `backend` fixture and the benchmark's implementation list
    both come from here: a new backend is tested and benchmarked once it is listed here."""
    device_type = getattr(device, "type", str(device).split(":")[0])
    names = []
    if device_type == "cuda" and triton_available():
        names.append("triton")
    if device_type == "cpu" and native_available():
        names.append("native")
    names.append("vectorized")
    return names


def _native_or_fallback(dtype):
    """'native' when it loads and runs this dtype, else 'vectorized' (saying why, once, when the
    extension itself is missing; other dtypes are simply the vectorized backend's)."""
    global _warned_native
    from bilstm_fast.kernels import native

    if not native.available():
        if not _warned_native:
            _warned_native = True
            warnings.warn(
                f"bilstm_fast: {native.UNAVAILABLE_REASON}; FastBiLSTM runs the slower vectorized "
                "backend on the CPU. Reinstall with a C++ compiler present "
                "(pip install --no-build-isolation .) to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
        return "vectorized"
    return "native" if dtype in native.DTYPES else "vectorized"


def resolve_backend(name, device, dtype=torch.float32):
    """Name of the backend that runs on `device` for `dtype`.

    'auto': Triton on CUDA when it imports, native on the CPU for fp32/fp64 when it is built,
    vectorized otherwise. 'native' on anything it cannot run (another device or dtype, or not
    built) falls back to vectorized as well.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return _native_or_fallback(dtype) if device.type == "cpu" else "vectorized"
    if name == "native":
        return _native_or_fallback(dtype) if device.type == "cpu" else "vectorized"
    return name


def recurrence_module(name):
    """The module implementing a resolved backend name."""
    module = {"vectorized": "vectorized", "triton": "triton_recurrence", "native": "native"}[name]
    return importlib.import_module(f"{__name__}.{module}")
