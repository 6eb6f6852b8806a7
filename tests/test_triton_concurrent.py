"""The persistent schedule with several programs per group, its programs running concurrently.

The plain interpreter runs a launch's programs one after another, so the persistent schedule's
cross-program barrier, its ping-pong h (dgates) exchange and its per-group counters never run
with more than one program there. tests/interpreter_threads.py runs each program in its own
thread under TRITON_INTERPRET=1 (spin barriers then open), optionally with each program's
stores kept private until its next release atomic (`delay_stores`) and with the programs of a
group skewed in time (`skew`). Here the persistent schedule with 2 to 8 programs per group runs
forward and backward that way and must match:
  - the stepwise schedule with the same chunks, bit for bit: same step body, same dot shapes,
    only the way programs meet between steps differs (one launch per step there);
  - the float64 vectorized backend fed the same rounded inputs, within the tolerances of
    tests/test_triton.py (fp32 1e-5, fp16 5e-3, fp64 1e-10; measured: fp64 1e-15, fp32 6e-7).
    fp16 runs at H=20, where test_triton measured its 5e-3 (one fp16 ulp seen): at H=100 the
    backward's 400-term dots over fp16-rounded dgates reach 7.7e-3 in dh0 against float64,
    identical in the stepwise schedule, so that is rounding, not a concurrency effect.

Mutants prove the check can fail: the kernel module's source with one barrier bug planted by a
string replacement (each pattern must match exactly once, so a refactor that moves the code
fails here loudly instead of testing nothing), loaded as a sibling module. A source transform
rather than constexpr switches in the kernel: the library's kernels and their compile keys
stay untouched and a mutant cannot ship. A barrier that never opens must fail by timeout.

Off-GPU only (the kernels are interpreted); on a GPU the CUDA suite runs the real thing.
"""
import importlib
import importlib.util
import inspect
import math
import time

import pytest
import torch

from helpers import interpreted_triton

tr = interpreted_triton("concurrent-interpreter tests")

from bilstm_fast.kernels import vectorized  # noqa: E402
from interpreter_threads import LaunchTimeout, concurrent_programs  # noqa: E402

# test_triton.py's tolerances against float64 (its comment says why): fp32 a few ulps of 6e-8
# within 1e-5, fp16 five ulps of 9.8e-4, fp64 reassociation only
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


def lengths_for(T, B):
    """Unsorted, with full-length and one-step sequences, repeated over the batch."""
    return torch.tensor(([2, T, 1] * B)[:B])


# every test here interprets the kernels with several threads: 2-10 s each on a 2-core CPU
pytestmark = [pytest.mark.interpreter, pytest.mark.slow]

# (T, B, H, with_lengths, D, dtype, block_n): members per group = HP / block_n
CASES = [
    pytest.param((6, 3, 20, True, 2, torch.float16, 16), id="T6-B3-H20-D2-fp16-len-2prog"),
    pytest.param((5, 20, 50, True, 2, torch.float32, 16), id="T5-B20-H50-D2-fp32-len-4prog-2tiles"),
    pytest.param((4, 3, 100, False, 1, torch.float64, 16), id="T4-B3-H100-D1-fp64-8prog"),
]
BLOCK_B = 16


def plans(H, block_n):
    hp = tr._pow2_at_least(H)
    make = lambda schedule: tr.Plan(schedule, BLOCK_B, block_n, hp, True, min(hp, 32), num_warps=8)  # noqa: E731
    return make("persistent"), make("stepwise")


def problem(T, B, H, with_lengths, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    lengths = lengths_for(T, B) if with_lengths else None
    fwd = dict(gx=rand(T, B, D, 4 * H), w_hh=rand(D, 4 * H, H, scale=0.5), h0=rand(D, B, H), c0=rand(D, B, H),
               lengths=lengths)
    cot = dict(dout=rand(T, B, D, H), dh_n=rand(D, B, H), dc_n=rand(D, B, H))
    return fwd, cot


def run(module, plan, fwd, cot, monkeypatch):
    """Forward and backward through `module`'s launchers with `plan` forced (the planner itself
    refuses multi-program persistent groups off-GPU, where they would deadlock)."""
    monkeypatch.setattr(module, "_plan", lambda *a, **k: plan)
    out, h_n, c_n, gates, cs = module.recurrence_forward(**fwd)
    dgates, dh0, dc0 = module.recurrence_backward(
        cot["dout"], cot["dh_n"], cot["dc_n"], fwd["w_hh"], gates, cs, fwd["c0"], fwd["lengths"]
    )
    return dict(out=out, h_n=h_n, c_n=c_n, gates=gates, cs=cs, dgates=dgates, dh0=dh0, dc0=dc0)


def vectorized_reference(fwd, cot):
    d = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in fwd.items()}
    out, h_n, c_n, gates, cs = vectorized.recurrence_forward(**d)
    c = {k: v.double() for k, v in cot.items()}
    dgates, dh0, dc0 = vectorized.recurrence_backward(
        c["dout"], c["dh_n"], c["dc_n"], d["w_hh"], gates, cs, d["c0"], d["lengths"]
    )
    return dict(out=out, h_n=h_n, c_n=c_n, cs=cs, dgates=dgates, dh0=dh0, dc0=dc0)


def check(got, want_bitwise, reference, dtype):
    """AssertionError unless `got` equals the stepwise run bit for bit and is close to float64."""
    for name, want in want_bitwise.items():
        assert torch.equal(got[name], want), f"{name}: differs from the stepwise schedule"
    for name, want in reference.items():
        torch.testing.assert_close(got[name].double(), want, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Output buffers start as NaN, so an element nobody writes fails (as in test_triton)."""

    def nan_empty(like, *shape, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(tr, "_empty", nan_empty)


_stepwise_cache = {}


def stepwise_run(case, monkeypatch):
    if case not in _stepwise_cache:
        T, B, H, with_lengths, D, dtype, block_n = case
        fwd, cot = problem(*case[:6])
        _stepwise_cache[case] = run(tr, plans(H, block_n)[1], fwd, cot, monkeypatch)
    return _stepwise_cache[case]


MODES = {  # name -> concurrent_programs arguments
    "free": dict(),
    "skew": dict(skew=0.005),
    "delayed-stores": dict(delay_stores=True, skew=0.002),
}
# The planted bugs are caught when a late program is still late at the step where the bug bites:
# a skew larger than an interpreted step's compute time (tens of ms on a busy 2-core machine,
# where 5 ms once let a no-wait barrier pass), so that holds however the threads are scheduled.
MUTANT_MODES = {"skew": dict(skew=0.1), "delayed-stores": dict(delay_stores=True, skew=0.05)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_persistent_with_concurrent_programs(case, mode, monkeypatch):
    T, B, H, with_lengths, D, dtype, block_n = case
    persistent, _ = plans(H, block_n)
    fwd, cot = problem(*case[:6])
    with concurrent_programs(timeout=120, **MODES[mode]) as launch:
        got = run(tr, persistent, fwd, cot, monkeypatch)
    # one launch forward, one backward, each with every program of the grid at once
    assert launch.launches == 2 and launch.max_programs == math.prod(persistent.grid(B, D))
    check(got, stepwise_run(case, monkeypatch), vectorized_reference(fwd, cot), dtype)


# --- mutants ---------------------------------------------------------------------------------

BARRIER_WAIT = '''    while tl.atomic_add(p_count, 0, sem="acquire", scope="gpu") < target:
        pass
'''
TARGET = "_group_barrier(p_count, (s - s_begin + 1) * tl.num_programs(1))"
COUNTER = "p_count = p_sync + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)"
ARRIVAL = 'tl.atomic_add(p_count, 1, sem="release", scope="gpu")'
MUTANTS = {  # name -> [(original, replacement)], each original present exactly once
    "no-wait": [(BARRIER_WAIT, "")],
    "target-one-short": [(TARGET, TARGET[:-1] + " - 1)")],
    "one-counter-for-all-groups": [(COUNTER, "p_count = p_sync")],
    # write the next step's h (dgates) into the half every program is still reading
    "no-ping-pong": [
        ("o_hnext = ((((s + 1) % 2) * D + i_d) * B + o_b)", "o_hnext = ((((s + 0) % 2) * D + i_d) * B + o_b)"),
        ("p_next = p_dgbuf + ((((s + 1) % 2) * D + i_d)", "p_next = p_dgbuf + ((((s + 0) % 2) * D + i_d)"),
    ],
    # arrival without release: only the delayed-store mode can see it
    "relaxed-arrival": [(ARRIVAL, ARRIVAL.replace('"release"', '"relaxed"'))],
    # a barrier that never opens: the launch must fail by timeout, not hang
    "never-opens": [(TARGET, TARGET[:-1] + " + 1)")],
}
_mutant_modules = {}


def mutant(name, tmp_path_factory):
    """triton_recurrence's source with the mutant's replacements, imported as a sibling module
    (same package, so its relative imports resolve; a real file, so the interpreter, which
    re-parses kernel source, can read it)."""
    if name not in _mutant_modules:
        source = inspect.getsource(tr)
        for old, new in MUTANTS[name]:
            assert source.count(old) == 1, f"mutant {name}: pattern found {source.count(old)} times: {old!r}"
            source = source.replace(old, new)
        path = tmp_path_factory.mktemp("mutants") / f"triton_recurrence_{name.replace('-', '_')}.py"
        path.write_text(source)
        module_name = f"{tr.__package__}._mutant_{name.replace('-', '_')}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _mutant_modules[name] = module
    return _mutant_modules[name]


MUTANT_CASE = CASES[1].values[0]  # two batch tiles x two directions: four groups of four


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a mutant may feed NaN or garbage to the dots
@pytest.mark.parametrize(
    "name, mode",
    [("no-wait", "skew"), ("target-one-short", "skew"), ("one-counter-for-all-groups", "skew"),
     ("no-ping-pong", "skew"), ("relaxed-arrival", "delayed-stores")],
)
def test_each_barrier_bug_is_caught(name, mode, monkeypatch, tmp_path_factory):
    module = mutant(name, tmp_path_factory)
    T, B, H, with_lengths, D, dtype, block_n = MUTANT_CASE
    persistent, _ = plans(H, block_n)
    fwd, cot = problem(*MUTANT_CASE[:6])
    monkeypatch.setattr(module, "_empty", tr._empty)  # NaN-poisoned outputs here too
    with concurrent_programs(timeout=120, **MUTANT_MODES[mode]):
        got = run(module, persistent, fwd, cot, monkeypatch)
    with pytest.raises(AssertionError):
        check(got, stepwise_run(MUTANT_CASE, monkeypatch), vectorized_reference(fwd, cot), dtype)


def test_relaxed_arrival_needs_the_delayed_store_mode(monkeypatch, tmp_path_factory):
    """Without delayed stores every store is visible at once, so a relaxed arrival passes:
    the delayed-store mode is what catches it."""
    module = mutant("relaxed-arrival", tmp_path_factory)
    T, B, H, with_lengths, D, dtype, block_n = MUTANT_CASE
    fwd, cot = problem(*MUTANT_CASE[:6])
    with concurrent_programs(timeout=120, **MODES["skew"]):
        got = run(module, plans(H, block_n)[0], fwd, cot, monkeypatch)
    check(got, stepwise_run(MUTANT_CASE, monkeypatch), vectorized_reference(fwd, cot), dtype)


def test_a_barrier_that_never_opens_fails_by_timeout(monkeypatch, tmp_path_factory):
    module = mutant("never-opens", tmp_path_factory)
    T, B, H, with_lengths, D, dtype, block_n = CASES[0].values[0]
    fwd, _ = problem(T, B, H, with_lengths, D, dtype)
    monkeypatch.setattr(module, "_plan", lambda *a, **k: plans(H, block_n)[0])
    start = time.monotonic()
    with concurrent_programs(timeout=3):
        with pytest.raises(Exception) as failure:
            module.recurrence_forward(**fwd)
    assert "did not finish within 3 s" in str(failure.value)
    assert isinstance(failure.value, LaunchTimeout) or isinstance(failure.value.__cause__, LaunchTimeout)
    assert time.monotonic() - start < 15
