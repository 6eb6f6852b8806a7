"""Gradients as tensors, not only as values: what a training script does to `.grad`.

Clipping, accumulation and in-place gradient edits act on each parameter's `.grad` tensor. If
two parameters' gradients shared one storage (as the summed biases once did, and the stacked
weights of both directions), every in-place edit would hit that storage twice. Each test runs
FastBiLSTM beside nn.LSTM from the same weights and compares what the script sees.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs interpreted on CPU

from helpers import every_backend  # noqa: E402
from helpers import make_pair as module_pair  # noqa: E402

BACKENDS = every_backend()

CONFIGS = {  # id: (num_layers, bidirectional, bias)
    "bi-1layer": (1, True, True),
    "uni-1layer": (1, False, True),
    "bi-2layer": (2, True, True),
    "uni-2layer": (2, False, True),
    "bi-nobias": (1, True, False),
}
I, H, T, B = 3, 5, 4, 2


def make_pair(config, backend):
    """nn.LSTM and an independent FastBiLSTM copy of it, float64."""
    layers, bidirectional, bias = CONFIGS[config]
    return module_pair(I, H, layers, torch.float64, bias=bias, bidirectional=bidirectional, backend=backend)


def backward(model, seed, dtype=torch.float64):
    """A loss touching every output, with different weights per element."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    out, (h_n, c_n) = model(x)
    weights = torch.randn(out.shape, generator=g, dtype=dtype)
    ((out * weights).sum() + h_n.sum() + (c_n * c_n).sum()).backward()


def grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def assert_grads_match(ref, fast, **tol):
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(fast)[name], g, **tol, msg=lambda m: f"{name}: {m}")


def assert_no_shared_storage(model):
    owners = {}
    for name, g in grads(model).items():
        assert g is not None, name
        owners.setdefault(g.untyped_storage().data_ptr(), []).append(name)
    shared = [names for names in owners.values() if len(names) > 1]
    assert not shared, f"gradients sharing one storage: {shared}"


F64 = dict(rtol=1e-10, atol=1e-12)
ids = dict(ids=str)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_every_grad_is_its_own_tensor(config, backend):
    _, fast = make_pair(config, backend)
    backward(fast, seed=1)
    assert_no_shared_storage(fast)
    backward(fast, seed=2)  # accumulated into the existing .grad tensors
    assert_no_shared_storage(fast)
    fast.zero_grad(set_to_none=False)
    backward(fast, seed=3)
    assert_no_shared_storage(fast)


def clip_to_half_the_norm(model):
    backward(model, seed=1)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    # half the norm: every gradient is scaled by exactly 0.5, once
    torch.nn.utils.clip_grad_norm_(model.parameters(), total.item() / 2)


def accumulate_after_zero_grad(model):
    backward(model, seed=1)
    model.zero_grad(set_to_none=False)
    backward(model, seed=2)
    backward(model, seed=3)


def edit_in_place(model):
    """A hook-style in-place edit on each gradient must act on that gradient alone."""
    backward(model, seed=1)
    for p in model.parameters():
        p.grad.mul_(3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("script", [clip_to_half_the_norm, accumulate_after_zero_grad, edit_in_place],
                         ids=lambda f: f.__name__)
def test_what_scripts_do_to_grads_gives_nn_lstm_grads(script, config, backend):
    ref, fast = make_pair(config, backend)
    script(ref)
    script(fast)
    assert_grads_match(ref, fast, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["bi-2layer", "uni-1layer"])
def test_training_with_clipping_follows_nn_lstm(config, backend):
    """SGD with momentum and gradient clipping, zero_grad(set_to_none=False), float64: the
    parameters follow nn.LSTM's step for step, to rounding."""
    ref, fast = make_pair(config, backend)
    runs = []
    for model in (ref, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(6):
            opt.zero_grad(set_to_none=False)
            backward(model, seed=10 + step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the raw norm is well above 1
            opt.step()
        runs.append(dict(model.named_parameters()))
    for name, p in runs[0].items():
        torch.testing.assert_close(runs[1][name], p, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [("bias_ih_l0",), ("bias_ih_l0_reverse", "bias_hh_l0_reverse"), ("weight_ih_l0",)],
                         ids=str)
def test_frozen_parameters_get_no_grad_and_the_rest_nn_lstm_grads(frozen, backend):
    """A frozen bias term (one of a direction's two, or both) or weight: no gradient for it, and
    nn.LSTM's for the others (each direction's need flags are read on their own)."""
    ref, fast = make_pair("bi-1layer", backend)
    for model in (ref, fast):
        for name in frozen:
            getattr(model, name).requires_grad_(False)
        backward(model, seed=3)
    for name, g in grads(ref).items():
        if name in frozen:
            assert g is None and grads(fast)[name] is None, name
        else:
            torch.testing.assert_close(grads(fast)[name], g, **F64, msg=lambda m: f"{name}: {m}")
