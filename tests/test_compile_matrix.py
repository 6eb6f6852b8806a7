"""The compile matrix (benchmarks/compile_matrix.py) in CI: the planner's picks, compiled for
sm_80/sm_90 with Triton's bundled ptxas (no GPU), must not spill and must fit on the SMs.

The full matrix (about 140 plans, 400 kernels) takes about 20 minutes on two cores; CI compiles
one shape for each kind of plan that spilled before the fixes in benchmarks/NOTES.md (T3) and
one with a projection (proj_size), 9 plans and 27 kernels, in one to two minutes. (This
replaces test_triton.py's earlier 12-kernel compile check, which it covers.) The planner's
co-residency rule is plain Python and is checked here over the whole matrix and more SM counts.
"""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402

from bilstm_fast.kernels import planner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "compile_matrix.py"
HS = (32, 64, 128, 256, 300, 512, 1000, 1024, 2048)
BS = (1, 3, 16, 17, 32, 64, 100, 128, 256, 1024, 4096)
DTYPES = [(torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)]


@pytest.mark.parametrize("sm_count", [16, 46, 78, 108, 114, 132, 148])
def test_planner_never_picks_a_persistent_grid_larger_than_the_gpu(sm_count):
    """Persistent programs spin on each other: all of them must be resident at once, one CTA
    per SM (the compile matrix checks that each persistent kernel fits one SM)."""
    cuda = torch.device("cuda")
    for H in HS:
        for B in BS:
            for dtype, tf32 in DTYPES:
                with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
                    plan = planner.plan_schedule(B, 2, H, dtype, cuda, sm_count=sm_count)
                if plan.schedule == "persistent":
                    assert math.prod(plan.grid(B, 2)) <= sm_count, (H, B, dtype, tf32, plan)


# (cap, H, B, dtype): one shape for each kind of plan that spilled before the fixes (NOTES, T3),
# plus a resident tile program, so every schedule and W placement compiles for both targets, and
# a projection plan (H written HpP, as benchmarks/compile_matrix.py takes it)
SUBSET = [
    (90, 512, 64, "fp32-ieee"),  # stepwise, W streamed, FMA dots: spilled 64-176 B at 64 rows
    (90, 1024, 64, "fp32-tf32"),  # stepwise, W streamed, TF32: spilled 12-160 B
    (90, 128, 64, "fp32-tf32"),  # tile, W streamed (H=128): spilled 4-32 B
    (90, 64, 64, "fp32-ieee"),  # tile, IEEE at H=64 (was W resident: spilled 4-24 B)
    (90, 256, 256, "bf16"),  # persistent, 32x32 blocks: spilled 40 B forward
    (80, 512, 16, "fp16"),  # persistent, hp=512 at 16 rows: backward spilled 8 B
    (80, 256, 64, "fp32-tf32"),  # the MNIST layer in TF32 on an A100: forward spilled 20-24 B
    (80, 32, 16, "fp16"),  # tile, W resident
    (90, "512p128", 16, "fp16"),  # proj_size 128, persistent (two barriers per step): backward at 254 registers (T6)
]


@pytest.mark.slow
def test_compile_matrix_subset_has_no_spills(tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [a for shape in SUBSET for a in ("--shape", *map(str, shape))]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--jobs", "2", "--out", str(tmp_path / "matrix.csv")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-4000:]
    expected = f"{len(SUBSET)} plans, 0 spill, 0 not co-resident"
    assert lines[-1] == expected, result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0


def test_occupancy_arithmetic():
    """CTAs per SM from registers, shared memory and threads, as the CUDA occupancy rules say."""
    spec = importlib.util.spec_from_file_location("compile_matrix_for_test", SCRIPT)
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)  # imports the planner only, not the kernels
    assert cm.ctas_per_sm(255, 0, 8, 90) == 1  # 256 regs/thread x 256 threads = all 64K registers
    assert cm.ctas_per_sm(128, 0, 8, 90) == 2
    assert cm.ctas_per_sm(127, 0, 8, 90) == 2  # allocated in units of 8 per thread: 128
    assert cm.ctas_per_sm(64, 100 * 1024, 4, 90) == 2  # 228 KiB per SM, 1 KiB reserved per CTA
    assert cm.ctas_per_sm(64, 100 * 1024, 4, 80) == 1  # 164 KiB on an A100
    assert cm.ctas_per_sm(64, 200 * 1024, 4, 80) == 0  # more than an A100 block may have
    assert cm.ctas_per_sm(32, 0, 4, 90) == 16  # 2048 threads
