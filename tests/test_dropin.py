"""Drop-in fidelity: what real training scripts do around an nn.LSTM must work unchanged with
FastBiLSTM swapped in (issue 17). Each test names the symptom it guards against.
"""
import io
import os
import warnings

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs interpreted on CPU

from bilstm_fast import FastBiLSTM, swap_lstm  # noqa: E402
from helpers import (  # noqa: E402
    ONEDNN_REFUSED,
    TOL,
    every_backend,
    nn_lstm_bf16_autocast_available,
    nn_lstm_under_bf16_autocast,
)

BACKENDS = every_backend()

F32, F64 = TOL[torch.float32], TOL[torch.float64]


# ---------------------------------------------------------------- global state


def global_state():
    """Every process-wide switch a library could flip by accident, and the RNG states."""
    b = torch.backends
    state = {
        "mkldnn.enabled": b.mkldnn.enabled,
        "cudnn.enabled": b.cudnn.enabled,
        "cudnn.benchmark": b.cudnn.benchmark,
        "cudnn.deterministic": b.cudnn.deterministic,
        "cudnn.allow_tf32": b.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32,
        "cuda.matmul.allow_fp16_reduced_precision_reduction": b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cuda.matmul.allow_bf16_reduced_precision_reduction": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "cpu_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def assert_same_state(before, after):
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), f"{key} changed"
        elif isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(value, after[key])), f"{key} changed"
        else:
            assert value == after[key], f"{key} changed: {value} -> {after[key]}"


@pytest.mark.parametrize("mode", ["train", "eval", "autocast-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_no_global_state_changes(dtype, mode, bidirectional, backend):
    """fp16/bf16 matmuls on strided views made oneDNN fail; PyTorch then printed "mkldnn_matmul
    failed, switching to baddbmm" and set torch.backends.mkldnn.enabled = False for the whole
    process (after which nn.LSTM itself returned fp32 under bf16 autocast)."""
    if mode == "autocast-bf16" and dtype != torch.float32:
        pytest.skip("autocast takes fp32 modules")
    torch.manual_seed(0)
    model = FastBiLSTM(16, 32, num_layers=2, bidirectional=bidirectional, backend=backend).to(dtype)
    x = torch.randn(20, 8, 16, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([20, 17, 15, 9, 9, 4, 2, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
    before = global_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "mkldnn_matmul failed" is a UserWarning
        for inp in (x, packed):
            model.train(mode != "eval")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast-bf16"):
                out, (h, c) = model(inp)
            out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
            if mode != "eval":
                (out.float().sum() + h.float().sum() + c.float().sum()).backward()
    assert_same_state(before, global_state())
    # and nn.LSTM still behaves as on this CPU under autocast: bf16 from oneDNN, or oneDNN's refusal
    # where it has no bf16 LSTM (AVX2 only); fp32 would mean oneDNN had been switched off
    expected = torch.bfloat16 if nn_lstm_bf16_autocast_available() else ONEDNN_REFUSED
    assert nn_lstm_under_bf16_autocast() == expected


# ---------------------------------------------------------------- swapping


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


def test_swap_draws_no_random_numbers():
    """Construction used to initialize weights (drawing from the global RNG) that were then
    overwritten: a seeded script was no longer the same script after the swap."""
    torch.manual_seed(0)
    model = Tagger()
    before = torch.get_rng_state()
    swap_lstm(model)
    assert torch.equal(before, torch.get_rng_state())
    FastBiLSTM.from_lstm(nn.LSTM(3, 4), copy=True)
    nn.LSTM(3, 4)  # (this one draws, as it should)
    before = torch.get_rng_state()
    FastBiLSTM.from_lstm(nn.LSTM(3, 4, device="meta"))
    FastBiLSTM.from_lstm(nn.LSTM(3, 4, device="meta"), copy=True)
    assert torch.equal(before, torch.get_rng_state())


def test_optimizer_built_before_the_swap_trains_the_swapped_model():
    """swap_lstm made new Parameters, so an optimizer built before it trained nothing."""
    torch.manual_seed(0)
    model, ref = Tagger(), Tagger()
    ref.load_state_dict(model.state_dict())
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    tokens = torch.randint(0, 10, (3, 7))
    for step in range(3):
        if step == 1:
            swap_lstm(model)  # mid-training, with Adam state already there
            assert type(model.rnn) is FastBiLSTM
            assert all(p is params[n] for n, p in model.named_parameters())
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(tokens).square().mean().backward()
            o.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], p, **F32, msg=name)


def test_swap_keeps_requires_grad():
    model = Tagger()
    model.rnn.weight_ih_l0.requires_grad_(False)
    model.rnn.bias_hh_l1_reverse.requires_grad_(False)
    frozen = {n for n, p in model.rnn.named_parameters() if not p.requires_grad}
    swap_lstm(model)
    assert {n for n, p in model.rnn.named_parameters() if not p.requires_grad} == frozen
    model(torch.randint(0, 10, (2, 5))).sum().backward()
    assert model.rnn.weight_ih_l0.grad is None and model.rnn.weight_hh_l0.grad is not None


def test_swap_keeps_weight_norm_parametrization():
    """load_state_dict used to fail on a parametrized LSTM (weight_norm on weight_hh_l0)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, bidirectional=True, dtype=torch.float64)
    weight_norm(ref, "weight_hh_l0")
    fast = FastBiLSTM.from_lstm(ref, copy=True)
    assert parametrize.is_parametrized(fast, "weight_hh_l0") and isinstance(fast, FastBiLSTM)
    assert fast.parametrizations.weight_hh_l0.original0 is not ref.parametrizations.weight_hh_l0.original0
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for m in (ref, fast):
        m(x)[0].square().sum().backward()
    torch.testing.assert_close(fast(x)[0], ref(x)[0], **F64)
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, **F64, msg=name)
    moved = swap_lstm(nn.Sequential(ref))[0]
    assert moved.parametrizations.weight_hh_l0 is ref.parametrizations.weight_hh_l0


def test_tied_module_stays_tied():
    """A module registered twice was swapped in one place only."""
    lstm = nn.LSTM(3, 4, bidirectional=True)
    model = nn.ModuleDict({"a": lstm, "b": lstm, "inner": nn.Sequential(lstm)})
    swap_lstm(model)
    assert type(model["a"]) is FastBiLSTM
    assert model["a"] is model["b"] is model["inner"][0]


def test_subclass_with_its_own_forward_is_left_with_a_warning():
    class Residual(nn.LSTM):
        def forward(self, x, hx=None):
            out, state = super().forward(x, hx)
            return out + x.repeat(1, 1, 2), state

    model = nn.Sequential(Residual(4, 2, bidirectional=True), nn.LSTM(4, 3))
    with pytest.warns(UserWarning, match=r"0 \(Residual\).*overrides nn.LSTM.forward"):
        swap_lstm(model)
    assert type(model[0]) is Residual and type(model[1]) is FastBiLSTM
    with pytest.raises(TypeError, match="overrides nn.LSTM.forward"):
        FastBiLSTM.from_lstm(Residual(4, 2))

    class Tagged(nn.LSTM):  # no forward of its own: swapped
        pass

    assert type(swap_lstm(nn.Sequential(Tagged(2, 3)))[0]) is FastBiLSTM


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_to_lstm_is_the_inverse(bidirectional):
    torch.manual_seed(0)
    fast = FastBiLSTM(3, 5, num_layers=2, bidirectional=bidirectional, batch_first=True, dropout=0.1)
    params = list(fast.parameters())
    before = torch.get_rng_state()
    lstm = fast.to_lstm()
    assert torch.equal(before, torch.get_rng_state())
    assert type(lstm) is nn.LSTM and all(a is b for a, b in zip(lstm.parameters(), params))
    assert (lstm.batch_first, lstm.dropout, lstm.bidirectional, lstm.num_layers) == (True, 0.1, bidirectional, 2)
    x = torch.randn(2, 6, 3)
    lstm.eval(), fast.eval()
    torch.testing.assert_close(lstm(x)[0], fast(x)[0], **F32)
    back = FastBiLSTM.from_lstm(lstm)
    assert all(a is b for a, b in zip(back.parameters(), params))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:torch.quantize_per_tensor")
def test_quantization_path_through_to_lstm():
    """quantize_dynamic knows only nn.LSTM and silently leaves a FastBiLSTM in float."""
    from bilstm_fast import unswap_lstm

    torch.manual_seed(0)
    model = swap_lstm(Tagger()).eval()
    tokens = torch.randint(0, 10, (2, 5))
    expected = model(tokens)
    quantized = torch.ao.quantization.quantize_dynamic(unswap_lstm(model), {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    assert isinstance(quantized.rnn, torch.ao.nn.quantized.dynamic.LSTM)
    torch.testing.assert_close(quantized(tokens), expected, rtol=0, atol=0.05)  # int8 weights


def test_repr_of_unidirectional_says_so():
    assert repr(FastBiLSTM(5, 4, bidirectional=False)) == "FastBiLSTM(5, 4, bidirectional=False)"
    assert repr(FastBiLSTM(5, 4)) == "FastBiLSTM(5, 4, bidirectional=True)"


# ---------------------------------------------------------------- persistence


def test_pickled_model_loads_with_the_weights_only_unpickler():
    """torch.save(model) then torch.load (weights_only=True by default) failed on
    bilstm_fast.module.FastBiLSTM, where the same script with nn.LSTM (allowlisted) loads."""
    torch.manual_seed(0)
    model = nn.Sequential(FastBiLSTM(3, 4, backend="vectorized"))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([nn.Sequential]):
        loaded = torch.load(buf)
    assert type(loaded[0]) is FastBiLSTM and loaded[0].backend == "vectorized"
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


# ---------------------------------------------------------------- autograd and transforms


def pair(backend, dtype=torch.float64, seed=0, **config):
    torch.manual_seed(seed)
    config = {"input_size": 3, "hidden_size": 4, "bidirectional": True, **config}
    ref = nn.LSTM(**config, dtype=dtype)
    fast = FastBiLSTM.from_lstm(ref, backend=backend, copy=True)
    return ref, fast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=False), dict(proj_size=2)],
                         ids=["bi", "uni-2layer", "proj"])
def test_gradient_penalty_double_backward(backend, config):
    """create_graph=True failed: no autograd formula for bilstm_fast::recurrence_backward. The
    penalty |d out / d x|^2 and its gradient with respect to every parameter, against nn.LSTM
    (float64: both are exact up to rounding, 1e-10)."""
    ref, fast = pair(backend, **config)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 3])
    results = []
    for model in (ref, fast):
        for packed in (False, True):
            inp = nn.utils.rnn.pack_padded_sequence(x, lengths) if packed else x
            out, (h, c) = model(inp)
            out = out.data if packed else out
            loss = out.square().sum() + (h.square().sum() * c.sum())
            (gx,) = torch.autograd.grad(loss, x, create_graph=True)
            penalty = gx.square().sum()
            grads = torch.autograd.grad(penalty, list(model.parameters()))
            results.append((penalty, *grads))
    for got, want in zip(results[2:], results[:2]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **F64)


@pytest.mark.slow
def test_gradgradcheck_float64():
    from bilstm_fast import lstm_layer

    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    T, B, I, H, D, P = 3, 2, 2, 3, 2, 2
    for w_hr, hidden in ((None, H), (rand(D, P, H), P)):
        inputs = [rand(T, B, I), rand(D, 4 * H, I), rand(D, 4 * H, hidden), rand(D, 4 * H),
                  rand(D, B, hidden), rand(D, B, H)]
        lens = torch.tensor([3, 2])
        extra = [] if w_hr is None else [w_hr]

        def op(x, w_ih, w_hh, b, h0, c0, *w_hr):
            return lstm_layer(x, w_ih, w_hh, b, h0, c0, lens, backend="vectorized", w_hr=w_hr[0] if w_hr else None)

        assert torch.autograd.gradgradcheck(op, inputs + extra, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_with_functional_call(backend):
    """torch.func.grad failed: the Function had no setup_context."""
    from torch.func import functional_call, grad

    ref, fast = pair(backend, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def loss(model):
        return lambda params, x: functional_call(model, params, (x,))[0].square().sum()

    got = grad(loss(fast))(dict(fast.named_parameters()), x)
    want = grad(loss(ref))(dict(ref.named_parameters()), x)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F64, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_jacrev_and_vmap(backend):
    from torch.func import functional_call, jacrev, vmap

    ref, fast = pair(backend)
    x = torch.randn(3, 1, 3, dtype=torch.float64)  # jacrev runs one backward per output element
    params = dict(fast.named_parameters())
    got = jacrev(lambda x: functional_call(fast, params, (x,))[0])(x)
    want = jacrev(lambda x: ref(x)[0])(x)
    torch.testing.assert_close(got, want, **F64)
    xs = torch.randn(2, 3, 2, 3, dtype=torch.float64)  # vmap over a leading axis of inputs
    torch.testing.assert_close(vmap(lambda x: fast(x)[0])(xs), torch.stack([ref(x)[0] for x in xs]), **F64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_meta_device_forward(train, proj_size):
    """A forward on the meta device failed ("unknown device type for autocast"); nn.LSTM
    returns meta outputs of the right shapes, and so must we, backward included."""
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=proj_size, device="meta")
    fast = FastBiLSTM(3, 4, num_layers=2, proj_size=proj_size, device="meta").train(train)
    x = torch.empty(5, 2, 3, device="meta", requires_grad=train)
    got, want = fast(x), ref(x)
    assert got[0].device.type == "meta"
    assert [t.shape for t in (got[0], *got[1])] == [t.shape for t in (want[0], *want[1])]
    if train:
        got[0].sum().backward()
        assert x.grad.shape == x.shape and fast.weight_hh_l1.grad.device.type == "meta"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("proj_size", [0, 2])
def test_jit_trace_save_load_round_trip(proj_size):
    """jit.trace with grad enabled failed its trace check (the output copy depended on grad
    mode), and jit.save could not export the Python autograd.Function."""
    ref, fast = pair("vectorized", dtype=torch.float32, num_layers=2, proj_size=proj_size)
    traced = torch.jit.trace(fast, torch.randn(3, 2, 3))  # grad enabled, the default
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(6, 4, 3, requires_grad=True)  # another T and B than traced
    results = []
    for model in (loaded, ref):
        out, (h, c) = model(x)
        (gx,) = torch.autograd.grad(out.square().sum() + h.sum() + c.sum(), x)
        results.append((out, h, c, gx))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, **F32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], ref(x)[0], **F32)


def test_jit_script_error_points_to_what_works():
    with pytest.raises(RuntimeError, match=r"torch.compile.*torch.jit.trace.*to_lstm\(\)"):
        torch.jit.script(FastBiLSTM(3, 4))
    torch.jit.script(FastBiLSTM(3, 4).to_lstm())  # the way it points to does work


# ---------------------------------------------------------------- fidelity details


@pytest.mark.parametrize("kind", ["unbatched", "packed-unsorted"])
def test_stacked_hx_where_nn_lstm_takes_it(kind):
    """nn.LSTM takes hx as one tensor [2, L*D, (B,) H] where it rebuilds the pair itself:
    unbatched input, and packed input with sorted_indices (FastBiLSTM raised TypeError). The
    calls it refuses are in test_errors.py."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ref, fast = pair("auto", num_layers=2)
    if kind == "unbatched":
        x, hx = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    else:
        x, hx = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(2, 4, 2, 4, dtype=torch.float64)
    results = []
    for model in (ref, fast):
        stacked = hx.clone().requires_grad_()
        inp = x if kind == "unbatched" else pack_padded_sequence(x, torch.tensor([3, 5]), enforce_sorted=False)
        out, (h_n, c_n) = model(inp, stacked)
        out = out if kind == "unbatched" else out.data
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        loss = (out * weights).sum() + h_n.sum() + c_n.square().sum()
        results.append([out, h_n, c_n, *torch.autograd.grad(loss, [stacked, *model.parameters()])])
    for k, (got, want) in enumerate(zip(results[1], results[0])):
        torch.testing.assert_close(got, want, **F64, msg=lambda m: f"result {k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dropout_draws_the_masks_nn_lstm_draws(backend, packed):
    """With dropout between layers on packed input, nn.LSTM drops elements of the packed data;
    FastBiLSTM dropped elements of the padded tensor, so the same seed gave other masks and a
    training run was not reproducible across the swap. Same seed, same masks, same numbers
    (fp64, 1e-10), and the RNG left in the same state."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=3, bidirectional=True, dropout=0.5, dtype=torch.float64)
    fast = FastBiLSTM.from_lstm(ref, backend=backend, copy=True)
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 6, 1, 4])
    results = []
    for model in (ref, fast):
        torch.manual_seed(123)
        inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, (h, c) = model(inp)
        out = out.data if packed else out
        (gx,) = torch.autograd.grad(out.sum() + h.sum() + c.sum(), x)
        results.append((out, h, c, gx, torch.get_rng_state()))
    for got, want in zip(results[1][:4], results[0][:4]):
        torch.testing.assert_close(got, want, **F64)
    assert torch.equal(results[1][4], results[0][4])


PROJ_CASES = {  # id: (num_layers, bidirectional, bias, batch_first)
    "bi-2layer": (2, True, True, False),
    "uni-1layer": (1, False, True, True),
    "bi-nobias": (1, True, False, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PROJ_CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, F64), (torch.float32, F32)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_proj_size_matches_nn_lstm(backend, case, dtype, tol, packed):
    """proj_size > 0 raised NotImplementedError. LSTMP: h = (o * tanh(c)) @ W_hr^T, with
    weight_hr_l{k}[_reverse] as nn.LSTM names it. Outputs, states and every gradient against
    nn.LSTM from the same weights: fp64 to 1e-10 (both exact up to rounding), fp32 to 1e-5
    relative (a few ulps of accumulated rounding over T=7 steps)."""
    num_layers, bidirectional, bias, batch_first = PROJ_CASES[case]
    torch.manual_seed(0)
    ref = nn.LSTM(5, 6, num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first,
                  proj_size=3, dtype=dtype)
    fast = FastBiLSTM.from_lstm(ref, backend=backend, copy=True)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert "weight_hr_l0" in fast.state_dict()
    D = 2 if bidirectional else 1
    x = torch.randn(3, 7, 5, dtype=dtype) if batch_first else torch.randn(7, 3, 5, dtype=dtype)
    h0, c0 = torch.randn(num_layers * D, 3, 3, dtype=dtype), torch.randn(num_layers * D, 3, 6, dtype=dtype)
    lengths = torch.tensor([4, 7, 1])
    results = []
    for model in (ref, fast):
        inputs = [t.clone().requires_grad_() for t in (x, h0, c0)]
        inp = inputs[0]
        if packed:
            inp = nn.utils.rnn.pack_padded_sequence(inp, lengths, batch_first=batch_first, enforce_sorted=False)
        out, (h, c) = model(inp, (inputs[1], inputs[2]))
        out = out.data if packed else out
        assert h.shape == (num_layers * D, 3, 3) and c.shape == (num_layers * D, 3, 6)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        loss = (out * weights).sum() + h.square().sum() + c.sum()
        grads = torch.autograd.grad(loss, inputs + list(model.parameters()))
        results.append((out, h, c, *grads))
    for k, (got, want) in enumerate(zip(*results[::-1])):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"result {k}: {m}")


def test_proj_size_gradcheck(backend):
    """The layer op with a projection, float64 gradcheck and the loop reference, on each CPU
    backend (the projection runs inside native's and vectorized's recurrence)."""
    from bilstm_fast import lstm_layer

    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    T, B, I, H, P, D = 4, 3, 2, 4, 2, 2
    inputs = [rand(T, B, I), rand(D, 4 * H, I), rand(D, 4 * H, P), rand(D, 4 * H), rand(D, B, P), rand(D, B, H),
              rand(D, P, H)]
    lens = torch.tensor([4, 1, 3])

    def op(x, w_ih, w_hh, b, h0, c0, w_hr):
        return lstm_layer(x, w_ih, w_hh, b, h0, c0, lens, backend=backend, w_hr=w_hr)

    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    from bilstm_fast.kernels.reference import lstm_layer_reference

    got = op(*inputs)
    want = lstm_layer_reference(*inputs[:6], [4, 1, 3], w_hr=inputs[6])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)


def test_torch_export_round_trip(tmp_path):
    """An exported program holds bilstm_fast:: custom ops: it loads where bilstm_fast is
    imported (the README says so), and gives the module's numbers."""
    torch.manual_seed(0)
    model = FastBiLSTM(3, 4, num_layers=2, backend="vectorized").eval()
    x = torch.randn(5, 2, 3)
    program = torch.export.export(model, (x,))
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    assert any("bilstm_fast" in str(node.target) for graph in graphs for node in graph.nodes)
    torch.export.save(program, tmp_path / "lstm.pt2")
    loaded = torch.export.load(tmp_path / "lstm.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


# ---------------------------------------------------------------- per-call overhead


@pytest.mark.parametrize("T", [1, 2, 5, 6])
@pytest.mark.parametrize("D", [1, 2])
def test_precomputed_lane_views_equal_lane_view(T, D):
    """The loops take their per-step views from `lanes` (strides worked out once per buffer,
    for the tiny-call overhead): the very views lane_view describes, element for element."""
    from bilstm_fast.kernels.vectorized import lane_view, lanes

    buf = torch.arange(T * 3 * D * 4, dtype=torch.float32).view(T, 3, D, 4)[:, :, :, 1:]  # strided rest
    views = lanes(buf)
    for s in range(T):
        (got, got_rev), (want, want_rev) = views(s), lane_view(buf, s)
        assert got_rev == want_rev and got.shape == want.shape and got.stride() == want.stride()
        assert got.storage_offset() == want.storage_offset() and torch.equal(got, want)


@pytest.mark.slow
def test_proj_size_under_torch_compile_fullgraph():
    """The projection's optional `w_hr` reaches the custom ops under torch.compile too: no
    graph break (fullgraph=True), nn.LSTM's numbers (fp32, 1e-5)."""
    torch.manual_seed(0)
    ref = nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
    fast = torch.compile(FastBiLSTM.from_lstm(ref, copy=True), fullgraph=True)
    x = torch.randn(7, 3, 5)
    results = []
    for model in (ref, fast):
        xi = x.clone().requires_grad_()
        out, (h, c) = model(xi)
        (gx,) = torch.autograd.grad(out.sum() + h.square().sum() + c.sum(), xi)
        results.append((out, h, c, gx))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **F32)
