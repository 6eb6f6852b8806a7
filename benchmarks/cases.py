"""One case: a shape in one or more precisions timed together. Build each implementation in each
precision, check it, time the correct ones."""
import copy

import torch
from torch import nn

from .correctness import TOLERANCE, check, reference_results
from .implementations import call, nn_lstm_refusal, valid_tokens
from .memory import peak_memory
from .precision import Fp32Math
from .shapes import lstm_flops, make_inputs
from .timing import measure_together, paired_speedup


def run_case(shape, precs, impls, device, args, rates, log):
    """Rows for one shape in the precisions `precs` (one of precision.timing_groups): each
    implementation checked in each precision, then the correct ones, of every precision, timed
    together per mode. One that fails the check, or raises, gets untimed rows saying so."""
    torch.manual_seed(0)
    base = nn.LSTM(shape.I, shape.H, num_layers=shape.layers, bidirectional=shape.bidirectional, device=device)
    # the reference sees the same rounded weights as the implementations
    bases = {prec: copy.deepcopy(base).to(prec.dtype) for prec in precs}
    variants = [("packed", True), ("padded", False)] if shape.varlen else [("", False)]
    rows = []
    with Fp32Math(next((prec.math for prec in precs if prec.math), "")):
        models, build_errors = {}, {}  # by (precision, implementation name)
        for prec in precs:
            for impl in impls:
                try:
                    models[prec, impl.name] = impl.build(bases[prec]).to(prec.dtype)
                except Exception as error:  # noqa: BLE001 - reported in the row, the run goes on
                    build_errors[prec, impl.name] = error
        for variant, packed in variants:
            verdicts = {}
            checks = {}  # by stored dtype: an autocast precision shares fp32's inputs and reference
            for prec in precs:
                if prec.dtype not in checks:
                    check_x, check_dout = make_inputs(shape, prec.dtype, device, seed=99, packed=packed)
                    checks[prec.dtype] = (check_x, check_dout, reference_results(bases[prec], check_x, check_dout))
                for impl in impls:
                    model = models.get((prec, impl.name))
                    verdict = check(model, build_errors.get((prec, impl.name)),
                                    checks[prec.dtype], impl.tolerance or TOLERANCE[prec.label()],
                                    prec.forward_context(device), impl.inference_only,
                                    nn_lstm_refusal(prec, device) if isinstance(model, nn.LSTM) else None)
                    verdicts[prec, impl.name] = verdict
                    log(f"  check {impl.name:16s} {shape.name}{'/' + variant if variant else ''} {prec.label()}: "
                        + (f"ERROR {verdict['error']}" if "error" in verdict else
                           verdict["unsupported"] if "unsupported" in verdict else
                           f"rel err {verdict['check_rel_err']:.1e} (tol {verdict['check_tolerance']:.0e}) "
                           + ("ok" if verdict["correct"] else "WRONG at " + verdict["check_worst"])))
            inference_only = {impl.name for impl in impls if impl.inference_only}
            for mode in args.modes:
                timed = [key for key, verdict in verdicts.items()
                         if verdict["correct"] and (mode == "inference" or key[1] not in inference_only)]
                fields = dict(zip(timed, time_rows([(models[key], key[0]) for key in timed], mode, shape,
                                                   packed, device, args, rates)))
                for prec in precs:
                    for impl in impls:
                        if mode != "inference" and impl.inference_only:
                            continue
                        key = (prec, impl.name)
                        row = dict(impl=impl.name, mode=mode, shape=shape.name, shape_label=shape.label(),
                                   variant=variant, dtype=prec.label(), B=shape.B, T=shape.T, I=shape.I,
                                   H=shape.H, layers=shape.layers, directions=shape.D, note=shape.note,
                                   **verdicts[key], **fields.get(key, {}))
                        rows.append(row)
                        if key in fields:
                            log(f"    {impl.name:16s} {prec.label():13s} {mode:9s} "
                                + (f"ERROR {row['error']}" if "error" in row else
                                   f"{row['median_ms']:10.2f} ms  [{row['q20_ms']:.2f}, {row['q80_ms']:.2f}]  "
                                   f"{row['samples']} samples"))
        del models
    order = {impl.name: k for k, impl in enumerate(impls)}
    labels = [prec.label() for prec in precs]
    rows.sort(key=lambda r: (labels.index(r["dtype"]), order[r["impl"]], r["variant"] == "padded",
                             args.modes.index(r["mode"])))
    fill_ratios(rows)
    return rows


def time_rows(entries, mode, shape, packed, device, args, rates):
    """Timing, throughput, floor and peak-memory fields of one row per (model, precision), all
    fed the same input values (in their precision's dtype) and timed together."""
    pools = {prec.dtype: [make_inputs(shape, prec.dtype, device, seed=s, packed=packed) for s in range(3)]
             for _, prec in entries}

    def stepper(model, prec):
        state = {"k": 0}
        pool, context = pools[prec.dtype], prec.forward_context(device)

        def step():
            x, dout = pool[state["k"] % len(pool)]
            state["k"] += 1
            return call(model, mode, x, dout, context)

        return step

    steps = [stepper(model, prec) for model, prec in entries]
    for model, _ in entries:
        model.train(mode == "training")
    tokens = valid_tokens(next(iter(pools.values()))[0][0]) or shape.B * shape.T
    flops = lstm_flops(shape, mode, tokens)
    fields = []
    for step, (_, prec), stats in zip(steps, entries, measure_together(steps, device, args.min_time)):
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
            floor_ms=1e3 * flops / rates[prec.label()], peak_mb=peak / 2**20,
        )
        row["floor_share"] = row["floor_ms"] / row["median_ms"]
        if "rounds_s" in stats:  # CPU: each round-robin round's sample, for fill_ratios' paired ratio
            row["rounds_ms"] = {k: 1e3 * s for k, s in stats["rounds_s"].items()}
        fields.append(row)
    return fields


def speedups(reference, row):
    """(median speedup, paired speedup) of row against a reference row of the same case."""
    if reference.get("median_ms") is None:
        return None, None
    paired = (paired_speedup(reference["rounds_ms"], row["rounds_ms"])
              if "rounds_ms" in reference and "rounds_ms" in row else None)
    return reference["median_ms"] / row["median_ms"], paired


def fill_ratios(rows):
    """Speedups against nn.LSTM in the same precision and variant (of the medians, and on the CPU
    the median of the paired per-round ratios too); the reduced-precision rows also against nn.LSTM
    in fp32 (fp32-tf32 on a GPU), where the case has it: what switching both at once gives. And
    packed/padded per implementation."""
    by_key = {(r["impl"], r["mode"], r["variant"], r["dtype"]): r for r in rows}
    fp32 = next((d for d in ("fp32", "fp32-tf32") if any(r["dtype"] == d for r in rows)), None)
    for r in rows:
        if r.get("median_ms") is None:
            continue
        key = (r["mode"], r["variant"])
        r["speedup_vs_nn_lstm"], r["paired_speedup_vs_nn_lstm"] = speedups(
            by_key.get(("nn.LSTM", *key, r["dtype"]), {}), r)
        if fp32 is not None and not r["dtype"].startswith("fp32"):
            r["speedup_vs_nn_lstm_fp32"], r["paired_speedup_vs_nn_lstm_fp32"] = speedups(
                by_key.get(("nn.LSTM", *key, fp32), {}), r)
        if r["variant"] == "packed":
            padded_ms = by_key.get((r["impl"], r["mode"], "padded", r["dtype"]), {}).get("median_ms")
            r["packed_over_padded"] = r["median_ms"] / padded_ms if padded_ms else None
