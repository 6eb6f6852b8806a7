"""benchmarks/run.py: the --quick smoke run, and its correctness gate.

The gate matters more than the timings: a fast kernel that computes the wrong thing must come
out as WRONG, untimed, with a failing exit status. Each planted bug below is one a real kernel
could have, sized to sit just above the fp32 tolerance (1e-4) or to hide in one place only.
"""
import copy
import functools
import importlib.util
import json
import statistics
import subprocess
import sys

import pytest
import torch

from bilstm_fast import FastBiLSTM
from helpers import REPO, load_script, nn_lstm_bf16_autocast_available

RUN_PY = REPO / "benchmarks" / "run.py"
run = load_script("benchmarks/run.py", "benchmarks_run")


@pytest.mark.slow
def test_quick_cli_writes_checked_rows(tmp_path):
    """The CLI end to end: every implementation checked and timed in both modes, the packed
    variant with its ratio, and JSON + CSV (+ PNG with matplotlib) in --out."""
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), "--quick", "--shapes", "mnist,varlen", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "median ms" in proc.stdout and "WRONG" not in proc.stdout
    (json_path,) = tmp_path.glob("*_quick.json")
    csv_header = json_path.with_suffix(".csv").read_text().splitlines()[0].split(",")
    assert "paired_speedup_vs_nn_lstm" in csv_header and "rounds_ms" not in csv_header  # raw samples: JSON only
    if importlib.util.find_spec("matplotlib") is not None:
        assert json_path.with_suffix(".png").exists()
    result = json.loads(json_path.read_text())
    assert result["machine"]["torch"] == torch.__version__
    rows = result["rows"]
    impls = {r["impl"] for r in rows}
    assert {"fast-vectorized", "nn.LSTM", "vanilla"} <= impls
    # one row per (impl, mode, shape variant, precision): mnist in fp32, bf16 and bf16-autocast
    # (the CPU default on the shapes), varlen/packed and varlen/padded in fp32 only
    assert len(rows) == len(impls) * 2 * (3 + 2)
    assert {r["dtype"] for r in rows if r["shape"] == "mnist"} == {"fp32", "bf16", "bf16-autocast"}
    assert {r["dtype"] for r in rows if r["shape"] == "varlen"} == {"fp32"}
    # nn.LSTM's own limit on an AVX2-only CPU: its rows unsupported, the others without a ratio to it
    refused = set() if nn_lstm_bf16_autocast_available() else {"bf16-autocast"}
    for r in rows:
        if r["impl"] == "nn.LSTM" and r["dtype"] in refused:
            assert "unsupported" in r and "median_ms" not in r, r
            continue
        assert r["correct"] and r["check_rel_err"] < r["check_tolerance"], r
        assert 0 < r["q20_ms"] <= r["median_ms"] <= r["q80_ms"], r
        assert r["tokens_per_s"] > 0 and r["gflop"] > 0 and r["floor_ms"] > 0
        if r["impl"] == "nn.LSTM":
            assert r["speedup_vs_nn_lstm"] == pytest.approx(1.0)
            assert r["paired_speedup_vs_nn_lstm"] == 1.0  # its own samples, round by round
        if r["dtype"] in refused:
            assert r["speedup_vs_nn_lstm"] is None and r["paired_speedup_vs_nn_lstm"] is None
        else:
            assert r["paired_speedup_vs_nn_lstm"] > 0, r
        assert len(r["rounds_ms"]) >= 4, r
        # reduced precision is also set against nn.LSTM in fp32, paired (timed in the same rounds)
        assert (r["dtype"] == "fp32") == ("paired_speedup_vs_nn_lstm_fp32" not in r), r
        if r["dtype"] != "fp32":
            assert r["check_tolerance"] == 1e-1 and r["paired_speedup_vs_nn_lstm_fp32"] > 0
        if r["variant"] == "packed":
            assert r["packed_over_padded"] > 0
            assert r["tokens"] < r["B"] * r["T"]  # the packed batch has padding to skip


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward scales the gradient: a kernel with a wrong backward only."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class Planted(FastBiLSTM):
    """FastBiLSTM with one bug planted after the real computation."""

    bug = None

    def forward(self, input, hx=None):
        out, state = super().forward(input, hx)
        if self.bug == "output-off-by-1e-3":
            out = out * (1 + 1e-3)
        elif self.bug == "gradient-off-by-1e-3":
            out = ScaleGrad.apply(out, 1 + 1e-3)
        elif self.bug == "one-batch-row-stale":
            out = out.clone()
            out[:, -1] = out[:, -1].detach()  # the last sequence gets no gradient
        return out, state


def swapped_directions(lstm):
    """nn.LSTM with the forward and reverse weights exchanged: directions mixed up."""
    swapped = type(lstm)(lstm.input_size, lstm.hidden_size, lstm.num_layers, bidirectional=True)
    state = lstm.state_dict()
    for name in state:
        if name.endswith("_reverse"):
            forward = name[: -len("_reverse")]
            state[name], state[forward] = state[forward], state[name]
    swapped.load_state_dict(state)
    return swapped


def planted(bug):
    def build(lstm):
        model = Planted.from_lstm(lstm, backend="vectorized", copy=True)
        model.bug = bug
        return model

    return build


WRONG = {
    "output-off-by-1e-3": planted("output-off-by-1e-3"),
    "gradient-off-by-1e-3": planted("gradient-off-by-1e-3"),
    "one-batch-row-stale": planted("one-batch-row-stale"),
    "directions-swapped": lambda lstm: FastBiLSTM.from_lstm(swapped_directions(lstm), backend="vectorized", copy=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", list(WRONG))
def test_wrong_implementation_is_reported_not_timed(bug, tmp_path, capsys):
    impls = [run.Impl("fast-vectorized", lambda lstm: FastBiLSTM.from_lstm(lstm, backend="vectorized", copy=True)),
             run.Impl(f"planted-{bug}", WRONG[bug])]
    status = run.main(["--quick", "--shapes", "mnist", "--modes", "training", "--dtypes", "fp32",
                       "--out", str(tmp_path)], impls=impls)
    assert status == 1
    printed = capsys.readouterr().out
    assert "WRONG" in printed and "FAILED" in printed
    (json_path,) = tmp_path.glob("*.json")
    rows = {r["impl"]: r for r in json.loads(json_path.read_text())["rows"]}
    good, bad = rows["fast-vectorized"], rows[f"planted-{bug}"]
    assert good["correct"] and good["median_ms"] > 0
    assert not bad["correct"] and bad["check_rel_err"] > bad["check_tolerance"]
    assert "median_ms" not in bad  # never timed


class Recording(FastBiLSTM):
    """FastBiLSTM that notes, at each forward, the input and weight dtypes and the autocast dtype
    (not an nn.LSTM: that raises under bf16 autocast on a CPU without AVX-512)."""

    seen = set()

    def forward(self, input, hx=None):
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.seen.add((input.dtype, self.weight_ih_l0.dtype, autocast))
        return super().forward(input, hx)


def copy_into(cls, lstm):
    """A `cls` (nn.LSTM's constructor) with lstm's sizes and weights."""
    model = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, bidirectional=lstm.bidirectional)
    model.load_state_dict(lstm.state_dict())
    return model


def test_bf16_rows_run_as_users_ask_and_are_gated(tmp_path, monkeypatch):
    """bf16 (modules and inputs cast) and bf16-autocast (fp32 ones under torch.autocast) rows run
    every implementation that way; the float64 gate still catches a wrong one in both (swapped
    directions: ~2.4 against the bf16 tolerance 1e-1); reduced-precision rows are also set
    against nn.LSTM's fp32 row, round by round. nn.LSTM's bf16-autocast row is unsupported, not
    failed, on a CPU where nn.LSTM raises there (no AVX-512)."""
    monkeypatch.setattr(Recording, "seen", set())
    impls = [run.Impl("nn.LSTM", lambda lstm: copy.deepcopy(lstm)),
             run.Impl("recording", lambda lstm: copy_into(Recording, lstm)),
             run.Impl("swapped", WRONG["directions-swapped"])]
    status = run.main(["--quick", "--shapes", "tiny", "--modes", "inference", "--dtypes", "fp32,bf16,bf16-autocast",
                       "--out", str(tmp_path)], impls=impls)
    assert status == 1  # the swapped one
    assert Recording.seen == {(torch.float32, torch.float32, None), (torch.bfloat16, torch.bfloat16, None),
                              (torch.float32, torch.float32, torch.bfloat16)}
    (json_path,) = tmp_path.glob("*.json")
    rows = {(r["impl"], r["dtype"]): r for r in json.loads(json_path.read_text())["rows"]}
    assert len(rows) == 9
    dtypes = ("fp32", "bf16", "bf16-autocast")
    assert [key for key, r in rows.items() if run.failed(r)] == [("swapped", dtype) for dtype in dtypes]
    for dtype in dtypes:
        assert rows["recording", dtype]["correct"]
        runs = dtype != "bf16-autocast" or nn_lstm_bf16_autocast_available()
        assert rows["nn.LSTM", dtype]["correct"] == runs and ("unsupported" in rows["nn.LSTM", dtype]) == (not runs)
        assert rows["swapped", dtype]["check_rel_err"] > 1 and "median_ms" not in rows["swapped", dtype]
    torch_fp32 = rows["nn.LSTM", "fp32"]
    for dtype in ("bf16", "bf16-autocast"):
        r = rows["recording", dtype]
        torch_ms = rows["nn.LSTM", dtype].get("median_ms")
        assert r.get("speedup_vs_nn_lstm") == (pytest.approx(torch_ms / r["median_ms"]) if torch_ms else None)
        assert r["speedup_vs_nn_lstm_fp32"] == pytest.approx(torch_fp32["median_ms"] / r["median_ms"])
        assert r["paired_speedup_vs_nn_lstm_fp32"] == run.paired_speedup(torch_fp32["rounds_ms"], r["rounds_ms"])
        # timed in the same rounds: all but the last where one of the two took >= 20 ms on its first
        # timed call (a descheduled tiny call on a loaded machine), which timing.Sampler counts as a
        # sample, so it needs one round fewer
        rounds, fp32_rounds = set(r["rounds_ms"]), set(torch_fp32["rounds_ms"])
        assert len(rounds & fp32_rounds) >= min(len(rounds), len(fp32_rounds)) >= 4


class Refusing:
    """Raises, under autocast, what the test below has nn_lstm_refusal find nn.LSTM raising."""

    def forward(self, input, hx=None):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("no bf16 LSTM on this CPU")
        return super().forward(input, hx)


class RefusingLSTM(Refusing, torch.nn.LSTM):
    pass


class RefusingFast(Refusing, FastBiLSTM):
    pass


def test_nn_lstms_own_limit_is_unsupported_not_failed(tmp_path, monkeypatch, capsys):
    """nn.LSTM raising in a precision what it raises there on any input (nn_lstm_refusal: oneDNN's
    bf16 LSTM without AVX-512) is reported unsupported, untimed, and fails nothing; the same error
    from a FastBiLSTM is an ERROR that fails the run."""
    from benchmarks import cases

    refusal = repr(RuntimeError("no bf16 LSTM on this CPU"))
    monkeypatch.setattr(cases, "nn_lstm_refusal", lambda prec, device: refusal if prec.autocast else None)
    impls = [run.Impl("nn.LSTM", lambda lstm: copy_into(RefusingLSTM, lstm)),
             run.Impl("fast-vectorized", lambda lstm: FastBiLSTM.from_lstm(lstm, backend="vectorized", copy=True)),
             run.Impl("fast-refusing", lambda lstm: RefusingFast.from_lstm(lstm, backend="vectorized", copy=True))]
    status = run.main(["--quick", "--shapes", "tiny", "--modes", "inference", "--dtypes", "fp32,bf16-autocast",
                       "--out", str(tmp_path)], impls=impls)
    printed = capsys.readouterr().out
    assert status == 1
    (json_path,) = tmp_path.glob("*.json")
    rows = {(r["impl"], r["dtype"]): r for r in json.loads(json_path.read_text())["rows"]}
    assert [key for key, r in rows.items() if run.failed(r)] == [("fast-refusing", "bf16-autocast")]
    refused = rows["fast-refusing", "bf16-autocast"]
    assert "error" in refused and "unsupported" not in refused
    torch_row = rows["nn.LSTM", "bf16-autocast"]
    assert refusal in torch_row["unsupported"] and "median_ms" not in torch_row and "error" not in torch_row
    assert rows["nn.LSTM", "fp32"]["correct"] and rows["fast-vectorized", "bf16-autocast"]["median_ms"] > 0
    assert "UNSUPPORTED nn.LSTM inference tiny bf16-autocast" in printed and "WRONG" not in printed


def test_machine_line_says_what_bf16_runs_on(monkeypatch):
    from benchmarks import machine

    assert machine.cpu_bf16(None) is None
    flags = machine.cpu_bf16({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})
    assert flags == {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}
    assert machine.bf16_text({"cpu_bf16": flags}) == "bf16: AMX yes, AVX512-BF16 yes"
    no_amx = machine.cpu_bf16({"avx512f", "avx512_bf16"})
    assert machine.bf16_text({"cpu_bf16": no_amx}) == "bf16: AMX no, AVX512-BF16 yes"
    assert "unknown" in machine.bf16_text({"cpu_bf16": None})
    # the native backend's own account of its bf16 GEMM, where it gives one
    monkeypatch.setattr(machine.native, "bf16_gemm", lambda: "some GEMM", raising=False)
    monkeypatch.setattr(machine.native, "available", lambda: True)
    info = machine.machine_info(torch.device("cpu"))
    assert info["native_bf16_gemm"] == "some GEMM"
    assert "; bf16: " in machine.machine_line(info) and ", native bf16 GEMM: some GEMM; " in machine.machine_line(info)
    if info["cpu_bf16"] is not None:  # Linux: the flags are this CPU's
        assert set(info["cpu_bf16"]) == {"amx_bf16", "amx_tile", "avx512_bf16"}


def test_flops_count_by_hand():
    # one layer, bidirectional, B*T = 6 tokens, I=5, H=8: 2*4H*(I+H) per token and direction
    shape = run.Shape("t", B=2, T=3, I=5, H=8)
    assert run.lstm_flops(shape, "inference") == 2 * 32 * (5 + 8) * 2 * 6
    # backward: dh (H), dW_hh (H), dW_ih (I); no dx for the first layer
    assert run.lstm_flops(shape, "training") == (2 * 32 * 13 + 2 * 32 * (16 + 5)) * 2 * 6
    two = run.Shape("t", B=2, T=3, I=5, H=8, layers=2, bidirectional=False)
    second = 2 * 32 * (8 + 8) + 2 * 32 * (16 + 8 + 8)  # input is H wide; dx counted
    assert run.lstm_flops(two, "training") == (2 * 32 * 13 + 2 * 32 * 21 + second) * 6


def test_quantiles_of_samples():
    stats = run.quantiles([5.0, 1.0, 2.0, 4.0, 3.0])
    assert stats["median_s"] == 3.0 and stats["samples"] == 5 and stats["min_s"] == 1.0
    assert 1.0 < stats["q20_s"] < 3.0 < stats["q80_s"] < 5.0


def test_machine_line_names_the_allocator(monkeypatch):
    """CPU times depend on the C allocator (NOTES.md attempt 34): the machine line says which."""
    from benchmarks import machine

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert machine.allocator() == "glibc malloc, defaults"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.x=1:glibc.malloc.trim_threshold=9")
    assert machine.allocator() == "glibc malloc (glibc.malloc.trim_threshold=9)"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert machine.allocator() == "LD_PRELOAD libjemalloc.so.2"
    assert "allocator: LD_PRELOAD libjemalloc.so.2" in machine.machine_line(machine.machine_info(torch.device("cpu")))


def test_paired_speedup_sets_each_round_against_the_same_round():
    # nn.LSTM sampled in a slow phase (rounds 0-2), the other implementation then and in a fast
    # phase after (rounds 3-6): 2x faster round for round, while the medians' ratio says 6x
    reference = {0: 3.0, 1: 3.0, 2: 3.0}
    other = {0: 1.5, 1: 1.5, 2: 1.5, 3: 0.5, 4: 0.5, 5: 0.5, 6: 0.5}
    assert run.paired_speedup(reference, other) == 2.0
    assert statistics.median(reference.values()) / statistics.median(other.values()) == 6.0
    assert run.paired_speedup({0: 2.0, 1: 4.0, 2: 9.0}, {1: 1.0, 2: 3.0}) == 3.5  # common rounds only
    assert run.paired_speedup({0: 1.0}, {1: 1.0}) is None


def test_implementation_that_raises_is_reported_and_the_run_goes_on(tmp_path, capsys):
    def broken(lstm):
        model = FastBiLSTM.from_lstm(lstm, backend="vectorized", copy=True)
        model.forward = lambda *args: (_ for _ in ()).throw(RuntimeError("kernel launch failed"))
        return model

    impls = [run.Impl("broken", broken),
             run.Impl("fast-vectorized", lambda lstm: FastBiLSTM.from_lstm(lstm, backend="vectorized", copy=True))]
    status = run.main(["--quick", "--shapes", "mnist", "--modes", "inference", "--dtypes", "fp32",
                       "--out", str(tmp_path)], impls=impls)
    assert status == 1
    assert "kernel launch failed" in capsys.readouterr().out
    (json_path,) = tmp_path.glob("*.json")
    rows = {r["impl"]: r for r in json.loads(json_path.read_text())["rows"]}
    assert "kernel launch failed" in rows["broken"]["error"] and "median_ms" not in rows["broken"]
    assert rows["fast-vectorized"]["median_ms"] > 0


def test_loaded_run_has_both_implementations_under_a_busy_process(tmp_path, capsys):
    """--loaded: the rows are timed with a second process spinning on one core, which is gone
    afterwards; the machine line and every row say so."""
    import os

    from benchmarks import load

    started = []
    real_enter = load.BusyProcess.__enter__

    def enter(self):
        started.append(real_enter(self))
        return started[-1]

    load.BusyProcess.__enter__ = enter
    try:
        status = run.main(["--quick", "--loaded", "--shapes", "mnist", "--modes", "inference", "--dtypes", "fp32",
                           "--out", str(tmp_path)])
    finally:
        load.BusyProcess.__enter__ = real_enter
    assert status == 0
    assert "LOADED" in capsys.readouterr().out
    (busy,) = started
    assert busy.process.poll() is not None  # killed at the end
    if hasattr(os, "sched_setaffinity"):
        assert "pinned to core 0" in busy.description
    (json_path,) = tmp_path.glob("*_quick_loaded.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert {"nn.LSTM", "fast-vectorized"} <= {r["impl"] for r in rows}
    assert all(r["loaded"] for r in rows)


@pytest.mark.slow
def test_mnist_epochs_take_turns(tmp_path, monkeypatch):
    """--mnist-only: every implementation gets the same number of timed steps, and they take
    turns CHUNK steps at a time (so load from elsewhere lands on all of them alike) after each
    one's warm-up; the seconds per epoch are scaled from the timed steps. In the precision
    --dtypes asks for (here bf16-autocast: fp32 models, each step under autocast; bf16 models
    where nn.LSTM refuses autocast, without AVX-512); the torchvision DataLoader row stays
    nn.LSTM in fp32."""
    import bilstm_fast.apps.train_mnist as train_mnist
    from benchmarks import mnist_epoch

    order, autocasts = [], {}
    real_step = train_mnist.train_step

    def recording_step(model, optimizer, images, labels, autocast=None):
        order.append(id(model))
        autocasts[id(model)] = (images.dtype, next(model.parameters()).dtype, autocast)
        return real_step(model, optimizer, images, labels, autocast)

    monkeypatch.setattr(train_mnist, "train_step", recording_step)
    # H=8: a bf16 step of the H=256 model takes seconds on a CPU without AVX512-BF16
    monkeypatch.setattr(train_mnist, "build_model", functools.partial(train_mnist.build_model, hidden_size=8))
    monkeypatch.setattr(mnist_epoch, "CHUNK", 1)
    impls = [run.Impl("fast-vectorized", lambda lstm: FastBiLSTM.from_lstm(lstm, backend="vectorized", copy=True)),
             run.Impl("nn.LSTM", lambda lstm: lstm)]
    fp32, bf16 = torch.float32, torch.bfloat16
    autocast = nn_lstm_bf16_autocast_available()
    dtype, asked = ("bf16-autocast", (fp32, fp32, bf16)) if autocast else ("bf16", (bf16, bf16, None))
    status = run.main(["--mnist-only", "--mnist-steps", "3", "--mnist-workers", "0", "--dtypes", dtype,
                       "--out", str(tmp_path)], impls=impls)
    assert status == 0
    warmup, steps = 3, 3
    first, second, loader = order[:warmup], order[warmup:2 * warmup], order[2 * (warmup + steps):]
    assert len(set(first)) == 1 and len(set(second)) == 1 and first[0] != second[0]
    timed = order[2 * warmup:2 * warmup + 2 * steps]
    assert timed == [first[0], second[0]] * steps  # turns, one step each
    assert len(order) == 2 * (warmup + steps) + warmup + steps  # then the DataLoader row alone
    assert len(set(loader)) == 1 and loader[0] not in (first[0], second[0])
    assert [autocasts[k] for k in (first[0], second[0], loader[0])] == [asked, asked, (fp32, fp32, None)]
    (json_path,) = tmp_path.glob("*_mnist.json")
    rows = json.loads(json_path.read_text())["mnist"]
    assert [(r["impl"], r["dtype"], r["loader"].split()[0]) for r in rows] == [
        ("fast-vectorized", dtype, "device-resident"), ("nn.LSTM", dtype, "device-resident"),
        ("nn.LSTM", "fp32", "torchvision")]
    assert all(r["seconds_per_epoch"] > 0 and r["steps_timed"] == steps and r["extrapolated"] for r in rows)


def test_mnist_epoch_leaves_out_nn_lstm_where_it_refuses_the_precision(tmp_path, monkeypatch, capsys):
    """--mnist in a precision nn.LSTM refuses on this CPU (benchmarks.implementations.nn_lstm_refusal:
    bf16 autocast without AVX-512, planted here in fp32): its row is left out and the log says why;
    FastBiLSTM's is timed. On 128 random images (two steps) and H=8, so it runs in seconds."""
    import numpy as np

    from benchmarks import mnist_epoch
    from bilstm_fast.apps import data, train_mnist

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (128, 28, 28), dtype=np.uint8), rng.integers(0, 10, 128)
    monkeypatch.setattr(data, "find_mnist", lambda *args: ((images, labels, images, labels), "random"))
    monkeypatch.setattr(train_mnist, "build_model", functools.partial(train_mnist.build_model, hidden_size=8))
    refusal = repr(RuntimeError("no LSTM in this precision on this CPU"))
    monkeypatch.setattr(mnist_epoch, "nn_lstm_refusal", lambda prec, device: refusal)
    impls = [run.Impl("fast-vectorized", lambda lstm: FastBiLSTM.from_lstm(lstm, backend="vectorized", copy=True)),
             run.Impl("nn.LSTM", lambda lstm: lstm)]
    status = run.main(["--mnist-only", "--mnist-steps", "1", "--mnist-workers", "0", "--dtypes", "fp32",
                       "--out", str(tmp_path)], impls=impls)
    assert status == 0
    assert f"nn.LSTM          fp32          unsupported on this machine in this precision: {refusal}" \
        in capsys.readouterr().out
    (json_path,) = tmp_path.glob("*_mnist.json")
    rows = json.loads(json_path.read_text())["mnist"]
    assert [(r["impl"], r["dtype"], r["loader"].split()[0]) for r in rows] == [
        ("fast-vectorized", "fp32", "device-resident"), ("nn.LSTM", "fp32", "torchvision")]
