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
"""
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs interpreted on CPU

from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

from bilstm_fast import FastBiLSTM  # noqa: E402
from helpers import every_backend  # noqa: E402

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
