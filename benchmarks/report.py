"""The table, and the JSON, CSV and PNG files of a run; and the README's results table, written
from committed runs' JSON:

    python benchmarks/report.py --readme            # rewrite README.md's table from README_SOURCES
    python benchmarks/report.py results/X.json ...   # print the table those runs would give
"""
import argparse
import csv
import json
import re
from pathlib import Path

COLUMNS = [
    ("impl", "impl", "{}"),
    ("mode", "mode", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("median_ms", "median ms", "{:.2f}"),
    ("q20_q80", "[20%, 80%]", "{}"),
    ("per_step_us", "µs/step", "{:.0f}"),
    ("tokens_per_s", "tokens/s", "{:.3g}"),
    ("speedup_vs_nn_lstm", "vs nn.LSTM", "{:.2f}x"),
    ("paired_speedup_vs_nn_lstm", "paired", "{:.2f}x"),
    ("speedup_vs_nn_lstm_fp32", "vs nn.LSTM fp32", "{:.2f}x"),
    ("paired_speedup_vs_nn_lstm_fp32", "paired fp32", "{:.2f}x"),
    ("peak_mb", "peak MB", "{:.1f}"),
    ("floor_share", "of floor", "{:.0%}"),
    ("packed_over_padded", "packed/padded", "{:.2f}"),
]


def table_cells(row):
    cells = []
    for key, _, fmt in COLUMNS:
        if key == "shape":
            value = row["shape"] + (f"/{row['variant']}" if row["variant"] else "")
        elif key == "q20_q80":
            value = f"[{row['q20_ms']:.2f}, {row['q80_ms']:.2f}]" if "q20_ms" in row else None
        else:
            value = row.get(key)
        if key == "median_ms" and "error" in row:
            cells.append("ERROR")
        elif key == "median_ms" and "unsupported" in row:
            cells.append("unsupported")
        elif key == "median_ms" and not row["correct"]:
            cells.append(f"WRONG ({row['check_rel_err']:.1e})")
        elif value is None:
            cells.append("-")
        else:
            cells.append(fmt.format(value))
    return cells


def format_table(rows):
    header = [title for _, title, _ in COLUMNS]
    body = [table_cells(r) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i >= 4 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def write_outputs(result, out_dir, stem, log):
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    rows = result["rows"]
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys and k != "rounds_ms"]  # the raw samples: JSON only
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device_name"] + keys)
        writer.writeheader()
        name = result["machine"].get("gpu") or result["machine"]["cpu"]
        for row in rows:
            writer.writerow({"device_name": name, **{k: v for k, v in row.items() if k in keys}})
    if not plot_speedups(rows, result["machine"], paths["png"], log):
        del paths["png"]
    return paths


def plot_speedups(rows, info, path, log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is not installed: skipping the speedup chart (pip install matplotlib)")
        return False
    # nn.LSTM is the 1.0 line itself. The paired ratio where every row has one (the CPU), since
    # it survives a shared host's slow phases better (NOTES.md, "How to read the table")
    paired = all(r.get("paired_speedup_vs_nn_lstm") is not None for r in rows if r.get("speedup_vs_nn_lstm"))
    ratio = "paired_speedup_vs_nn_lstm" if paired else "speedup_vs_nn_lstm"
    timed = [r for r in rows if r.get(ratio) is not None and r["impl"] != "nn.LSTM"]
    if not timed:
        log("no timed rows: no speedup chart")
        return False
    groups = []
    for r in timed:
        key = (f"{r['shape']}{'/' + r['variant'] if r['variant'] else ''}\n{r['mode']} {r['dtype']}")
        if key not in groups:
            groups.append(key)
    impls = [name for name in dict.fromkeys(r["impl"] for r in timed)]
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4.5))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for g, key in enumerate(groups):
            for r in timed:
                prefix = f"{r['shape']}{'/' + r['variant'] if r['variant'] else ''}\n{r['mode']} {r['dtype']}"
                if r["impl"] == impl and key.startswith(prefix):
                    xs.append(g + (k - (len(impls) - 1) / 2) * width)
                    ys.append(r[ratio])
        bars = ax.bar(xs, ys, width, label=impl)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    # plain ratios as tick labels: a log axis alone labels only the powers of ten
    low, high = ax.get_ylim()
    steps = (0.9, 1, 1.1, 1.25) if high / low < 3 else (0.75, 1, 1.5)  # finer steps on a narrow range
    ticks = [t for t in sorted({0.1, 0.25, 0.5, 2, 3, 5, 10, 20, 50, *steps}) if low <= t <= high]
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel(f"{'paired ' if paired else ''}speedup vs nn.LSTM (higher is faster)")
    where = info.get("gpu") or info["cpu"]
    ax.set_title(f"{where}, torch {info['torch']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# The runs behind the README's results table, in the order it lists them. To show a new run, add
# its JSON here and run `python benchmarks/report.py --readme` (tests/test_readme.py checks that
# the README holds exactly what this list gives).
README_SOURCES = [  # the allocator comparison (_notrim runs) and everything else: RESULTS.md
    "cpu-intel-xeon_2026-12-02_default.json",
    "cpu-intel-xeon_2026-12-02_default_mnist.json",
    "cpu-amd-epyc_2026-12-06_bf16.json",
]
# The backends `auto` picks where they are built; the fallback's figures are in RESULTS.md
README_BACKENDS = ("native", "triton")
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- results table: written by `python benchmarks/report.py --readme` from README_SOURCES; do not edit -->"
END = "<!-- end of results table -->"


def allocator_label(text):
    """Short names for the two settings the CPU runs compare (NOTES.md attempt 34)."""
    if text is None:
        return "not recorded"
    if text == "glibc malloc, defaults":
        return "glibc defaults"
    return "glibc no-trim" if "glibc.malloc.trim_threshold" in text else text


def allocator_env(text):
    """The environment a run's allocator line came from (machine.allocator() reads it back)."""
    tunables = re.search(r"\((glibc\.malloc\.[^)]*)\)", text or "")
    return f"GLIBC_TUNABLES={tunables.group(1).replace(', ', ':')}" if tunables else ""


def run_context(result):
    """What the caption or a column says about where a run's rows were measured."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores, {m.get('native')}"
    return {"machine": f"{where}, torch {m['torch']}, nn.LSTM on {m['nn_lstm_engine']}",
            "date": m["date"][:10], "threads": str(m["torch_threads"]),
            "allocator": allocator_label(m.get("allocator"))}


def time_ratios(result):
    """{(backend, shape, dtype): {mode: FastBiLSTM time / nn.LSTM time}} for one run: the inverse
    of the paired speedup (the median over round-robin rounds, CPU) where the row has it, else of
    the speedup of medians; MNIST epochs (--mnist) as seconds over nn.LSTM's, same data loader."""
    ratios = {}
    for r in result["rows"]:
        speedup = r.get("paired_speedup_vs_nn_lstm") or r.get("speedup_vs_nn_lstm")
        if r["impl"].startswith("fast-") and speedup and r["correct"] and "error" not in r:
            shape = r["shape_label"] + (f" {r['variant']}" if r["variant"] else "")
            ratios.setdefault((r["impl"][5:], shape, r["dtype"]), {})[r["mode"]] = 1 / speedup
    epochs = {(r["impl"], r["loader"], r.get("dtype", "fp32")): r for r in result.get("mnist") or []}
    for (impl, loader, dtype), r in epochs.items():
        torch_row = epochs.get(("nn.LSTM", loader, dtype))
        if impl.startswith("fast-") and torch_row:
            key = (impl[5:], "MNIST epoch, end to end", dtype)
            ratios[key] = {"training": r["seconds_per_epoch"] / torch_row["seconds_per_epoch"]}
    return {key: value for key, value in ratios.items() if key[0] in README_BACKENDS}


def readme_table(paths, link=lambda path: f"benchmarks/results/{path.name}"):
    """The README's results: FastBiLSTM time over nn.LSTM time for training and inference, a row
    per backend, shape, precision and run. Runs group by machine, one table each under a line
    naming it; within a machine, what differs between runs (date, threads, allocator) gets a
    column and what they share goes into that line."""
    groups = {}  # machine -> [(path, result, context)], in the order of README_SOURCES
    for path in map(Path, paths):
        result = json.loads(path.read_text())
        context = run_context(result)
        groups.setdefault(context.pop("machine"), []).append((path, result, context))
    blocks = ["FastBiLSTM time / nn.LSTM time (below 1.00: FastBiLSTM is faster); training: forward and "
              "backward, inference: forward under no_grad; CPU: median of paired rounds."]
    blocks += [machine_table(machine, runs, link) for machine, runs in groups.items()]
    return "\n\n".join(blocks)


def machine_table(machine, runs, link):
    """One machine's runs: the line naming it, the table, and each run's command and file."""
    varying = [k for k in runs[0][2] if len({context[k] for _, _, context in runs}) > 1]
    entries = {}  # (backend, shape, dtype) -> [(context, {mode: ratio})], in first-seen order
    for _, result, context in runs:
        for key, ratios in time_ratios(result).items():
            entries.setdefault(key, []).append((context, ratios))
    backends = sorted({backend for backend, _, _ in entries})
    several = len(backends) > 1
    header = [*(["backend"] if several else []), "shape", "precision", *varying, "training", "inference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * (len(header) - 2) + "--:|--:|"]
    for backend, shape, dtype in sorted(entries, key=lambda k: (k[0], k[1].startswith("MNIST epoch"))):
        for context, ratios in entries[(backend, shape, dtype)]:
            cells = [*([backend] if several else []), shape, dtype, *(context[k] for k in varying),
                     *(f"{ratios[m]:.2f}" if m in ratios else "-" for m in ("training", "inference"))]
            lines.append("| " + " | ".join(cells) + " |")
    shared = runs[0][2]
    said = [f"**{machine}**", *([f"backend {backends[0]}"] if len(backends) == 1 else [])]
    said += [f"{shared['threads']} torch threads"] if "threads" not in varying else []
    said += [f"allocator {shared['allocator']}"] if "allocator" not in varying else []
    said += [f"measured {shared['date']}"] if "date" not in varying else []
    by_command, envs = {}, {}
    for path, result, context in runs:
        label = ", ".join(context[k] for k in varying) or path.stem
        by_command.setdefault(f"python {result['command'].strip()}", []).append(f"[{label}]({link(path)})")
        if allocator_env(result["machine"].get("allocator")):
            envs[context["allocator"]] = allocator_env(result["machine"].get("allocator"))
    notes = [f"`{command}`: {', '.join(links)}" for command, links in by_command.items()]
    notes += [f"{label}: the same command under `{env}` (freed memory kept, as jemalloc or tcmalloc do)"
              for label, env in envs.items()]
    return "\n".join(["; ".join(said) + ":", "", *lines, "", *(f"- {note}" for note in notes)])


def replace_block(text, table):
    """The README's text with the block between the markers replaced by the table."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md: the markers {BEGIN!r} and {END!r} are missing or out of order")
    return text[:start + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def main(argv=None):
    p = argparse.ArgumentParser(description="The README's results table, from benchmark JSON files.")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's table from README_SOURCES")
    p.add_argument("files", nargs="*", help="print the table these JSON files give, to try a new run's")
    args = p.parse_args(argv)
    if args.readme == bool(args.files):
        p.error("give either --readme or JSON files")
    if args.files:
        print(readme_table(args.files, link=str))
        return
    table = readme_table([RESULTS / name for name in README_SOURCES])
    README.write_text(replace_block(README.read_text(encoding="utf-8"), table), encoding="utf-8")
    print(f"wrote the results table into {README}")


if __name__ == "__main__":
    main()
