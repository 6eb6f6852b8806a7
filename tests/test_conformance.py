"""PyTorch's own test material for nn.LSTM, run against FastBiLSTM: every ModuleInfo sample
input (torch.testing._internal.common_modules: bias, batch_first, bidirectional, proj_size 0
and 2, unbatched input with and without hx) and every error input, on every available backend.

Each sample builds nn.LSTM and FastBiLSTM from the same constructor arguments and weights and
compares outputs, states and the gradients of inputs, states and every parameter under a
weighted loss. Tolerances: float64 rtol 1e-10 (both sides are exact up to rounding; the
differences seen are ~1e-15). float32 rtol 1e-5, and atol 1e-6 times the tensor's largest
magnitude (at least 1): a weight gradient sums terms as large as the inputs (make_tensor draws
them from [-9, 9]), so its rounding error scales with the tensor, not with each element. Measured
on sample 28 (bidirectional, bias, batch_first): weight_ih_l0_reverse's gradient has magnitude
up to 5.5, and nn.LSTM's own fp32 result is 9.4e-7 from the float64 one (FastBiLSTM's 4.9e-7),
so two fp32 results may differ by ~1.5e-6 on a small element of it.

test_module_info_gradients runs test/test_modules.py's test_grad and test_gradgrad on FastBiLSTM:
PyTorch's gradcheck and gradgradcheck wrappers (batched gradients on, fast mode) in float64, of the
outputs with respect to the inputs and all parameters, then each parameter alone. The whole matrix
(32 samples x train/eval x every backend x both checks) takes hours on a 2-core CPU, the Triton
interpreter nearly all of it (~0.3 s a call, ~100 s a sample): CI runs a rotation of it (see
ci_picks), BILSTM_FAST_FULL_GRADCHECK=1 all of it.
"""
import os

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs interpreted on CPU

from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402
from torch.testing._internal.common_utils import freeze_rng_state, gradcheck, gradgradcheck  # noqa: E402

from bilstm_fast import FastBiLSTM  # noqa: E402
from helpers import every_backend, torch_threads  # noqa: E402

BACKENDS = every_backend()

LSTM_INFO = next(info for info in module_db if info.module_cls is nn.LSTM)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def tolerance(dtype, want):
    tol = dict(TOL[dtype])
    tol["atol"] *= max(1.0, want.abs().max().item()) if want.numel() else 1.0
    return tol


def samples(dtype, training):
    return LSTM_INFO.module_inputs_func(LSTM_INFO, device="cpu", dtype=dtype, requires_grad=True, training=training)


def sample_id(k, sample):
    kw = sample.constructor_input.kwargs
    tags = [f"s{k}", "bi" if kw["bidirectional"] else "uni", f"proj{kw['proj_size']}"]
    tags += ["bias"] * kw["bias"] + ["batch_first"] * kw["batch_first"]
    tags.append("hx" if len(sample.forward_input.args) > 1 else "no-hx")
    return "-".join(tags)


SAMPLE_IDS = [sample_id(k, s) for k, s in enumerate(samples(torch.float64, True))]
assert len(SAMPLE_IDS) == 32  # 16 configurations, with and without hx; half with proj_size=2


def flat(result):
    out, (h, c) = result
    return [out, h, c]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("k", range(len(SAMPLE_IDS)), ids=SAMPLE_IDS)
def test_module_info_sample(k, dtype, training, backend):
    sample = samples(dtype, training)[k]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(k)
    ref = nn.LSTM(*args, **kwargs, dtype=dtype).train(training)
    fast = FastBiLSTM(*args, **kwargs, dtype=dtype, backend=backend).train(training)
    fast.load_state_dict(ref.state_dict())
    assert list(fast.state_dict()) == list(ref.state_dict())

    results = []
    for model in (ref, fast):
        inputs = [t.detach().clone().requires_grad_() for t in _tensors(sample.forward_input.args)]
        call_args = _rebuild(sample.forward_input.args, iter(inputs))
        outputs = flat(model(*call_args, **sample.forward_input.kwargs))
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=dtype)).sum() for o in outputs)
        grads = torch.autograd.grad(loss, inputs + list(model.parameters()))
        results.append(outputs + list(grads))
    want, got = results
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, j
        torch.testing.assert_close(g, w, **tolerance(dtype, w), msg=lambda m: f"result {j}: {m}")


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from _tensors(a)


def _rebuild(args, fresh):
    return tuple(next(fresh) if isinstance(a, torch.Tensor) else _rebuild(a, fresh) if isinstance(a, (tuple, list))
                 else a for a in args)


ERRORS = LSTM_INFO.module_error_inputs_func(LSTM_INFO, device="cpu", dtype=torch.float32, requires_grad=False,
                                            training=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(len(ERRORS)), ids=[f"e{k}-{e.error_type.__name__}" for k, e in enumerate(ERRORS)])
def test_module_info_error_input(k, backend):
    """The same exception type and message as nn.LSTM's, at the same stage."""
    error = ERRORS[k]
    ctor = error.module_error_input.constructor_input
    with pytest.raises(error.error_type, match=error.error_regex):
        model = FastBiLSTM(*ctor.args, **ctor.kwargs, backend=backend)
        assert error.error_on == ModuleErrorEnum.FORWARD_ERROR, "construction should have failed"
        forward = error.module_error_input.forward_input
        model(*forward.args, **forward.kwargs)
    # and nn.LSTM fails the same way (the material is nn.LSTM's own)
    with pytest.raises(error.error_type, match=error.error_regex):
        model = nn.LSTM(*ctor.args, **ctor.kwargs)
        forward = error.module_error_input.forward_input
        model(*forward.args, **forward.kwargs)


# ------------------------------------------------------------- gradients, as test_modules.py does

CHECKS = {"grad": gradcheck, "gradgrad": gradgradcheck}
FULL_GRADCHECK = os.environ.get("BILSTM_FAST_FULL_GRADCHECK", "") not in ("", "0")
# What CI runs of the matrix (about 30 s on a 2-core CPU). Sample k is configuration k // 2
# (bias, batch_first, bidirectional, proj_size in turn, the last fastest), without (even k) and
# with (odd k) hx. test_grad: every sample, on the CPU backends in turn and in train and eval
# mode in turn, so each backend meets both directions, both proj sizes, hx and none.
# test_gradgrad (5-20x test_grad's time; the backend only runs the forward, whose output the plain
# torch recompute behind create_graph=True differentiates): one sample per direction count and
# proj size, without bias (the bias adds two parameters, and a partial check each).
GRADGRAD_IN_CI = (1, 2, 5, 6)
# Triton under the interpreter costs ~0.3 s a forward or backward at these sizes and one check runs
# ~20 of them: in CI one partial check of test_grad, with hx and both directions, on the second
# layer's reverse weight (its gradient passes through both layers' backward). The partial checks
# differ across backends only in function.py's need flags, which the vectorized backend shares.
TRITON_IN_CI = ("grad", 4, "weight_hh_l1_reverse")


def ci_picks(check, k, training, backend, cpu):
    """Whether CI runs this case of the matrix, and on which parameters: None for all of them
    (test_modules.py's checks), else the name of the one parameter of a single partial check."""
    if backend == "triton":
        return (check, k) == TRITON_IN_CI[:2] and training, TRITON_IN_CI[2]
    if check == "gradgrad":
        if k not in GRADGRAD_IN_CI:
            return False, None
        turn = GRADGRAD_IN_CI.index(k)
    else:
        turn = k + k // 2  # config parity + hx: the backends alternate within each configuration's pair
    return backend == cpu[turn % len(cpu)] and training == (k // 4 % 2 == 0), None


def gradient_cases():
    names = [b.values[0] if hasattr(b, "values") else b for b in BACKENDS]
    cpu = [name for name in names if name != "triton"]
    for check in CHECKS:
        for k in range(len(SAMPLE_IDS)):
            for training in (True, False):
                for backend, param in zip(names, BACKENDS):
                    picked, only = ci_picks(check, k, training, backend, cpu)
                    if FULL_GRADCHECK or picked:
                        only = None if FULL_GRADCHECK else only
                        case_id = f"{SAMPLE_IDS[k]}-{check}-{'train' if training else 'eval'}-{backend}"
                        yield pytest.param(check, k, training, backend, only, marks=getattr(param, "marks", ()),
                                           id=case_id + (f"-{only}" if only else ""))


@pytest.mark.parametrize("check, k, training, backend, only", gradient_cases())
def test_module_info_gradients(check, k, training, backend, only):
    """test_modules.py's _test_gradients_helper: the total derivative (inputs and every
    parameter), then the partial derivatives with respect to the inputs and each parameter alone;
    with `only`, that one partial check."""
    sample = samples(torch.float64, training)[k]
    model = FastBiLSTM(*sample.constructor_input.args, **sample.constructor_input.kwargs, dtype=torch.float64,
                       backend=backend).train(training)
    args = sample.forward_input.args
    assert not sample.forward_input.kwargs  # nn.LSTM's samples pass everything positionally
    params = dict(model.named_parameters())
    spec = None

    def fn(*flat):
        rebuilt = tree_unflatten(flat, spec)
        with freeze_rng_state():
            return tree_leaves(model(*rebuilt[:len(args)]))

    def run_check():
        nonlocal spec
        flat, spec = tree_flatten(args + tuple(params.values()))
        assert CHECKS[check](fn, flat, nondet_tol=0.0)

    # one thread: at these sizes (T <= 3, B = 1, H = 3) the native backend's fork/join per call
    # costs more than the work, and on a shared 2-core machine many times more
    with torch_threads(1):
        if only is None:
            run_check()
        for p in params.values():
            p.requires_grad_(False)
        for name in [only] if only else params:
            params[name].requires_grad_(True)
            run_check()
            params[name].requires_grad_(False)
