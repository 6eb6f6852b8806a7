"""Train the classic row-by-row BiLSTM MNIST classifier with FastBiLSTM or nn.LSTM.

    python -m bilstm_fast.apps.train_mnist                       # FastBiLSTM: batch 64, Adam 1e-3, 3 epochs
    python -m bilstm_fast.apps.train_mnist --impl torch          # the same model on nn.LSTM
    python -m bilstm_fast.apps.train_mnist --compare --out DIR   # both, same weights, same batches
    python -m bilstm_fast.apps.train_mnist --dtype bfloat16      # model, data and Adam in bf16 (`.bfloat16()`)
    python -m bilstm_fast.apps.train_mnist --autocast bf16       # fp32 model and Adam, forward under autocast
    torchrun --nproc_per_node 2 -m bilstm_fast.apps.train_mnist  # DistributedDataParallel, a shard per rank

Each image is a sequence of 28 rows of 28 pixels; the classifier reads the BiLSTM's output at
the last time step. `--save` writes a state_dict that loads into either implementation.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from bilstm_fast.apps.data import DeviceBatches, find_mnist
from bilstm_fast.module import FastBiLSTM

IMPLS = ("fast", "torch")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# --autocast: the forward and loss under torch.autocast(device, dtype), parameters and Adam in fp32
AUTOCAST = {"bf16": torch.bfloat16}


class MnistClassifier(nn.Module):
    """BiLSTM (FastBiLSTM for impl='fast', nn.LSTM for impl='torch') + Linear(2H, 10) on the
    last time step. Both implementations share parameter names, so state_dicts interchange."""

    def __init__(self, impl="fast", input_size=28, hidden_size=256, num_layers=2, num_classes=10,
                 backend="auto"):
        super().__init__()
        if impl == "fast":
            self.lstm = FastBiLSTM(input_size, hidden_size, num_layers, batch_first=True,
                                   bidirectional=True, backend=backend)
        elif impl == "torch":
            self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True, bidirectional=True)
        else:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.fc = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, images):  # [B, 28, 28] -> logits [B, 10]
        out, _ = self.lstm(images)
        return self.fc(out[:, -1])


def build_model(impl, seed, device, hidden_size=256, backend="auto", dtype=torch.float32):
    """The same seed gives the same initial weights for either impl and on any device."""
    torch.manual_seed(seed)
    return MnistClassifier(impl, hidden_size=hidden_size, backend=backend).to(device, dtype)


# ----------------------------------------------------------------------------------------------
# Running: devices, distribution, progress


class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process without it."""

    def __init__(self, device_name):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_name is None:
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank if self.enabled else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def wrap(self, model):
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, *values):
        """Sums of numbers (or 0-d tensors) over all ranks, as Python floats."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line per `interval` seconds
    in a log. `describe` is called only when a line is drawn (it may synchronize the device)."""

    def __init__(self, total, label, enabled=True, interval=None, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.label, self.enabled = total, label, enabled
        self.interval = interval if interval is not None else (0.25 if self.tty else 30.0)
        self.start = self.last = time.perf_counter()
        self.width = 0

    def update(self, done, describe):
        now = time.perf_counter()
        if not self.enabled or (done < self.total and now - self.last < self.interval):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        filled = 24 * done // self.total
        line = (f"{self.label} [{'#' * filled}{'.' * (24 - filled)}] {done}/{self.total} {describe()} "
                f"{rate:.2f} steps/s ETA {format_seconds((self.total - done) / rate)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width) + ("\n" if done == self.total else ""))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def autocast_context(device, dtype):
    """torch.autocast in `dtype` (a torch dtype), or nothing for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def train_step(model, optimizer, images, labels, autocast=None):
    """One Adam step (the forward and loss under torch.autocast in the dtype `autocast`, if
    given); returns the (detached) mean loss and the number of correct predictions."""
    with autocast_context(images.device, autocast):
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


@torch.no_grad()
def evaluate(model, images, labels, batch_size=500, rank=0, world_size=1, autocast=None):
    """(loss sum, correct, count) over this rank's share (every world_size-th sample)."""
    model.eval()
    images, labels = images[rank::world_size], labels[rank::world_size]
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    for start in range(0, len(labels), batch_size):
        with autocast_context(labels.device, autocast):
            logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        # bf16 logits: the loss of a batch summed in fp32 at least, or it keeps 3 digits
        loss_sum += F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target,
                                    reduction="sum").double()
        correct += (logits.argmax(1) == target).sum()
    model.train()
    return loss_sum, correct, len(labels)


def load_batches(args, dist):
    # with --download, rank 0 fetches alone; the other ranks wait, then find its files
    if args.download and not dist.is_main:
        dist.barrier()
    (train_x, train_y, test_x, test_y), source = find_mnist(args.data_dir, args.download)
    if args.download and dist.is_main:
        dist.barrier()
    train_x, train_y = torch.from_numpy(train_x[: args.limit]), torch.from_numpy(train_y[: args.limit])
    test_x, test_y = torch.from_numpy(test_x[: args.test_limit]), torch.from_numpy(test_y[: args.test_limit])
    dtype = DTYPES[args.dtype]
    train = DeviceBatches(train_x, train_y, args.batch_size, dist.device, seed=args.seed,
                          rank=dist.rank, world_size=dist.world_size, dtype=dtype)
    # the test split is scored whole, each rank taking every world_size-th image
    test = DeviceBatches(test_x, test_y, args.eval_batch_size, dist.device, shuffle=False, dtype=dtype)
    if dist.is_main:
        print(f"data: {source}; training on {len(train_y)} images ({len(train)} steps/epoch"
              f"{f' per rank, {dist.world_size} ranks' if dist.enabled else ''}), "
              f"testing on {len(test_y)}", flush=True)
    return train, test


def run_training(args, dist):
    """Train one implementation; returns the per-epoch summary (on every rank)."""
    train, test = load_batches(args, dist)
    model = build_model(args.impl, args.seed, dist.device, args.hidden_size, args.backend, DTYPES[args.dtype])
    model = dist.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    epochs = []
    for epoch in range(args.epochs):
        progress = Progress(len(train), f"epoch {epoch + 1}/{args.epochs}", dist.is_main, args.log_interval)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        correct = torch.zeros((), dtype=torch.int64, device=dist.device)
        seen = 0
        synchronize(dist.device)
        start = time.perf_counter()
        for step, (images, labels) in enumerate(train.epoch(epoch), 1):
            loss, hits = train_step(model, optimizer, images, labels, AUTOCAST.get(args.autocast))
            loss_sum += loss.double() * len(labels)
            correct += hits
            seen += len(labels)
            progress.update(step, lambda: f"loss {loss_sum.item() / seen:.4f} acc {100 * correct.item() / seen:.2f}%")
        synchronize(dist.device)
        train_time = time.perf_counter() - start
        train_loss, train_correct, train_seen = dist.sum(loss_sum, correct, seen)
        start = time.perf_counter()
        test_loss, test_correct, test_seen = dist.sum(
            *evaluate(unwrap(model), test.images, test.labels, args.eval_batch_size, dist.rank, dist.world_size,
                      AUTOCAST.get(args.autocast))
        )
        stats = {
            "epoch": epoch + 1,
            "train_loss": train_loss / train_seen,
            "train_accuracy": 100 * train_correct / train_seen,
            "test_loss": test_loss / test_seen,
            "test_accuracy": 100 * test_correct / test_seen,
            "train_seconds": train_time,
            "steps_per_second": len(train) / train_time,
            "eval_seconds": time.perf_counter() - start,
        }
        epochs.append(stats)
        if dist.is_main:
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {stats['train_loss']:.4f}, "
                  f"train acc {stats['train_accuracy']:.2f}% (running), test loss {stats['test_loss']:.4f}, "
                  f"test acc {stats['test_accuracy']:.2f}%, {train_time:.1f} s "
                  f"({stats['steps_per_second']:.2f} steps/s), eval {stats['eval_seconds']:.1f} s", flush=True)
    if args.save and dist.is_main:
        save_state(unwrap(model), args.save)
    return {"mode": "train", "impl": args.impl, "epochs": epochs,
            "final_test_accuracy": epochs[-1]["test_accuracy"] if epochs else None}


def save_state(model, path):
    """A CPU state_dict whose keys (lstm.weight_ih_l0, ..., fc.bias) suit either impl."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    print(f"saved state_dict to {path}", flush=True)


# ----------------------------------------------------------------------------------------------
# Parity: both implementations, same start, same batches


def relative_differences(reference, other):
    return [abs(o - r) / abs(r) if r != 0 else abs(o) for r, o in zip(reference, other)]


CONTROL = "torch+1ulp"
# --compare's bound on the relative loss difference over the first steps. fp32: both forward and
# backward agree to ~1e-7, and this early Adam keeps the losses within 1e-4. bf16 (either way):
# outputs and gradients differ by a few bf16 roundings (~5e-3, benchmarks/NOTES.md), and a bf16
# loss (--dtype bfloat16) moves in steps of 0.4-0.8% of itself. Measured at seed 0, full model, first 100 steps:
# FastBiLSTM 2.0e-2 (--dtype bfloat16) and 2.2e-2 (--autocast bf16) from nn.LSTM, the control
# (nn.LSTM a bf16 ulp off) 0.20 and 0.18: 5e-2 sits between them.
REL_TOL = 1e-4
REL_TOL_BF16 = 5e-2


def nudge_one_ulp(model, dtype=None):
    """Move every parameter up by one ulp of `dtype` (default: its own dtype, where that is the
    next float up): a rounding-sized change of the start. Under autocast the weights are used in
    bf16, which would round a one-ulp fp32 change away, so the control moves them a bf16 ulp."""
    with torch.no_grad():
        for p in model.parameters():
            rounded = p.to(dtype or p.dtype)
            p.add_((torch.nextafter(rounded, torch.full_like(rounded, float("inf"))) - rounded).to(p.dtype))
    return model


def run_compare(args, dist):
    """Train nn.LSTM and FastBiLSTM side by side, step by step, on identical batches.

    With --control, a third model (nn.LSTM started one ulp away) shows how far two runs drift
    apart from rounding alone: training amplifies ~1e-7 differences until, after a few hundred
    steps, the runs are as different as two seeds. That drift is the yardstick for the gap."""
    train, test = load_batches(args, dist)
    dtype = DTYPES[args.dtype]
    models = {"torch": build_model("torch", args.seed, dist.device, args.hidden_size, dtype=dtype)}
    models["fast"] = build_model("fast", args.seed, dist.device, args.hidden_size, args.backend, dtype)
    models["fast"].load_state_dict(models["torch"].state_dict())  # identical start, not just same seed
    if args.control:
        models[CONTROL] = build_model("torch", args.seed, dist.device, args.hidden_size, dtype=dtype)
        models[CONTROL].load_state_dict(models["torch"].state_dict())
        nudge_one_ulp(models[CONTROL], AUTOCAST.get(args.autocast))
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=args.lr) for name, m in models.items()}
    losses = {name: [] for name in models}
    epochs = []
    step = 0
    for epoch in range(args.epochs):
        progress = Progress(len(train), f"epoch {epoch + 1}/{args.epochs}", True, args.log_interval)
        seconds = {name: 0.0 for name in models}
        correct = {name: 0 for name in models}
        for done, (images, labels) in enumerate(train.epoch(epoch), 1):
            for name, model in models.items():
                start = time.perf_counter()
                loss, hits = train_step(model, optimizers[name], images, labels, AUTOCAST.get(args.autocast))
                losses[name].append(loss.item())  # .item() synchronizes: the timing is honest
                correct[name] += hits.item()
                seconds[name] += time.perf_counter() - start
            step += 1
            if step % args.print_every == 0 or step == 1:
                line = f"step {step:5d}: loss torch {losses['torch'][-1]:.7f}"
                for name in list(models)[1:]:
                    rel = relative_differences(losses["torch"][-1:], losses[name][-1:])[0]
                    line += f", {name} {losses[name][-1]:.7f} (rel diff {rel:.2e})"
                print(line, flush=True)
            progress.update(done, lambda: f"loss torch {losses['torch'][-1]:.4f} fast {losses['fast'][-1]:.4f}")
        stats = {"epoch": epoch + 1}
        for name, model in models.items():
            test_loss, test_correct, test_seen = evaluate(model, test.images, test.labels, args.eval_batch_size,
                                                          autocast=AUTOCAST.get(args.autocast))
            epoch_losses = losses[name][-len(train):]
            stats[name] = {
                "train_loss": sum(epoch_losses) / len(epoch_losses),
                "train_accuracy": 100 * correct[name] / train.num_samples,
                "test_loss": test_loss.item() / test_seen,
                "test_accuracy": 100 * test_correct.item() / test_seen,
                "train_seconds": seconds[name],
            }
        epochs.append(stats)
        print(f"epoch {epoch + 1}/{args.epochs}: " + "; ".join(
            f"{name}: train loss {s['train_loss']:.4f}, train acc {s['train_accuracy']:.2f}%, "
            f"test acc {s['test_accuracy']:.2f}%, {s['train_seconds']:.1f} s"
            for name, s in ((n, stats[n]) for n in models)), flush=True)
    if args.save:
        save_state(models["fast"], args.save)
    return compare_summary(args, losses, epochs)


def drift(losses, epochs, name, first_steps):
    """How far `name`'s run is from nn.LSTM's: per-step loss and final test accuracy."""
    rel = relative_differences(losses["torch"], losses[name])
    final = epochs[-1][name]["test_accuracy"] - epochs[-1]["torch"]["test_accuracy"] if epochs else None
    return {
        "steps": len(rel),
        "first_steps": len(rel[:first_steps]),
        "max_rel_diff_first_steps": max(rel[:first_steps], default=0.0),
        "max_rel_diff_all_steps": max(rel, default=0.0),
        "test_accuracy_gap_points": None if final is None else abs(final),
    }


def compare_summary(args, losses, epochs):
    summary = {"mode": "compare", **drift(losses, epochs, "fast", args.first_steps)}
    if CONTROL in losses:
        summary["control"] = {"name": CONTROL, **drift(losses, epochs, CONTROL, args.first_steps)}
    final = {name: epochs[-1][name]["test_accuracy"] for name in losses} if epochs else {}
    summary.update({
        "final_test_accuracy": final,
        "tolerances": {"rel_diff_first_steps": args.rel_tol, "accuracy_points": args.acc_tol},
        "epochs": epochs,
        "losses": losses,
    })
    gap = summary["test_accuracy_gap_points"]
    summary["agree"] = summary["max_rel_diff_first_steps"] <= args.rel_tol and (gap is None or gap <= args.acc_tol)
    for name, d in [("fast", summary), *([(CONTROL, summary["control"])] if CONTROL in losses else [])]:
        print(f"{name} vs torch, per-step loss, max relative difference: first {d['first_steps']} steps "
              f"{d['max_rel_diff_first_steps']:.3e}, all {d['steps']} steps {d['max_rel_diff_all_steps']:.3e}")
    if final:
        print("final test accuracy: " + "  ".join(f"{name} {acc:.2f}%" for name, acc in final.items())
              + f"; fast-torch gap {gap:.2f} points")
    print(f"implementations {'agree' if summary['agree'] else 'DISAGREE'} (tolerances: first "
          f"{args.first_steps} steps {args.rel_tol:g} relative, accuracy {args.acc_tol:g} points)", flush=True)
    print(epoch_table(epochs, precision_label(args)), flush=True)
    return summary


LABELS = {"torch": "nn.LSTM", "fast": "FastBiLSTM", CONTROL: "nn.LSTM, 1 ulp off"}


def epoch_table(epochs, precision):
    """The runs side by side, epoch by epoch: losses, accuracies and training seconds."""
    lines = [f"same seed, same batches, {precision}:",
             f"{'epoch':>5}  {'model':18}  {'train loss':>10}  {'train acc':>9}  {'test loss':>9}  {'test acc':>8}  "
             f"{'train s':>8}"]
    for stats in epochs:
        for name, label in LABELS.items():
            if name in stats:
                s = stats[name]
                lines.append(f"{stats['epoch']:5d}  {label:18}  {s['train_loss']:10.4f}  {s['train_accuracy']:8.2f}%  "
                             f"{s['test_loss']:9.4f}  {s['test_accuracy']:7.2f}%  {s['train_seconds']:8.1f}")
    return "\n".join(lines)


def precision_label(args):
    """'float32', 'bfloat16', 'float32, autocast bf16'."""
    return args.dtype + (f", autocast {args.autocast}" if args.autocast else "")


def plot_losses(summary, path):
    """PNG of both loss curves and their relative differences; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot (pip install matplotlib to get it)",
              flush=True)
        return None
    losses = summary["losses"]
    steps = range(1, len(losses["torch"]) + 1)
    # zero differences drawn just under the rounding level of the math, so the log scale can show them
    hyper = summary["hyperparameters"]
    dtype = AUTOCAST[hyper["autocast"]] if hyper.get("autocast") else DTYPES[hyper["dtype"]]
    floor = torch.finfo(dtype).eps / 100
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    top.plot(steps, losses["torch"], label="nn.LSTM", linewidth=0.8)
    top.plot(steps, losses["fast"], label="FastBiLSTM", linewidth=0.8, alpha=0.8)
    top.set_ylabel("training loss (per step)")
    top.set_yscale("log")
    top.legend()
    top.set_title(f"MNIST BiLSTM, same start and batches ({summary['precision']})")
    for name, label, color in (("fast", "FastBiLSTM vs nn.LSTM", "C1"),
                               (CONTROL, "nn.LSTM one ulp off vs nn.LSTM (control)", "gray")):
        if name in losses:
            rel = relative_differences(losses["torch"], losses[name])
            bottom.semilogy(steps, [max(r, floor) for r in rel], linewidth=0.6, label=label, color=color)
    bottom.axhline(summary["tolerances"]["rel_diff_first_steps"], color="black", linestyle=":", linewidth=0.8)
    bottom.axvline(summary["first_steps"], color="black", linestyle=":", linewidth=0.8)
    bottom.legend(fontsize="small")
    bottom.set_ylabel("relative difference")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved loss plot to {path}", flush=True)
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def environment(device, world_size):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "world_size": world_size,
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_name()
        info["cpu_count"] = os.cpu_count()
    return info


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PATH_OPTIONS = ("--out", "--save", "--data-dir")


def command_line(argv):
    """The command as run, with path values hidden: results should not carry machine paths."""
    shown, hide_next = [], False
    for arg in argv:
        option = arg.split("=", 1)[0]
        if hide_next:
            arg = "<path>"
        elif option in PATH_OPTIONS and "=" in arg:
            arg = option + "=<path>"
        hide_next = arg in PATH_OPTIONS
        shown.append(arg)
    return " ".join(["python -m bilstm_fast.apps.train_mnist", *shown])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bilstm_fast.apps.train_mnist", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--impl", choices=IMPLS, default="fast", help="FastBiLSTM or nn.LSTM")
    p.add_argument("--compare", action="store_true", help="train both implementations side by side")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=("auto", "vectorized", "triton"),
                   help="FastBiLSTM backend")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="per process under torchrun")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="parameters, images and Adam's state; float64 takes rounding out of --compare")
    p.add_argument("--autocast", choices=tuple(AUTOCAST), default=None,
                   help="float32 parameters and Adam, the forward and loss under torch.autocast in this dtype")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--limit", type=int, default=None, help="train on the first LIMIT images only")
    p.add_argument("--test-limit", type=int, default=None, help="test on the first TEST_LIMIT images only")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--data-dir", default=None, help="directory holding torchvision's MNIST files")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST if not found")
    p.add_argument("--save", default=None, help="write the trained state_dict here (--compare: FastBiLSTM's)")
    p.add_argument("--out", default=None, help="directory for the JSON summary (and the --compare plot)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-interval", type=float, default=None,
                   help="seconds between progress lines (default: live on a terminal, 30 in a log)")
    p.add_argument("--control", action="store_true",
                   help="--compare: also train nn.LSTM from weights one ulp away, to show rounding-only drift")
    p.add_argument("--print-every", type=int, default=100, help="--compare: print every N-th step's losses")
    p.add_argument("--first-steps", type=int, default=100, help="--compare: the early window checked")
    p.add_argument("--rel-tol", type=float, default=None,
                   help=f"--compare: allowed relative loss difference over the first steps (default {REL_TOL:g}, "
                        f"bf16: {REL_TOL_BF16:g})")
    p.add_argument("--acc-tol", type=float, default=0.3, help="--compare: allowed test accuracy gap, points")
    args = p.parse_args(argv)
    if args.autocast and args.dtype != "float32":
        p.error("--autocast runs a float32 model: leave --dtype at float32")
    if args.rel_tol is None:
        args.rel_tol = REL_TOL_BF16 if args.dtype == "bfloat16" or args.autocast == "bf16" else REL_TOL
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = Distributed(args.device)
    try:
        if args.compare and dist.enabled:
            raise SystemExit("--compare runs in one process; start it without torchrun")
        summary = run_compare(args, dist) if args.compare else run_training(args, dist)
        if dist.is_main:
            summary = {"command": command_line(argv), "environment": environment(dist.device, dist.world_size),
                       "precision": precision_label(args),
                       "hyperparameters": {k: getattr(args, k) for k in (
                           "impl", "backend", "dtype", "autocast", "epochs", "batch_size", "lr", "hidden_size", "seed",
                           "limit", "test_limit")}, **summary}
            if args.out:
                write_results(summary, args.out, dist.device)
        # tear down together: a rank that destroyed its gloo group while rank 0 was still writing
        # the results aborted at exit ("terminate called without an active exception") about one
        # 2-process run in 12. Not in `finally`: after an error on one rank this would wait forever.
        dist.barrier()
    finally:
        dist.close()
    return summary


def write_results(summary, out_dir, device):
    os.makedirs(out_dir, exist_ok=True)
    if summary["mode"] == "compare":
        stem = f"mnist_compare_{device.type}"
    else:
        stem = f"mnist_train_{summary['impl']}_{device.type}"
    if summary["hyperparameters"]["dtype"] != "float32":
        stem += "_" + summary["hyperparameters"]["dtype"]
    if summary["hyperparameters"]["autocast"]:
        stem += "_autocast_" + summary["hyperparameters"]["autocast"]
    if summary["mode"] == "compare":
        summary["plot"] = os.path.basename(plot_losses(summary, os.path.join(out_dir, stem + ".png")) or "") or None
    path = os.path.join(out_dir, stem + ".json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
