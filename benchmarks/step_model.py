"""Per-step cost model of the Triton recurrence on an H100, from the compiled kernels (no GPU).

    python benchmarks/step_model.py            # the table; --out writes it as CSV too
    python benchmarks/step_model.py --measure OUT.csv   # on a GPU: the same rows, measured
                                                        # beside the prediction and cuDNN

For each shape and dtype it takes the plan the planner picks on a 132-SM H100, compiles the
forward and backward kernels for sm_90 (as benchmarks/compile_matrix.py does), disassembles
the cubin (the bundled cuobjdump) and counts, per time step and per busy SM:
  - tensor-core MMA instructions (HMMA, by shape) and FP32 FMA-pipe instructions (FFMA/FMUL/
    FADD), special-function instructions (MUFU);
  - shared-memory bytes (LDS/LDSM/STS) and global bytes (LDG/STG, all 32 lanes counted);
  - CTA barriers (BAR.SYNC) and grid barriers (the atomic spin of the persistent schedule).
Counting: instructions inside the kernel's outermost loop (the time loop) are one step's; an
inner loop holding dot work runs HP / BLOCK_K times per chunk (the streamed-W K loop), a
loop holding an inner loop N_CHUNKS times (tile), and the spin loop of a grid barrier counts
once. Instructions are per warp, times the CTA's warps and the CTAs on one SM.

Time per step = the largest throughput term + the latency chain of a step, with these stated
H100 SXM figures (assumptions, to be replaced by the first GPU measurement):
  clock 1.755 GHz (sustained under load, below the 1.98 GHz boost);
  mma.sync (Triton's HMMA on sm_90; wgmma is not used for these small tiles): 1024 fp16/bf16
    MAC per clock per SM (half of the wgmma peak of 989 TFLOPS), TF32 a quarter of that (256);
  FP32 pipe 128 lanes per clock per SM; MUFU 16; shared memory 128 B per clock per SM;
  L2 latency 0.30 us for the .cg loads of h at the start of a step (a dependent round trip);
  grid barrier 1.0 us (release add, then acquire polls through L2 until the last arrival);
  one Triton launch from Python 6 us (stepwise runs one launch per step);
  per-instruction latency of the dependent chain inside a step: 600 clocks of MMA/ALU chain
    plus 40 clocks per CTA barrier.
cuDNN reference: STANDARD algorithm (what PyTorch picks for bidirectional 2-layer H >= 256)
about 6.6 to 11 us per step per layer on an H100, as quoted in issue #18 from PyTorch PR
#62143 measurements; not re-measured here (the first GPU run does, with --measure).
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import compile_matrix as cm  # noqa: E402

CAP = 90
SMS = 132
CLOCK_GHZ = 1.755
MAC_PER_CLK = {"HMMA.16816": 1024, "HMMA.1688.F32.TF32": 256, "HMMA.1684.F32.TF32": 256}
MACS = {"HMMA.16816": 16 * 8 * 16, "HMMA.1688.F32.TF32": 16 * 8 * 8, "HMMA.1684.F32.TF32": 16 * 8 * 4}
FP32_LANES, MUFU_LANES, SMEM_BPC = 128, 16, 128
L2_LATENCY_US, GRID_BARRIER_US, LAUNCH_US = 0.30, 1.0, 6.0
CHAIN_CLK, BAR_CLK = 600, 40
CUDNN_US = (6.6, 11.0)

SHAPES = {  # name -> (T, B, H, layers)
    "mnist": (28, 64, 256, 2),
    "tagging": (128, 32, 512, 1),
}
DTYPES = ("fp32-tf32", "fp32-ieee", "fp16")


def sass_of(compiled):
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        cmd = [knobs.nvidia.cuobjdump.path, "-sass", f.name]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def parse(sass):
    """[(address, opcode with modifiers, full text)] of the SASS, predicates stripped."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
            out.append((int(m.group(1), 16), text.split()[0], text))
    return out


def loops(ins):
    """(start, end) of every backward branch (a loop), the branch-to-self trap excluded."""
    found = []
    for addr, op, text in ins:
        m = re.match(r"BRA\b.*?(0x[0-9a-f]+)", text)
        if m and op == "BRA" and int(m.group(1), 16) < addr:
            found.append((int(m.group(1), 16), addr))
    return found


def classify(op):
    """(kind, amount per warp instruction) of one opcode."""
    if op.startswith("HMMA"):
        key = next((k for k in MACS if op.startswith(k)), None)
        return ("mma:" + (key or op), 1)
    if op.split(".")[0] in ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"):
        return ("fp32", 1)
    if op.startswith("MUFU"):
        return ("mufu", 1)
    if op.startswith("LDSM"):
        n = int(re.search(r"\.(\d)$", op).group(1)) if re.search(r"\.(\d)$", op) else 1
        return ("smem", 128 * n)  # n 8x8 matrices of 16-bit: 128 B each
    if op.startswith(("LDS", "STS")):
        return ("smem", 32 * _width(op))
    if op.startswith(("LDG", "STG")):
        return ("gmem", 32 * _width(op))
    if op.startswith("BAR"):
        return ("bar", 1)
    if op.startswith(("ATOM", "RED")):
        return ("atom", 1)
    return ("other", 1)


def _width(op):
    for suffix, w in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return w
    return 4


def step_counts(compiled, plan):
    """Per-warp counts of one time step (see the module docstring for how loops count)."""
    ins = parse(sass_of(compiled))
    found = loops(ins)
    time_loop = max(found, key=lambda r: r[1] - r[0])
    inner = [r for r in found if r != time_loop and time_loop[0] <= r[0] and r[1] <= time_loop[1]]

    def has_dot(r):
        return any(classify(op)[0].startswith("mma") or op.startswith("FFMA") for a, op, _ in ins if r[0] <= a <= r[1])

    def weight(addr):
        w = 1
        for r in inner:
            if r[0] <= addr <= r[1]:
                contains_loop = any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in inner)
                if contains_loop:
                    w *= plan.chunks_per_program
                elif has_dot(r):
                    w *= max(1, plan.hp // plan.block_k)
                # a spin loop (no dot work) counts once
        return w

    counts = {}
    for addr, op, _ in ins:
        if time_loop[0] <= addr <= time_loop[1]:
            kind, amount = classify(op)
            counts[kind] = counts.get(kind, 0) + amount * weight(addr)
    counts["grid_barriers"] = 1 if plan.schedule == "persistent" else 0
    return counts


def predict(T, B, H, dtype_name, kind):
    """(plan, per-SM counts per step, predicted us per step) for one layer, both directions."""
    plan, precision = cm.pick(CAP, H, B, dtype_name, sm_count=SMS)
    compiled = cm.compile_kernel(kind, plan, dtype_name, precision, CAP)
    c = step_counts(compiled, plan)
    grid = plan.grid(B, 2)
    programs = grid[0] * grid[1] * grid[2]
    per_sm = -(-programs // SMS)  # CTAs on the busiest SM
    warps = (plan.bwd_num_warps if kind == "bwd" else plan.num_warps) * per_sm
    mma = {k[4:]: n for k, n in c.items() if k.startswith("mma:") and k[4:] in MACS}
    mma_clk = sum(n * warps * MACS[k] / MAC_PER_CLK[k] for k, n in mma.items())
    fp32_clk = c.get("fp32", 0) * warps * 32 / FP32_LANES
    mufu_clk = c.get("mufu", 0) * warps * 32 / MUFU_LANES
    smem_clk = c.get("smem", 0) * warps / SMEM_BPC
    throughput_us = max(mma_clk, fp32_clk, mufu_clk, smem_clk) / (CLOCK_GHZ * 1e3)
    latency_us = (CHAIN_CLK + BAR_CLK * c.get("bar", 0)) / (CLOCK_GHZ * 1e3) + L2_LATENCY_US
    if plan.schedule == "persistent":
        latency_us += GRID_BARRIER_US
    if plan.schedule == "stepwise":
        latency_us += LAUNCH_US
    macs = sum(n * warps * MACS[k[4:]] for k, n in c.items() if k.startswith("mma:") and k[4:] in MACS)
    row = dict(
        kernel=kind, schedule=plan.schedule, block_b=plan.block_b, block_n=plan.block_n, resident=plan.resident,
        programs=programs, ctas_per_sm=per_sm,
        mma_per_sm=sum(n * warps for k, n in c.items() if k.startswith("mma:")), mma_macs_per_sm=macs,
        fp32_per_sm=c.get("fp32", 0) * warps, mufu_per_sm=c.get("mufu", 0) * warps,
        smem_kib_per_sm=round(c.get("smem", 0) * warps / 1024, 1),
        gmem_kib_per_sm=round(c.get("gmem", 0) * warps / 1024, 1),
        cta_barriers=c.get("bar", 0), grid_barriers=c["grid_barriers"],
        mma_us=round(mma_clk / (CLOCK_GHZ * 1e3), 2), smem_us=round(smem_clk / (CLOCK_GHZ * 1e3), 2),
        alu_us=round(max(fp32_clk, mufu_clk) / (CLOCK_GHZ * 1e3), 2), latency_us=round(latency_us, 2),
        predicted_us=round(throughput_us + latency_us, 2),
    )
    return plan, row


def table(log=print):
    rows = []
    for name, (T, B, H, layers) in SHAPES.items():
        for dtype_name in DTYPES:
            for kind in ("fwd", "bwd"):
                plan, row = predict(T, B, H, dtype_name, kind)
                rows.append(dict(shape=name, T=T, B=B, H=H, layers=layers, dtype=dtype_name, **row,
                                 cudnn_us=f"{CUDNN_US[0]}-{CUDNN_US[1]}" if kind == "fwd" else ""))
    keys = ["shape", "dtype", "kernel", "schedule", "block_b", "block_n", "resident", "programs", "mma_per_sm",
            "smem_kib_per_sm", "gmem_kib_per_sm", "cta_barriers", "mma_us", "smem_us", "alu_us", "latency_us",
            "predicted_us", "cudnn_us"]
    log("| " + " | ".join(keys) + " |")
    log("|" + "---|" * len(keys))
    for r in rows:
        log("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return rows


def measure(path):
    """On a GPU: each row's Triton recurrence (forward, backward) and cuDNN's one-layer
    bidirectional nn.LSTM forward, in us per step, beside the prediction."""
    import torch
    from torch import nn
    from triton.testing import do_bench

    from bilstm_fast.kernels import triton_recurrence as tr

    dev = torch.device("cuda")
    out = []
    for name, (T, B, H, layers) in SHAPES.items():
        for dtype_name in DTYPES:
            dtype = {"fp16": torch.float16}.get(dtype_name, torch.float32)
            tf32 = dtype_name == "fp32-tf32"
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            g = torch.Generator(device=dev).manual_seed(0)
            gx = torch.randn(T, B, 2, 4 * H, device=dev, generator=g).to(dtype)
            w = (torch.randn(2, 4 * H, H, device=dev, generator=g) / H**0.5).to(dtype)
            h0 = torch.randn(2, B, H, device=dev, generator=g).to(dtype)
            c0 = torch.randn(2, B, H, device=dev, generator=g).to(dtype)
            _, _, _, gates, cs = tr.recurrence_forward(gx, w, h0, c0)
            dout = torch.randn(T, B, 2, H, device=dev, generator=g).to(dtype)
            fwd = do_bench(lambda: tr.recurrence_forward(gx, w, h0, c0), quantiles=[0.5, 0.2, 0.8])
            bwd = do_bench(lambda: tr.recurrence_backward(dout, h0, c0, w, gates, cs, c0), quantiles=[0.5, 0.2, 0.8])
            lstm = nn.LSTM(H, H, bidirectional=True, device=dev, dtype=dtype)
            x = torch.randn(T, B, H, device=dev, generator=g).to(dtype)
            with torch.no_grad():
                cud = do_bench(lambda: lstm(x), quantiles=[0.5, 0.2, 0.8])
            for kind, ms in (("fwd", fwd), ("bwd", bwd)):
                _, row = predict(T, B, H, dtype_name, kind)
                out.append(dict(gpu=torch.cuda.get_device_name(dev), shape=name, dtype=dtype_name, kernel=kind,
                                schedule=row["schedule"], predicted_us=row["predicted_us"],
                                triton_us=round(1000 * ms[0] / T, 2), triton_p20=round(1000 * ms[1] / T, 2),
                                triton_p80=round(1000 * ms[2] / T, 2),
                                cudnn_fwd_us=round(1000 * cud[0] / T, 2) if kind == "fwd" else ""))
                print(out[-1], flush=True)
    torch.backends.cudnn.allow_tf32 = True
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the predicted table as CSV here")
    parser.add_argument("--measure", metavar="CSV", help="on a GPU: measure each row beside its prediction")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    if args.measure:
        measure(args.measure)
        return 0
    rows = table()
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
