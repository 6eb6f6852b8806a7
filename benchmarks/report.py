"""The table, and the JSON, CSV and PNG files of a run."""
import csv
import json

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
