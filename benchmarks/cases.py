"""One (shape, precision) case: build each implementation, check it, time the correct ones."""
import torch
from torch import nn

from .correctness import TOLERANCE, check, reference_results
from .implementations import call, valid_tokens
from .memory import peak_memory
from .precision import Fp32Math
from .shapes import lstm_flops, make_inputs
from .timing import measure_together, paired_speedup


def run_case(shape, precision, impls, device, args, rates, log):
    """Rows for one (shape, precision): each implementation checked, then the correct ones
    timed together per mode. One that fails the check, or raises, gets untimed rows saying so."""
    dtype = precision.dtype
    torch.manual_seed(0)
    base = nn.LSTM(shape.I, shape.H, num_layers=shape.layers, bidirectional=shape.bidirectional, device=device)
    base = base.to(dtype)  # the reference sees the same rounded weights as the implementations
    variants = [("packed", True), ("padded", False)] if shape.varlen else [("", False)]
    rows = []
    with Fp32Math(precision.math):
        models, build_errors = {}, {}
        for impl in impls:
            try:
                models[impl.name] = impl.build(base).to(dtype)
            except Exception as error:  # noqa: BLE001 - reported in the row, the run goes on
                build_errors[impl.name] = error
        for variant, packed in variants:
            check_x, check_dout = make_inputs(shape, dtype, device, seed=99, packed=packed)
            case_check = (check_x, check_dout, reference_results(base, check_x, check_dout))
            verdicts = {}
            for impl in impls:
                verdict = check(models.get(impl.name), build_errors.get(impl.name), case_check,
                                impl.tolerance or TOLERANCE[precision.label()], impl.inference_only)
                verdicts[impl.name] = verdict
                log(f"  check {impl.name:16s} {shape.name}{'/' + variant if variant else ''} {precision.label()}: "
                    + (f"ERROR {verdict['error']}" if "error" in verdict else
                       f"rel err {verdict['check_rel_err']:.1e} (tol {verdict['check_tolerance']:.0e}) "
                       + ("ok" if verdict["correct"] else "WRONG at " + verdict["check_worst"])))
            for mode in args.modes:
                timed = [impl.name for impl in impls if verdicts[impl.name]["correct"]
                         and (mode == "inference" or not impl.inference_only)]
                fields = dict(zip(timed, time_rows([models[name] for name in timed], mode, shape, precision,
                                                   packed, device, args, rates)))
                for impl in impls:
                    if mode != "inference" and impl.inference_only:
                        continue
                    row = dict(impl=impl.name, mode=mode, shape=shape.name, shape_label=shape.label(),
                               variant=variant, dtype=precision.label(), B=shape.B, T=shape.T, I=shape.I,
                               H=shape.H, layers=shape.layers, directions=shape.D, note=shape.note,
                               **verdicts[impl.name], **fields.get(impl.name, {}))
                    rows.append(row)
                    if impl.name in fields:
                        log(f"    {impl.name:16s} {mode:9s} " + (f"ERROR {row['error']}" if "error" in row else
                            f"{row['median_ms']:10.2f} ms  [{row['q20_ms']:.2f}, {row['q80_ms']:.2f}]  "
                            f"{row['samples']} samples"))
        del models
    order = {impl.name: k for k, impl in enumerate(impls)}
    rows.sort(key=lambda r: (order[r["impl"]], r["variant"] == "padded", args.modes.index(r["mode"])))
    fill_ratios(rows)
    return rows


def time_rows(models, mode, shape, precision, packed, device, args, rates):
    """Timing, throughput, floor and peak-memory fields of one row per model, all fed the
    same inputs and timed together."""
    pool = [make_inputs(shape, precision.dtype, device, seed=s, packed=packed) for s in range(3)]

    def stepper(model):
        state = {"k": 0}

        def step():
            x, dout = pool[state["k"] % len(pool)]
            state["k"] += 1
            return call(model, mode, x, dout)

        return step

    steps = [stepper(model) for model in models]
    for model in models:
        model.train(mode == "training")
    tokens = valid_tokens(pool[0][0]) or shape.B * shape.T
    flops = lstm_flops(shape, mode, tokens)
    fields = []
    for step, stats in zip(steps, measure_together(steps, device, args.min_time)):
        try:
            if isinstance(stats, Exception):
                raise stats
            peak = peak_memory(step, device)
        except Exception as error:  # noqa: BLE001 - an OOM in one row must not end the run
            fields.append({"error": f"timing it: {error!r}"[:300]})
            continue
        median = stats["median_s"]
        row = dict(
            median_ms=1e3 * median, q20_ms=1e3 * stats["q20_s"], q80_ms=1e3 * stats["q80_s"],
            samples=stats["samples"], per_step_us=1e6 * median / shape.T,
            tokens_per_s=tokens / median, tokens=tokens, gflop=flops / 1e9,
            floor_ms=1e3 * flops / rates[precision.label()], peak_mb=peak / 2**20,
        )
        row["floor_share"] = row["floor_ms"] / row["median_ms"]
        if "rounds_s" in stats:  # CPU: each round-robin round's sample, for fill_ratios' paired ratio
            row["rounds_ms"] = {k: 1e3 * s for k, s in stats["rounds_s"].items()}
        fields.append(row)
    return fields


def fill_ratios(rows):
    """Speedup against nn.LSTM in the same case and variant (of the medians, and on the CPU the
    median of the paired per-round ratios too); packed/padded per implementation."""
    by_key = {(r["impl"], r["mode"], r["variant"]): r for r in rows}
    for r in rows:
        if r.get("median_ms") is None:
            continue
        torch_row = by_key.get(("nn.LSTM", r["mode"], r["variant"]), {})
        torch_ms = torch_row.get("median_ms")
        r["speedup_vs_nn_lstm"] = torch_ms / r["median_ms"] if torch_ms else None
        if "rounds_ms" in r and "rounds_ms" in torch_row:
            r["paired_speedup_vs_nn_lstm"] = paired_speedup(torch_row["rounds_ms"], r["rounds_ms"])
        if r["variant"] == "packed":
            padded_ms = by_key.get((r["impl"], r["mode"], "padded"), {}).get("median_ms")
            r["packed_over_padded"] = r["median_ms"] / padded_ms if padded_ms else None
