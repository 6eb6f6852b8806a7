"""The machine line: CPU/GPU, versions, nn.LSTM's engine, commit and load."""
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from bilstm_fast.kernels import native, triton_available

from .implementations import lstm_engine


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo, or None where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


def cpu_bf16(flags):
    """Which of the bf16 GEMM instructions the CPU has ({flag: bool}), None where unknown: with AMX
    oneDNN's bf16 LSTM runs 2.5-3x faster than its fp32 (benchmarks/NOTES.md), so a bf16 row means
    something else on a CPU without it."""
    return None if flags is None else {flag: flag in flags for flag in BF16_FLAGS}


def native_bf16_gemm():
    """What the native backend's bf16 GEMMs run on, in its own words, where it says."""
    describe = getattr(native, "bf16_gemm", None)
    return describe() if native.available() and describe is not None else None


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def allocator():
    """The C allocator the run's tensors come from, as far as the environment says: CPU times
    depend on it. With glibc's defaults, freed large blocks go back to the kernel and fault in
    again on reuse, which costs nn.LSTM's (oneDNN's) training step far more than the native
    backend's (benchmarks/NOTES.md attempt 34)."""
    preload = [Path(p).name for p in os.environ.get("LD_PRELOAD", "").split() if "alloc" in Path(p).name]
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    if preload:
        return "LD_PRELOAD " + " ".join(preload)
    return "glibc malloc" + (f" ({', '.join(tunables)})" if tunables else ", defaults")


def machine_info(device):
    info = {
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": None,
        "nn_lstm_engine": lstm_engine(device),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "native": native.simd_level() if native.available() else f"not available: {native.UNAVAILABLE_REASON}",
        "allocator": allocator(),
        "cpu_bf16": cpu_bf16(cpu_flags()),
        "native_bf16_gemm": native_bf16_gemm(),
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_line(info):
    where = f"GPU {info['gpu']} (CUDA {info['cuda']}, cuDNN {info['cudnn']})" if info["device"] == "cuda" else "CPU"
    load = info.get("load_average_start")
    load_text = f", load avg {load[0]:.2f} at start" if load else ""
    busy = f"; LOADED: {info['busy_process']}" if info.get("busy_process") else ""
    return (f"{where}; CPU {info['cpu']} ({info['cpu_cores']} cores, torch threads {info['torch_threads']}); "
            f"{bf16_text(info)}; "
            f"torch {info['torch']}, triton {info['triton']}; nn.LSTM engine: {info['nn_lstm_engine']}; "
            f"native backend: {info.get('native')}; allocator: {info.get('allocator')}{busy}{load_text}")


def bf16_text(info):
    """'bf16: AMX yes, AVX512-BF16 yes, native bf16 GEMM: ...' for the machine line."""
    flags = info.get("cpu_bf16")
    if flags is None:
        text = "bf16: CPU flags unknown (no /proc/cpuinfo)"
    else:
        amx = "yes" if flags["amx_bf16"] and flags["amx_tile"] else "no"
        text = f"bf16: AMX {amx}, AVX512-BF16 {'yes' if flags['avx512_bf16'] else 'no'}"
    gemm = info.get("native_bf16_gemm")
    return text + (f", native bf16 GEMM: {gemm}" if gemm else "")


def device_slug(info):
    name = info.get("gpu") if info["device"] == "cuda" else info["cpu"]
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*", "", name.lower())
    return f"{info['device']}-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")
