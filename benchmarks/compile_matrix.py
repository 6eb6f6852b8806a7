"""Compile every plan the planner picks, for real GPUs, without one: registers, spills, shared
memory, CTAs per SM, and whether persistent grids can be co-resident.

    python benchmarks/compile_matrix.py                  # the full matrix, sm_80 and sm_90
    python benchmarks/compile_matrix.py --caps 90 --H 256 --B 16 --dtypes fp16
    python benchmarks/compile_matrix.py --caps 90 --H 1024p256 --B 64 --dtypes fp16   # proj_size 256

For every (target, H, B, dtype) it asks the planner (kernels/planner.py) for the plan it would
pick on that target's SM count, then compiles the plan's kernels (forward, forward without the
saved buffers, backward) with `triton.compile` of an `ASTSource` for `GPUTarget("cuda", cap, 32)`,
runs the bundled ptxas with `-v` on the PTX for registers and spills, and reads Triton's shared
memory from the kernel's metadata. H is compiled as HP - 3 (odd, so every mask is live: the
general case). A hidden size written HpP (1024p256) is an LSTM with projection, proj_size P
(compiled as PP - 3 the same way): the planner plans on H as it does for every projection
layer. Writes benchmarks/results/compile_matrix.csv (one row per shape and kernel) and
prints a summary whose last line is `N plans, M spill, K not co-resident`:
  N  distinct plans compiled (a plan: target, schedule, blocks, W placement, dtype, precision),
  M  plans with any kernel that spills (ptxas spill stores or loads > 0),
  K  persistent plans picked for some shape whose grid cannot be resident at once on the
     target (D * batch tiles * chunk programs > SMs * CTAs per SM), or any plan whose kernel
     cannot launch at all (0 CTAs per SM).

Targets: sm_80 with an A100's 108 SMs, sm_90 with an H100's (and H200's) 132; sm_100 with a
B200's 148 (`--caps 80 90 100`) when the bundled ptxas knows it. Compiles are cached by Triton
(TRITON_CACHE_DIR), so a rerun without kernel changes takes seconds plus ptxas.
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bilstm_fast.kernels import planner  # noqa: E402

# SM count, 32-bit registers per SM, shared memory per SM and per block (bytes), max threads and
# CTAs per SM (CUDA programming guide, compute capability tables)
TARGETS = {
    80: dict(gpu="A100", sms=108, regs=65536, smem_sm=167936, smem_block=166912, threads=2048, ctas=32),
    90: dict(gpu="H100/H200", sms=132, regs=65536, smem_sm=233472, smem_block=232448, threads=2048, ctas=32),
    100: dict(gpu="B200", sms=148, regs=65536, smem_sm=233472, smem_block=232448, threads=2048, ctas=32),
}
RESERVED_SMEM = 1024  # per CTA, reserved by the CUDA runtime on sm_80 and later
# hidden sizes; HpP is an LSTM with projection, proj_size P
HS = ("32", "64", "128", "256", "512", "1024", "64p16", "128p32", "512p128", "1024p256")
BS = (1, 16, 32, 64, 128, 256)
DTYPES = {  # name -> (torch dtype, cuDNN TF32 switch, Triton pointer type)
    "fp32-ieee": (torch.float32, False, "fp32"),
    "fp32-tf32": (torch.float32, True, "fp32"),
    "fp32-tf32x3": (torch.float32, False, "fp32"),  # strict fp32 as 3xTF32 (opt-in, not in the default matrix)
    "fp16": (torch.float16, False, "fp16"),
    "bf16": (torch.bfloat16, False, "bf16"),
}
D = 2
KERNELS = ("fwd", "fwd-infer", "bwd")
FWD = ["p_gx", "p_w", "p_whr", "p_len", "p_hbuf", "p_rbuf", "p_c", "p_c0", "p_out", "p_gates", "p_cs", "p_hn",
       "p_sync"]
BWD = ["p_dout", "p_dhn", "p_w", "p_whr", "p_len", "p_gates", "p_cs", "p_c0", "p_dgbuf", "p_dhbuf", "p_dc", "p_dh0",
       "p_dh", "p_dgates", "p_sync"]
STATE = {"p_c", "p_c0", "p_cs", "p_dhn", "p_dc", "p_dh0"}  # fp32 state buffers
SYNC = {"stepwise": 0, "tile": 1, "persistent": 2}


def hidden(spec):
    """(H, P) from a hidden-size spec: "256" -> (256, 0), "1024p256" -> (1024, 256) (P = 0: no projection)."""
    H, _, P = str(spec).partition("p")
    return int(H), int(P or 0)


def pick(cap, H, B, dtype_name, sm_count=None):
    """(plan, dot precision) the planner picks on `cap`'s GPU for a bidirectional layer."""
    dtype, tf32, _ = DTYPES[dtype_name]
    cuda = torch.device("cuda")
    saved = os.environ.get("BILSTM_FAST_STRICT_FP32_DOT")
    os.environ["BILSTM_FAST_STRICT_FP32_DOT"] = "tf32x3" if dtype_name == "fp32-tf32x3" else "ieee"
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            plan = planner.plan_schedule(B, D, H, dtype, cuda, sm_count=sm_count or TARGETS[cap]["sms"])
            precision = planner.dot_precision(dtype, cuda)
    finally:
        if saved is None:
            del os.environ["BILSTM_FAST_STRICT_FP32_DOT"]
        else:
            os.environ["BILSTM_FAST_STRICT_FP32_DOT"] = saved
    return plan, precision


def stages(plan, P):
    """The STAGE values a plan launches its kernels with (triton_recurrence._run): with a
    projection, stepwise runs a kernel for each kind of stage, 0 and 1; all else -1."""
    return (0, 1) if P and plan.schedule == "stepwise" else (-1,)


def compile_kernel(kind, plan, dtype_name, precision, cap, P=0, stage=-1):
    """The compiled kernel (triton's CompiledKernel) for one plan (with a projection to P
    features when P > 0; `stage` as `stages`), without a GPU."""
    # imported here, without TRITON_INTERPRET: triton.jit decides at definition whether to compile
    os.environ.pop("TRITON_INTERPRET", None)
    from bilstm_fast.kernels import triton_recurrence as tr

    ptr = DTYPES[dtype_name][2]
    kernel, names = (tr._lstm_bwd_kernel, BWD) if kind == "bwd" else (tr._lstm_fwd_kernel, FWD)
    sig = {n: "*i64" if n == "p_len" else "*i32" if n == "p_sync" else "*fp32" if n in STATE else "*" + ptr
           for n in names}
    sig.update(T="i32", B="i32", s_begin="i32", s_end="i32")
    pp = planner._pow2_at_least(P) if P else plan.hp
    meta = dict(
        H=plan.hp - 3, HP=plan.hp, P=pp - 3, PP=pp, D=D, BLOCK_B=plan.block_b, BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, N_CHUNKS=plan.chunks_per_program,
        P_CHUNKS=triton.cdiv(pp, plan.block_n) if plan.schedule == "tile" else 1,  # as triton_recurrence._run
        RESIDENT=plan.resident, SYNC=SYNC[plan.schedule], HAS_LENGTHS=True, DOT_PRECISION=precision,
        ACC=tl.float32, PROJ=P > 0, STAGE=stage,
    )
    if kind != "bwd":
        meta["SAVE"] = kind == "fwd"
    sig.update({k: "constexpr" for k in meta})
    src = ASTSource(fn=kernel, signature=sig, constexprs=meta)
    num_warps = plan.bwd_num_warps if kind == "bwd" else plan.num_warps
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(num_warps=num_warps))


def ptxas_usage(ptx, cap):
    """Registers, spill bytes and stack frame from the bundled ptxas -v (Triton's own flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    used = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return dict(
        regs=int(used.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
        spill_loads=int(spill.group(3)), ptxas_smem=int(smem.group(1)) if smem else 0,
    )


def ctas_per_sm(regs, shared, num_warps, cap):
    """Occupancy limit from registers (allocated per warp in units of 256), shared memory
    (Triton's dynamic allocation plus the reserved 1 KiB) and threads."""
    t = TARGETS[cap]
    threads = 32 * num_warps
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = t["regs"] // (regs_per_warp * num_warps)
    if shared == 0:
        by_smem = t["ctas"]
    else:
        by_smem = t["smem_sm"] // (shared + RESERVED_SMEM) if shared <= t["smem_block"] else 0
    return min(by_regs, by_smem, t["threads"] // threads, t["ctas"])


def measure(job):
    """One compile job: (kind, plan, dtype_name, precision, cap, P) -> usage dict."""
    kind, plan, dtype_name, precision, cap, P = job
    start = time.time()
    # a plan with a kernel per stage kind: the larger of each figure
    usage = {}
    for stage in stages(plan, P):
        compiled = compile_kernel(kind, plan, dtype_name, precision, cap, P, stage)
        one = dict(ptxas_usage(compiled.asm["ptx"], cap), shared=compiled.metadata.shared)
        usage = {k: max(v, usage.get(k, 0)) for k, v in one.items()}
    usage["num_warps"] = plan.bwd_num_warps if kind == "bwd" else plan.num_warps
    usage["ctas_per_sm"] = ctas_per_sm(usage["regs"], usage["shared"], usage["num_warps"], cap)
    usage["compile_s"] = round(time.time() - start, 1)
    return usage


def plan_key(plan, dtype_name, precision, cap, P):
    return (cap, plan, dtype_name, precision, P)


def run_matrix(caps, Hs, Bs, dtype_names, jobs=2, log=print, shapes=None):
    """Rows (one per shape and kernel) and per-plan results for the given slice of the matrix
    (the grid caps x Hs x Bs x dtype_names, or the (cap, H, B, dtype_name) list `shapes`; H is
    a hidden-size spec, see `hidden`)."""
    if shapes is None:
        shapes = [(c, h, b, d) for c in caps for h in Hs for b in Bs for d in dtype_names]
    shapes = [(c, *hidden(h), b, d) for c, h, b, d in shapes]
    shapes = [(c, h, P, b, d, *pick(c, h, b, d)) for c, h, P, b, d in shapes]
    plans = sorted({plan_key(p, d, pr, c, P) for c, _, P, _, d, p, pr in shapes}, key=repr)
    work = [(kind, p, d, pr, c, P) for c, p, d, pr, P in plans for kind in KERNELS]
    log(f"{len(shapes)} shapes -> {len(plans)} distinct plans -> {len(work)} kernels to compile ({jobs} processes)")
    results = {}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for job, usage in zip(work, pool.map(measure, work)):
            results[job] = usage
            kind, p, d, pr, c, P = job
            log(f"sm_{c} {d:9} {p.schedule:10} hp={p.hp:<5} P={P:<4} bb={p.block_b:<3} bn={p.block_n:<4} "
                f"res={int(p.resident)} w={usage['num_warps']} {kind:9}: regs {usage['regs']:3} spill "
                f"{usage['spill_stores']}/{usage['spill_loads']} B, shared {usage['shared']:6} B, "
                f"{usage['ctas_per_sm']} CTA/SM ({usage['compile_s']} s)")
    rows = []
    for cap, H, P, B, dtype_name, plan, precision in shapes:
        grid = plan.grid(B, D)
        programs = grid[0] * grid[1] * grid[2]
        for kind in KERNELS:
            u = results[(kind, plan, dtype_name, precision, cap, P)]
            resident_capacity = TARGETS[cap]["sms"] * u["ctas_per_sm"]
            rows.append(dict(
                target=f"sm_{cap}", sms=TARGETS[cap]["sms"], H=H, P=P, B=B, dtype=dtype_name, precision=precision,
                schedule=plan.schedule, block_b=plan.block_b, block_n=plan.block_n, hp=plan.hp,
                resident=plan.resident, num_warps=u["num_warps"], kernel=kind, programs=programs,
                **{k: u[k] for k in ("regs", "spill_stores", "spill_loads", "stack", "shared", "ctas_per_sm")},
                co_resident=(programs <= resident_capacity) if plan.schedule == "persistent" else "",
                launchable=u["ctas_per_sm"] >= 1,
            ))
    return rows, plans, results


def summarize(rows, plans, results):
    def spills(cap, plan, dtype_name, precision, P):
        return any(results[(kind, plan, dtype_name, precision, cap, P)]["spill_stores"]
                   + results[(kind, plan, dtype_name, precision, cap, P)]["spill_loads"] > 0 for kind in KERNELS)

    spilling = {k for k in plans if spills(*k)}
    bad = {(r["target"], r["schedule"], r["block_b"], r["block_n"], r["hp"], r["P"], r["resident"], r["dtype"])
           for r in rows if r["co_resident"] is False or not r["launchable"]}
    # bad is keyed like a plan: count distinct plans
    return len(plans), len(spilling), len(bad), spilling, bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--H", nargs="+", default=list(HS), help="hidden sizes; HpP for proj_size P (1024p256)")
    parser.add_argument("--B", type=int, nargs="+", default=list(BS))
    parser.add_argument("--dtypes", nargs="+", default=[d for d in DTYPES if d != "fp32-tf32x3"], choices=list(DTYPES))
    parser.add_argument("--shape", nargs=4, action="append", metavar=("CAP", "H", "B", "DTYPE"),
                        help="only these shapes (repeatable), instead of the --caps x --H x --B x --dtypes grid")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_matrix.csv"))
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real (the worker processes inherit this)
    start = time.time()
    shapes = [(int(c), h, int(b), d) for c, h, b, d in args.shape] if args.shape else None
    rows, plans, results = run_matrix(args.caps, args.H, args.B, args.dtypes, jobs=args.jobs, shapes=shapes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n, m, k, spilling, bad = summarize(rows, plans, results)
    for cap, plan, dtype_name, precision, P in sorted(spilling, key=repr):
        worst = max(results[(kind, plan, dtype_name, precision, cap, P)]["spill_stores"] for kind in KERNELS)
        print(f"spills: sm_{cap} {dtype_name} P={P} {plan} (up to {worst} B stored)")
    for b in sorted(bad, key=repr):
        print(f"not co-resident or not launchable: {b}")
    print(f"table: {args.out} ({len(rows)} rows; triton {triton.__version__}, {time.time() - start:.0f} s)")
    print(f"{n} plans, {m} spill, {k} not co-resident")
    return 0 if m == 0 and k == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
