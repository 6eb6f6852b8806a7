"""Time the Triton recurrence per schedule: the data for the planner's thresholds (CUDA only).

    python benchmarks/schedules.py OUT.csv      # `make gpu-check` runs it as its `schedules` step

For each shape and dtype (fp32 with TF32 off and on), every schedule the planner can be forced
to (tile, tile with W streamed, persistent, stepwise with W resident or streamed) beside the
planner's own pick ("auto"): forward and backward milliseconds (median, 20%/80% quantiles from
triton.testing.do_bench) and the plan each ran. A schedule the planner refuses for a shape is
printed as skipped. One line per row on stdout, every row in OUT.csv.
"""
import csv
import sys

import torch
from triton.testing import do_bench

from bilstm_fast.kernels import triton_recurrence as tr

SHAPES = [  # (T, B, H, dtype)
    (128, 64, 64, torch.float16), (128, 64, 128, torch.float16), (128, 64, 256, torch.float16),
    (128, 64, 512, torch.float16), (64, 16, 1024, torch.float16), (64, 256, 256, torch.float16),
    (128, 64, 256, torch.float32), (128, 64, 256, torch.bfloat16), (32, 4096, 1024, torch.float16),
]
PLANS = {
    "auto": {}, "tile": dict(schedule="tile"),
    "tile-stream": dict(schedule="tile", block_n=32, resident=False),
    "persistent": dict(schedule="persistent"),
    "stepwise": dict(schedule="stepwise", resident=True),
    "stepwise-stream": dict(schedule="stepwise", resident=False),
}


def main(out_path):
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    rows = []
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        for T, B, H, dtype in SHAPES:
            if dtype != torch.float32 and tf32:
                continue
            D = 2
            gx = torch.randn(T, B, D, 4 * H, device=dev, dtype=dtype)
            w = (torch.randn(D, 4 * H, H, device=dev) / H**0.5).to(dtype)
            h0 = torch.randn(D, B, H, device=dev, dtype=dtype)
            c0 = torch.randn(D, B, H, device=dev, dtype=dtype)
            for name, force in PLANS.items():
                try:
                    plan = tr._plan(B, D, H, dtype, dev, force.get("schedule"), force.get("block_n"),
                                    force.get("resident"))
                except ValueError as e:
                    print(f"T{T} B{B} H{H} {dtype} {name}: skipped ({e})")
                    continue
                with tr.forced_plan(**force):
                    out, h_n, c_n, gates, cs = tr.recurrence_forward(gx, w, h0, c0)
                    dout = torch.randn_like(out)
                    fwd = do_bench(lambda: tr.recurrence_forward(gx, w, h0, c0), quantiles=[0.5, 0.2, 0.8])
                    bwd = do_bench(lambda: tr.recurrence_backward(dout, h0, c0, w, gates, cs, c0),
                                   quantiles=[0.5, 0.2, 0.8])
                row = dict(gpu=gpu, T=T, B=B, H=H, dtype=str(dtype).replace("torch.", ""), tf32=tf32, name=name,
                           schedule=plan.schedule, block_b=plan.block_b, block_n=plan.block_n,
                           resident=plan.resident, num_warps=plan.num_warps, fwd_ms=fwd[0], fwd_p20=fwd[1],
                           fwd_p80=fwd[2], bwd_ms=bwd[0], bwd_p20=bwd[1], bwd_p80=bwd[2],
                           us_per_step_fwd=1000 * fwd[0] / T)
                rows.append(row)
                print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    torch.backends.cudnn.allow_tf32 = True
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
