"""MNIST seconds per training epoch, end to end, per implementation (--mnist)."""
import tempfile
import time
from pathlib import Path

import torch


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


def run_mnist(args, device, impls, log):
    """Seconds per training epoch of the MNIST classifier (batch 64, Adam) per implementation.
    With --mnist-steps N, N steps are timed after warm-up and scaled to a full epoch."""
    from bilstm_fast.data import DeviceBatches, find_mnist
    from bilstm_fast.train_mnist import build_model, train_step

    (train_x, train_y, _, _), source = find_mnist(args.mnist_data)
    batch_size, warmup = 64, 3
    steps_per_epoch = -(-len(train_y) // batch_size)
    steps = min(args.mnist_steps or steps_per_epoch, steps_per_epoch)
    log(f"MNIST from {source}: {len(train_y)} training images, {steps_per_epoch} steps/epoch, "
        f"timing {steps} steps after {warmup} warm-up steps")
    batches = DeviceBatches(torch.from_numpy(train_x), torch.from_numpy(train_y), batch_size, device, seed=0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_epoch(model, batch_iter):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(warmup):
            images, labels = next(batch_iter)
            train_step(model, optimizer, images, labels)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            images, labels = next(batch_iter)
            train_step(model, optimizer, images, labels)
        sync()
        return (time.perf_counter() - start) * steps_per_epoch / steps

    def endless(make_epoch):
        epoch = 0
        while True:
            yield from make_epoch(epoch)
            epoch += 1

    rows = []
    for impl in impls:
        model = build_model("torch", 0, device)
        if impl.name != "nn.LSTM":
            model.lstm = impl.build(model.lstm)
        seconds = timed_epoch(model, endless(batches.epoch))
        rows.append({"impl": impl.name, "loader": "device-resident", "seconds_per_epoch": seconds,
                     "steps_timed": steps})
        log(f"  {impl.name:16s} device-resident loader: {seconds:8.1f} s/epoch")
    with tempfile.TemporaryDirectory() as root:
        dataset = torchvision_mnist(train_x, train_y, root)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             num_workers=args.mnist_workers, pin_memory=device.type == "cuda")

        def loader_epoch(epoch):
            for images, labels in loader:
                yield images.squeeze(1).to(device, non_blocking=True), labels.to(device, non_blocking=True)

        model = build_model("torch", 0, device)
        seconds = timed_epoch(model, endless(loader_epoch))
        rows.append({"impl": "nn.LSTM", "loader": f"torchvision DataLoader ({args.mnist_workers} workers)",
                     "seconds_per_epoch": seconds, "steps_timed": steps})
        log(f"  {'nn.LSTM':16s} torchvision DataLoader: {seconds:8.1f} s/epoch")
    for row in rows:
        row["extrapolated"] = steps < steps_per_epoch
    return rows
