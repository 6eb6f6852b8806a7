"""MNIST seconds per training epoch, end to end, per implementation (--mnist)."""
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .implementations import nn_lstm_refusal
from .precision import Precision


def write_idx(path, array):
    """An IDX file (the format torchvision's MNIST reads) from a uint8 or int64 array."""
    import numpy as np

    array = np.ascontiguousarray(array)
    code = 0x08  # unsigned byte
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def torchvision_mnist(images, labels, root):
    """torchvision.datasets.MNIST over the same training images, written as IDX files under
    root: the classic per-sample pipeline (PIL image, ToTensor) with a DataLoader."""
    from torchvision import datasets, transforms

    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    write_idx(raw / "t10k-images-idx3-ubyte", images[:1])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:1])
    return datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())


CHUNK = 10  # steps an implementation runs before the next takes its turn


def run_mnist(args, device, impls, log):
    """Seconds per training epoch of the MNIST classifier (batch 64, Adam) per implementation and
    precision (--dtypes, default fp32: a bf16 model with bf16 images and Adam state, or an fp32
    one trained under autocast, as train_mnist's --dtype bfloat16 and --autocast bf16 do). With
    --mnist-steps N, N steps are timed after warm-up and scaled to a full epoch."""
    from bilstm_fast.apps.data import DeviceBatches, find_mnist
    from bilstm_fast.apps.train_mnist import build_model, train_step

    (train_x, train_y, _, _), source = find_mnist(args.mnist_data)
    batch_size, warmup = 64, 3
    steps_per_epoch = -(-len(train_y) // batch_size)
    steps = min(args.mnist_steps or steps_per_epoch, steps_per_epoch)
    log(f"MNIST from {source}: {len(train_y)} training images, {steps_per_epoch} steps/epoch, "
        f"timing {steps} steps after {warmup} warm-up steps")
    precs = [Precision(name, "") for name in args.dtypes or ["fp32"]]
    batches = {prec.dtype: DeviceBatches(torch.from_numpy(train_x), torch.from_numpy(train_y), batch_size, device,
                                         seed=0, dtype=prec.dtype) for prec in precs}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def endless(make_epoch):
        epoch = 0
        while True:
            yield from make_epoch(epoch)
            epoch += 1

    class Run:
        """One implementation's model, optimizer and batch stream, timed a chunk of steps at a time."""

        def __init__(self, model, batch_stream, autocast=None):
            self.model, self.batches, self.autocast, self.seconds = model, batch_stream, autocast, 0.0
            self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def steps(self, n, timed=True):
            sync()
            start = time.perf_counter()
            for _ in range(n):
                images, labels = next(self.batches)
                train_step(self.model, self.optimizer, images, labels, self.autocast)
            sync()
            if timed:
                self.seconds += time.perf_counter() - start

    def timed_together(runs):
        """Seconds per epoch of each Run. They take turns, CHUNK steps each, so a burst of load
        from other processes, or a slow drift of the machine's speed, lands on all of them alike
        (timed one after another, whole runs minutes apart moved the ratio by 10%)."""
        for run in runs:
            run.steps(warmup, timed=False)
        done = 0
        while done < steps:
            chunk = min(CHUNK, steps - done)
            for run in runs:
                run.steps(chunk)
            done += chunk
        return [run.seconds * steps_per_epoch / steps for run in runs]

    runs, names = [], []
    for prec in precs:
        for impl in impls:
            model = build_model("torch", 0, device)
            if impl.name != "nn.LSTM":
                model.lstm = impl.build(model.lstm)
            refusal = nn_lstm_refusal(prec, device) if isinstance(model.lstm, nn.LSTM) else None
            if refusal is not None:  # nn.LSTM's limit on this CPU (implementations.nn_lstm_refusal): no row
                log(f"  {impl.name:16s} {prec.label():13s} unsupported on this machine in this precision: {refusal}")
                continue
            runs.append(Run(model.to(prec.dtype), endless(batches[prec.dtype].epoch), prec.autocast))
            names.append((impl.name, prec.label()))
    rows = []
    for (impl, dtype), seconds in zip(names, timed_together(runs)):
        rows.append({"impl": impl, "dtype": dtype, "loader": "device-resident", "seconds_per_epoch": seconds,
                     "steps_timed": steps})
        log(f"  {impl:16s} {dtype:13s} device-resident loader: {seconds:8.1f} s/epoch")
    del runs
    # alone, after the others: its worker processes would take cores from whatever ran beside them
    with tempfile.TemporaryDirectory() as root:
        dataset = torchvision_mnist(train_x, train_y, root)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             num_workers=args.mnist_workers, pin_memory=device.type == "cuda")

        def loader_epoch(epoch):
            for images, labels in loader:
                yield images.squeeze(1).to(device, non_blocking=True), labels.to(device, non_blocking=True)

        (seconds,) = timed_together([Run(build_model("torch", 0, device), endless(loader_epoch))])
        rows.append({"impl": "nn.LSTM", "dtype": "fp32", "seconds_per_epoch": seconds, "steps_timed": steps,
                     "loader": f"torchvision DataLoader ({args.mnist_workers} workers)"})
        log(f"  {'nn.LSTM':16s} torchvision DataLoader: {seconds:8.1f} s/epoch")
    for row in rows:
        row["extrapolated"] = steps < steps_per_epoch
    return rows
