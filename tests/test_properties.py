"""Property tests (hypothesis): on random configurations (shapes from 1 up, layer counts,
bias, uni/bidirectional, batch_first, unbatched input, PackedSequence with sorted or unsorted
lengths, given or default states, weight scales that push gates toward saturation), FastBiLSTM
matches nn.LSTM in outputs, final states and every gradient, on each CPU backend (the `backend`
fixture).

Profiles, chosen with the HYPOTHESIS_PROFILE environment variable:
  ci (default)  80 examples per test, derandomized: the same ones every run (~10-20 s, 2 cores)
  long          1000 fresh random examples per test (minutes):
                HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py
Both have no deadline: CPU timings on shared machines vary tenfold.

The reference is always nn.LSTM in float64 (its plain ATen path), given the very weights and
inputs FastBiLSTM gets, rounded to the drawn dtype: the exact answer for that problem, cheap on
CPU (nn.LSTM's fp32 CPU path, oneDNN, costs ~1 s a training call; test_parity.py compares with it).
Tolerances, absolute, as a fraction of each result's scale (max |value|, at least 1), because
rounding error follows the magnitude of the terms summed, not of each element:
  float64  1e-12  (as test_parity.py: any formula difference shows at 1e-3)
  float32  1e-5   fp32 rounding (6e-8) amplified by the recurrence: weights up to 3x nn.LSTM's
                  init and T up to 12 gave at most 3.2e-6 over 1400 examples, and nn.LSTM's own
                  fp32 result misses float64 by the same order (up to 1.1e-6)
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from bilstm_fast import FastBiLSTM
from helpers import forward_backward

# database=None: nothing written into the checkout; a failure prints its example and a
# @reproduce_failure blob to replay it
settings.register_profile("ci", max_examples=80, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# applied per test (not loaded globally) so other hypothesis tests keep their own settings
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MODES = ["padded", "unbatched", "packed-sorted", "packed-unsorted"]


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(MODES))
    T = draw(st.integers(1, 12))
    B = draw(st.integers(0 if mode == "padded" else 1, 5)) if mode != "unbatched" else 1
    config = dict(
        mode=mode, T=T, B=B,
        I=draw(st.integers(1, 6)),
        H=draw(st.integers(1, 9)),
        layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        with_states=draw(st.booleans()),
        weight_scale=draw(st.sampled_from([1.0, 0.3, 3.0])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if mode.startswith("packed"):
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        config["lengths"] = sorted(lengths, reverse=True) if mode == "packed-sorted" else lengths
    return config


def build(config, backend="auto"):
    """nn.LSTM (float64) and its FastBiLSTM copy (drawn dtype, on `backend`) with the same rounded
    weights, and the (x, hx) of one call in the drawn dtype."""
    c, dtype = config, config["dtype"]
    torch.manual_seed(c["seed"])
    ref = nn.LSTM(c["I"], c["H"], num_layers=c["layers"], bias=c["bias"], batch_first=c["batch_first"],
                  bidirectional=c["bidirectional"], dtype=torch.float64)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(c["weight_scale"])
    fast = FastBiLSTM.from_lstm(ref, backend=backend).to(dtype)
    ref.load_state_dict(fast.state_dict())  # the rounded weights, back in float64
    g = torch.Generator().manual_seed(c["seed"])
    T, B, I, H = c["T"], c["B"], c["I"], c["H"]
    D = 2 if c["bidirectional"] else 1
    if c["mode"] == "unbatched":
        x_shape, state_shape = (T, I), (c["layers"] * D, H)
    else:
        x_shape = (B, T, I) if c["batch_first"] else (T, B, I)
        state_shape = (c["layers"] * D, B, H)
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    hx = tuple(torch.randn(state_shape, generator=g, dtype=dtype) for _ in range(2)) if c["with_states"] else None
    return ref, fast, x, hx


def run(model, config, x, hx):
    """Outputs, final states and the gradients w.r.t. x, hx and every parameter, run in the
    model's dtype (helpers.forward_backward on the drawn input layout)."""
    dtype = model.weight_ih_l0.dtype
    x = x.detach().to(dtype).requires_grad_()
    hx = None if hx is None else tuple(t.detach().to(dtype).requires_grad_() for t in hx)
    inp = x
    if config["mode"].startswith("packed"):
        inp = pack_padded_sequence(x, torch.tensor(config["lengths"]), batch_first=config["batch_first"],
                                   enforce_sorted=config["mode"] == "packed-sorted")
    return forward_backward(model, inp, hx, leaves=[x, *(hx or ())])


RELATIVE_TO_SCALE = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_matches(fast_results, ref_results, dtype):
    assert len(fast_results) == len(ref_results)
    for k, (f, r) in enumerate(zip(fast_results, ref_results)):
        name = ["output", "h_n", "c_n", "input grad"][k] if k < 4 else f"gradient {k}"
        assert f.shape == r.shape and f.dtype == dtype, name
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(f.double(), r, rtol=0, atol=RELATIVE_TO_SCALE[dtype] * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@PROFILE
@given(config=configs())
def test_fast_bilstm_matches_nn_lstm(config, backend):
    note(repr(config))
    ref, fast, x, hx = build(config, backend)
    assert_matches(run(fast, config, x, hx), run(ref, config, x, hx), config["dtype"])


@pytest.mark.slow
@PROFILE
@given(config=configs(), noise_seed=st.integers(0, 2**31 - 1))
def test_rows_of_a_batch_never_interact(config, noise_seed, backend):
    """Changing the other sequences' inputs leaves sequence 0's output, final states and input
    gradient bit-for-bit unchanged: a stride, offset or mask slip would leak between rows."""
    if config["mode"] == "unbatched" or config["B"] < 2:
        config = dict(config, mode="padded", B=3)
    config = dict(config, dtype=torch.float64)
    note(repr(config))
    _, fast, x, hx = build(config, backend)
    batch_dim = 0 if config["batch_first"] else 1
    others = torch.arange(1, config["B"])
    noise = torch.randn(x.index_select(batch_dim, others).shape, dtype=x.dtype,
                        generator=torch.Generator().manual_seed(noise_seed))
    changed = x.index_copy(batch_dim, others, noise)
    first, second = run(fast, config, x, hx), run(fast, config, changed, hx)
    row0 = torch.tensor([0])
    # output and input gradient follow batch_first; h_n and c_n are always [L*D, B, H]
    for name, dim, a, b in zip(["output", "h_n", "c_n", "input grad"], [batch_dim, 1, 1, batch_dim], first, second):
        assert torch.equal(a.index_select(dim, row0), b.index_select(dim, row0)), name

