"""Triton recurrence kernels: the sequential part of one LSTM layer, all directions in one launch.

Implements the recurrence contract in contract.py (same function names, same
outputs); the input projection and the weight gradients stay GEMMs in bilstm_fast/function.py.

Design
------
Grid = (batch tiles, hidden-chunk programs, directions). A program owns BLOCK_B batch rows of
one direction and one or more BLOCK_N-wide chunks of hidden units, for all four gates. One
shared @triton.jit step body (`_fwd_step`, `_bwd_step`) does, for one chunk at one step: the
recurrent `tl.dot` (fp32 accumulation), the gate nonlinearities and the cell/hidden update (or
their gradients), and every store. The schedules differ only in how programs are laid out and
how they meet between steps:

  tile        (a) grid (batch tiles, 1, D). One program owns all of H for its batch tile and
              walks every chunk itself, time loop inside the kernel. h (dgates going back) is
              exchanged through a ping-pong scratch buffer in global memory, with
              `tl.debug_barrier()` (bar.sync: the CTA's stores are visible to the whole CTA)
              between steps. No cross-program barrier, so it runs under TRITON_INTERPRET=1.
  persistent  (b) grid (batch tiles, chunks, D), all programs resident: each keeps its W_hh
              slice (the four gates' [HP, BLOCK_N]) on chip across the whole time loop; the programs of one
              (batch tile, direction) group meet at a barrier on an atomic counter (release
              add, acquire spin) after each step. The grid is sized to the SM count and launched
              cooperatively where Triton offers it, so all programs are co-resident.
  stepwise    (b) without the barrier: the same kernel and step body, one launch per step.
              Runs under the interpreter, so CI exercises the persistent schedule's step math
              and the cross-program h exchange; on a GPU it is the fallback when the persistent
              grid or W slice does not fit.

The step body has two ways to get W_hh (constexpr RESIDENT): resident, the slice loaded once
before the time loop and the dot done over all of K at once; or streamed, W and h read in
BLOCK_K chunks from L2 every step, which bounds registers whatever H is. The forward does the
four gates as one [BB, K] x [K, 4*BN] dot (W's columns interleaved per gate, the result split
in registers), so its MMA tile is wide enough for every warp to do distinct work.

The planner (kernels/planner.py, `plan_schedule`) picks the schedule, block sizes and W_hh
placement from the shape, the dtype and the GPU's SM count; its names stay importable from here.

Projection (the contract's extra, nn.LSTM's proj_size = P <= H, `w_hr` [D, P, H]): h = r @ W_hr^T
with r = o * tanh(c), so W_hh is [4H, P] and the recurrent dot's K is P. A chunk of h needs r of
every hidden unit, which other programs (or chunks) produce, so each step becomes two stages,
with the schedule's own meeting point between them as between steps (tile: bar.sync; persistent:
the group barrier, now twice per step; stepwise: one launch per stage, each kind of stage a
kernel of its own, constexpr STAGE):
  forward   stage 2s     `_fwd_step` per hidden chunk, as without a projection, but r goes to
                         an exchange buffer [D, B, H] instead of h to the ping-pong buffer;
            stage 2s+1   `_fwd_project` per chunk of P: h = r @ W_hr^T (K = H), then the usual
                         h stores (ping-pong half, out, h_n).
  backward  stage 2s     per chunk of P: dh = dgates_{s-1} @ W_hh (K = 4H, `_bwd_dh`) + dout, the
                         contract's fourth result (zero past each end) and an exchange [D, B, P];
            stage 2s+1   per hidden chunk: dr = dh @ W_hr (K = P, `_bwd_project`), then the gate
                         gradients of `_bwd_gates` with dr where dh was.
Phase T needs only its first stage (dh0), so the backward runs 2T + 1 stages. The chunks of P
are the programs' own chunk indices (program i_n owns P chunk i_n, PP <= HP; programs past P
idle through a projection stage; a tile program walks them all). W_hr is always streamed from
L2 in BLOCK_K chunks, W_hh resident or streamed as planned: the planner plans a projection layer
on H alone, which over-estimates its W_hh slices (forward [PP, 4*BN] instead of [HP, 4*BN];
the backward's [HP, BN] x 4 is unchanged), so every plan it picks fits the same budgets.
Without a projection (PROJ = False) the kernels are the one-stage-per-step code they were.

Reverse time and lengths: at step s row b of the direction that walks time backwards works on
t = len_b - 1 - s while s < len_b (so it starts at its own last valid step, no flips); for
s >= len_b every row fills position t = s (out/gates/dgates zero, cs the carried state). Each
row's valid steps therefore come first, which is why h_n is written at s == len_b - 1 and dh0
at backward phase s == len_b. Backward needs T + 1 phases: the last one only turns the final
dgates into dh0 (dh_prev = dgates @ W_hh needs every chunk's dgates, so it lands after the
barrier that closes the step).

Numerics: gates and the cell update in fp32, cell state always fp32 (state buffer and cs;
fp64 throughout for fp64 input, as the vectorized path);
h, out, gates, dgates stored in the input dtype; the recurrent dot reads h (dgates) in the
input dtype like the vectorized path does (with a projection, r and dh are exchanged in the
input dtype too: they are the projection dots' operands). fp32 dots are TF32 when cuDNN's RNN may use TF32
(`torch.backends.cudnn.rnn.fp32_precision`, else `torch.backends.cudnn.allow_tf32`), IEEE
otherwise. No atomics touch results: every element is written by exactly one program, in a
fixed order, so results are bitwise reproducible. Offsets that scale with T*B go through int64.

What runs without a GPU: the plain interpreter runs every schedule with one program at a time
(with and without a projection: tests/test_triton.py, tests/test_triton_projection.py);
tests/test_triton_concurrent.py runs the persistent schedule with 2-8 programs per group, each
program in its own thread (so the barrier opens), with stores held back until the next release
atomic and programs skewed in time, and shows that planted barrier bugs fail it;
benchmarks/compile_matrix.py compiles every plan for sm_80/sm_90 (registers, spills, shared
memory, occupancy). What still only a GPU can show:
  - the hardware memory model of the h exchange (the simulation is sequentially consistent
    apart from the delayed stores: .cg loads, L1, the acquire side are not modelled), and
    residency of the whole grid (cooperative launch refuses a grid that cannot be resident
    instead of hanging);
  - races inside a CTA: the interpreter runs a program as one thread, so a missing
    `tl.debug_barrier()` between steps would go unnoticed there;
  - the tensor cores' own TF32 arithmetic (tests/test_triton_tf32.py emulates TF32 and 3xTF32
    operand rounding, not the hardware's accumulation), bf16 (numpy has none), and of course
    speed and the schedule thresholds (benchmarks/step_model.py predicts the per-step time);
  - CUDA graph capture of the persistent schedule's cooperative launch, triton 3.6 (checked
    here with 3.8 only), and the launch overhead of stepwise's one launch per step.
"""
import os
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from .planner import (  # noqa: F401  (re-exported: callers import the planner's names from here)
    MIN_DOT,
    RESIDENT_BLOCK_B,
    RESIDENT_BYTES_MMA,
    RESIDENT_ELEMS_FMA,
    SCHEDULES,
    STEPWISE_BLOCK_N,
    STREAM_BLOCK_B,
    TILE_MAX_HP,
    TILE_RESIDENT_HP,
    TILE_STREAM_BLOCK_N,
    Plan,
    _pow2_at_least,
    _slice_fits,
    _sm_count,
    dot_precision,
    plan_schedule,
    rnn_allows_tf32,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTS_PROJECTION = True  # the optional projection extra of the contract (contract.py): `w_hr=`


def _cooperative_supported():
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


COOPERATIVE = _cooperative_supported()


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    # not tl.sigmoid (nor tl.zeros: tl.full instead): triton.language's own @jit helpers are
    # fixed as compiled or interpreted when triton is imported; this module must run under the
    # interpreter whenever its own kernels do (see tests/test_triton.py)
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # libdevice is unavailable to the interpreter, and 2*sigmoid(2x)-1 loses relative precision
    # near 0: use (1-e)/(1+e), e = exp(-2|x|), and a 4-term series where that cancels. The
    # series' error is 0.022 x^8 relative; the switch point keeps both sides at dtype precision.
    if x.dtype == tl.float64:
        SERIES_BELOW: tl.constexpr = 0.015
    else:
        SERIES_BELOW: tl.constexpr = 0.125
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    return tl.where(a < SERIES_BELOW, series, tl.where(x < 0, -t, t))


@triton.jit
def _load_w_slice(p_w, o_k, o_n, H: tl.constexpr, P: tl.constexpr):
    """The backward's four [K, BLOCK_N] blocks of one direction's W_hh [4H, P], one per gate:
    block[j, n] = W[k*H + j, n] (j a gate unit, n a feature of h), for dh = sum_k dgates_k @ W_k."""
    m_w = (o_k[:, None] < H) & (o_n[None, :] < P)
    o_w = o_k[:, None] * P + o_n[None, :]
    b_wi = tl.load(p_w + o_w, mask=m_w, other=0.0)
    b_wf = tl.load(p_w + H * P + o_w, mask=m_w, other=0.0)
    b_wg = tl.load(p_w + 2 * H * P + o_w, mask=m_w, other=0.0)
    b_wo = tl.load(p_w + 3 * H * P + o_w, mask=m_w, other=0.0)
    return b_wi, b_wf, b_wg, b_wo


@triton.jit
def _load_w_gates(p_w, o_k, o_n, H: tl.constexpr, P: tl.constexpr):
    """The forward's W_hh^T slice for all four gates as one [K, 4*BN] block (K over the P
    features of h), columns interleaved (column 4n + k holds gate k of hidden unit o_n[n]): one
    dot gives every gate, so the MMA tile is 4x wider and the warps of a program each get
    distinct work (see _split_gates)."""
    o_g = tl.arange(0, 4)
    m_w = (o_k[:, None, None] < P) & (o_n[None, :, None] < H) & (o_g[None, None, :] < 4)
    o_w = (o_g[None, None, :] * H + o_n[None, :, None]) * P + o_k[:, None, None]  # [K, BN, 4]
    b_w = tl.load(p_w + o_w, mask=m_w, other=0.0)
    return tl.reshape(b_w, [o_k.shape[0], 4 * o_n.shape[0]])


@triton.jit
def _split_gates(b_r, BLOCK_N: tl.constexpr):
    """[BB, 4*BN] with interleaved columns (4n + k) -> the four [BB, BN] gate blocks i, f, g, o."""
    b_r = tl.reshape(b_r, [b_r.shape[0], BLOCK_N, 2, 2])  # [BB, BN, k // 2, k % 2]
    b_even, b_odd = tl.split(b_r)  # gates (i, g) and (f, o)
    b_ri, b_rg = tl.split(b_even)
    b_rf, b_ro = tl.split(b_odd)
    return b_ri, b_rf, b_rg, b_ro


@triton.jit
def _group_barrier(p_count, target):
    """Wait until the group's counter reaches `target`; every program of the group adds 1 per step.

    Only valid when all programs of the group are resident (persistent schedule). Scalar
    atomics are issued by one thread; the bar.sync before publishes the whole CTA's stores,
    the one after holds every thread until the acquire has seen everyone else's.
    """
    tl.debug_barrier()
    tl.atomic_add(p_count, 1, sem="release", scope="gpu")
    while tl.atomic_add(p_count, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _program_rows(p_len, T, B, BLOCK_B: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """This program's batch rows, their mask, and their sequence lengths (T for every row
    without lengths)."""
    o_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m_b = o_b < B
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0).to(tl.int32)
    else:
        b_len = tl.full([BLOCK_B], 0, tl.int32) + T
    return o_b, m_b, b_len


@triton.jit
def _step_rows(s, B, i_d, o_b, m_b, b_len, D: tl.constexpr, FROM_END: tl.constexpr):
    """Which rows are valid at step (phase) s, their time index and the [BB] rows of the
    [T*B*D, *] views they work on. Direction FROM_END walks each row's valid steps from its end (the reverse
    direction going forward, direction 0 going back); rows past their length use t = s."""
    b_valid = (s < b_len) & m_b
    b_t = tl.where(b_valid & (i_d == FROM_END), b_len - 1 - s, s).to(tl.int64)
    return b_valid, b_t, (b_t * B + o_b) * D + i_d


@triton.jit
def _end_of_step(s, s_begin, s_end, p_sync, SYNC: tl.constexpr):
    """Make stage s's h (dgates, or a projection's exchange) visible to every program of the
    group before stage s + 1."""
    if SYNC == 1:
        tl.debug_barrier()
    if SYNC == 2:
        if s + 1 < s_end:
            # one counter per (direction, batch block); its members are the programs along axis 1
            p_count = p_sync + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
            _group_barrier(p_count, (s - s_begin + 1) * tl.num_programs(1))


@triton.jit
def _fwd_recurrent(
    s, i_d, B, o_b, m_b, o_n, p_hbuf, p_w_d, b_w,
    H: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """[BB, BN] x 4: h_{t-1} @ W_k^T for one chunk, as one [BB, 4*BN] dot split into the gates.
    h (P features) comes from the ping-pong half s % 2; b_w is the resident [PP, 4*BN] slice
    (_load_w_gates)."""
    o_hrow = ((s % 2) * D + i_d) * B + o_b  # [BB] rows of the [2*D*B, P] buffer
    if RESIDENT:
        o_k = tl.arange(0, PP)
        m_h = m_b[:, None] & (o_k[None, :] < P)
        b_h = tl.load(p_hbuf + o_hrow[:, None] * P + o_k[None, :], mask=m_h, other=0.0, cache_modifier=".cg")
        b_r = tl.dot(b_h, b_w, input_precision=DOT_PRECISION)
    else:
        # W streamed from L2 in K chunks: bounded registers whatever H is
        b_r = tl.full([o_b.shape[0], 4 * o_n.shape[0]], 0.0, ACC)
        for k0 in range(0, PP, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_h = m_b[:, None] & (o_k[None, :] < P)
            b_h = tl.load(p_hbuf + o_hrow[:, None] * P + o_k[None, :], mask=m_h, other=0.0, cache_modifier=".cg")
            b_r = tl.dot(b_h, _load_w_gates(p_w_d, o_k, o_n, H, P), b_r, input_precision=DOT_PRECISION)
    return _split_gates(b_r, o_n.shape[0])


@triton.jit
def _store_h(s, B, i_d, o_b, m_b, b_len, b_valid, o_row, o_p, b_h, p_hbuf, p_out, p_hn, P: tl.constexpr, D: tl.constexpr):
    """Store one chunk of h [BB, BN] (features o_p of P): the exchange for the next step, out, h_n."""
    m_bp = m_b[:, None] & (o_p < P)[None, :]
    dtype = p_out.dtype.element_ty
    b_h_out = b_h.to(dtype)
    # the other ping-pong half: this step's half is still being read by every chunk
    o_hnext = ((((s + 1) % 2) * D + i_d) * B + o_b)[:, None] * P + o_p[None, :]
    tl.store(p_hbuf + o_hnext, b_h_out, mask=m_bp)
    # integer offsets first, one pointer add: p + a + b would add twice (more registers)
    o_state = (i_d * B + o_b)[:, None] * P + o_p[None, :]
    tl.store(p_hn + o_state, b_h_out, mask=m_bp & (s == b_len - 1)[:, None])
    o_seq = o_row[:, None] * P + o_p[None, :]
    tl.store(p_out + o_seq, tl.where(b_valid[:, None], b_h_out, 0.0).to(dtype), mask=m_bp)


@triton.jit
def _fwd_step(
    s, T, B, i_d, o_b, m_b, b_len, o_n,
    p_w_d, b_w,
    p_gx, p_hbuf, p_rbuf, p_c, p_c0, p_out, p_gates, p_cs, p_hn,
    H: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, SAVE: tl.constexpr,
    PROJ: tl.constexpr,
):
    """One forward step for one hidden chunk, shared by every schedule: the recurrent dot,
    the gate nonlinearities, the cell/hidden update and all stores. With a projection (PROJ)
    o * tanh(c) goes to p_rbuf instead, for _fwd_project to turn into h."""
    m_n = o_n < H
    m_bn = m_b[:, None] & m_n[None, :]
    # reverse direction: each row starts at its own last valid step
    b_valid, _, o_row = _step_rows(s, B, i_d, o_b, m_b, b_len, D, 1)
    m_valid = b_valid[:, None]
    b_ri, b_rf, b_rg, b_ro = _fwd_recurrent(
        s, i_d, B, o_b, m_b, o_n, p_hbuf, p_w_d, b_w,
        H, P, PP, D, RESIDENT, BLOCK_K, DOT_PRECISION, ACC,
    )
    p_gx_row = p_gx + o_row[:, None] * (4 * H) + o_n[None, :]
    # [BB, BN] pre-activations, fp32
    b_i = _sigmoid(b_ri + tl.load(p_gx_row, mask=m_bn, other=0.0).to(ACC))
    b_f = _sigmoid(b_rf + tl.load(p_gx_row + H, mask=m_bn, other=0.0).to(ACC))
    b_g = _tanh(b_rg + tl.load(p_gx_row + 2 * H, mask=m_bn, other=0.0).to(ACC))
    b_o = _sigmoid(b_ro + tl.load(p_gx_row + 3 * H, mask=m_bn, other=0.0).to(ACC))

    o_state = (i_d * B + o_b)[:, None] * H + o_n[None, :]  # [D, B, H] state tensors
    b_c_prev = tl.load(p_c + o_state, mask=m_bn, other=0.0)
    b_c_new = b_f * b_c_prev + b_i * b_g
    b_h_new = b_o * _tanh(b_c_new)
    # rows past their length carry the state; the reverse direction's carried state is c0
    b_c0 = tl.load(p_c0 + o_state, mask=m_bn & (~m_valid) & (i_d == 1), other=0.0)
    b_cs = tl.where(m_valid, b_c_new, tl.where(i_d == 1, b_c0, b_c_prev))
    tl.store(p_c + o_state, tl.where(m_valid, b_c_new, b_c_prev), mask=m_bn)

    if PROJ:
        # h = r @ W_hr^T needs every chunk's r: exchanged like h, projected in the next stage
        tl.store(p_rbuf + o_state, b_h_new.to(p_rbuf.dtype.element_ty), mask=m_bn)
    else:
        _store_h(s, B, i_d, o_b, m_b, b_len, b_valid, o_row, o_n, b_h_new, p_hbuf, p_out, p_hn, H, D)
    if SAVE:  # what backward reads; inference skips it
        dtype = p_gates.dtype.element_ty
        tl.store(p_cs + (o_row[:, None] * H + o_n[None, :]), b_cs, mask=m_bn)
        p_gates_row = p_gates + o_row[:, None] * (4 * H) + o_n[None, :]
        tl.store(p_gates_row, tl.where(m_valid, b_i, 0.0).to(dtype), mask=m_bn)
        tl.store(p_gates_row + H, tl.where(m_valid, b_f, 0.0).to(dtype), mask=m_bn)
        tl.store(p_gates_row + 2 * H, tl.where(m_valid, b_g, 0.0).to(dtype), mask=m_bn)
        tl.store(p_gates_row + 3 * H, tl.where(m_valid, b_o, 0.0).to(dtype), mask=m_bn)


@triton.jit
def _fwd_project(
    s, B, i_d, o_b, m_b, b_len, o_p, p_whr_d, p_rbuf, p_hbuf, p_out, p_hn,
    H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """The projection stage of a forward step for one chunk of h's features o_p:
    h = r @ W_hr^T with r = o * tanh(c) of all H units (every chunk's, from p_rbuf), W_hr
    [P, H] streamed in K chunks, then the same stores as an unprojected h."""
    b_valid, _, o_row = _step_rows(s, B, i_d, o_b, m_b, b_len, D, 1)
    o_rrow = i_d * B + o_b  # [BB] rows of the [D*B, H] exchange
    b_h = tl.full([o_b.shape[0], o_p.shape[0]], 0.0, ACC)
    for k0 in range(0, HP, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        p_r = p_rbuf + (o_rrow[:, None] * H + o_k[None, :])
        b_r = tl.load(p_r, mask=m_b[:, None] & m_k[None, :], other=0.0, cache_modifier=".cg")
        # [BLOCK_K, BN] block of W_hr^T: element (j, n) = W_hr[o_p[n], j]
        b_w = tl.load(p_whr_d + (o_p[None, :] * H + o_k[:, None]), mask=m_k[:, None] & (o_p < P)[None, :], other=0.0)
        b_h = tl.dot(b_r, b_w, b_h, input_precision=DOT_PRECISION)
    _store_h(s, B, i_d, o_b, m_b, b_len, b_valid, o_row, o_p, b_h, p_hbuf, p_out, p_hn, P, D)


@triton.jit
def _fwd_cells(
    s, T, B, i_d, i_n, o_b, m_b, b_len, p_w_d, b_w,
    p_gx, p_hbuf, p_rbuf, p_c, p_c0, p_out, p_gates, p_cs, p_hn,
    H: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, N_CHUNKS: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    SAVE: tl.constexpr, PROJ: tl.constexpr,
):
    """Step s of the program's hidden chunks."""
    for j in range(N_CHUNKS):
        o_n = (i_n * N_CHUNKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        _fwd_step(
            s, T, B, i_d, o_b, m_b, b_len, o_n,
            p_w_d, b_w,
            p_gx, p_hbuf, p_rbuf, p_c, p_c0, p_out, p_gates, p_cs, p_hn,
            H, P, PP, D, RESIDENT, BLOCK_K, DOT_PRECISION, ACC, SAVE, PROJ,
        )


@triton.jit(do_not_specialize=["T", "B", "s_begin", "s_end"])
def _lstm_fwd_kernel(
    p_gx, p_w, p_whr, p_len, p_hbuf, p_rbuf, p_c, p_c0, p_out, p_gates, p_cs, p_hn, p_sync,
    T, B, s_begin, s_end,
    H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_CHUNKS: tl.constexpr, P_CHUNKS: tl.constexpr,
    RESIDENT: tl.constexpr, SYNC: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr, SAVE: tl.constexpr, PROJ: tl.constexpr, STAGE: tl.constexpr,
):
    """Forward recurrence, stages [s_begin, s_end). A stage is one step, or with a projection
    (PROJ) half of one: stage 2s is step s's cell update (chunks of H), 2s + 1 its projection
    (chunks of P); STAGE 0 or 1 compiles only that kind of stage, -1 both. SYNC: 0 none (one
    launch per stage), 1 CTA barrier (tile), 2 group barrier on p_sync (persistent)."""
    i_n, i_d = tl.program_id(1), tl.program_id(2)
    o_b, m_b, b_len = _program_rows(p_len, T, B, BLOCK_B, HAS_LENGTHS)
    p_w_d = p_w + i_d * (4 * H * P)
    p_whr_d = p_whr + i_d * (P * H)
    if RESIDENT:
        # one chunk per program: its W_hh slice stays on chip for the whole time loop
        tl.static_assert(N_CHUNKS == 1)
        b_w = _load_w_gates(p_w_d, tl.arange(0, PP), i_n * BLOCK_N + tl.arange(0, BLOCK_N), H, P)
    else:
        b_w = None
    for u in range(s_begin, s_end):
        if PROJ:
            s = u // 2
            if STAGE == -1:
                first = u % 2 == 0
            else:  # a stepwise launch: one kind of stage, a kernel of its own (see _run)
                first = STAGE == 0
            if first:
                _fwd_cells(
                    s, T, B, i_d, i_n, o_b, m_b, b_len, p_w_d, b_w,
                    p_gx, p_hbuf, p_rbuf, p_c, p_c0, p_out, p_gates, p_cs, p_hn,
                    H, P, PP, D, BLOCK_N, N_CHUNKS, RESIDENT, BLOCK_K, DOT_PRECISION, ACC, SAVE, PROJ,
                )
            else:
                for j in range(P_CHUNKS):
                    o_p = (i_n * P_CHUNKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
                    _fwd_project(
                        s, B, i_d, o_b, m_b, b_len, o_p, p_whr_d, p_rbuf, p_hbuf, p_out, p_hn,
                        H, HP, P, D, BLOCK_K, DOT_PRECISION, ACC,
                    )
        else:
            _fwd_cells(
                u, T, B, i_d, i_n, o_b, m_b, b_len, p_w_d, b_w,
                p_gx, p_hbuf, p_rbuf, p_c, p_c0, p_out, p_gates, p_cs, p_hn,
                H, P, PP, D, BLOCK_N, N_CHUNKS, RESIDENT, BLOCK_K, DOT_PRECISION, ACC, SAVE, PROJ,
            )
        _end_of_step(u, s_begin, s_end, p_sync, SYNC)


@triton.jit
def _bwd_recurrent(
    s, i_d, B, o_b, m_b, o_n, p_dgbuf, p_w_d, b_wi, b_wf, b_wg, b_wo,
    H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """[BB, BN]: sum_k dgates_k @ W_k for one chunk of h's P features, dgates from the
    ping-pong half s % 2."""
    o_grow = ((s % 2) * D + i_d) * B + o_b  # [BB] rows of the [2*D*B, 4H] buffer
    if RESIDENT:
        o_k = tl.arange(0, HP)
        m_g = m_b[:, None] & (o_k[None, :] < H)
        p_g = p_dgbuf + o_grow[:, None] * (4 * H) + o_k[None, :]
        b_dh = tl.dot(tl.load(p_g, mask=m_g, other=0.0, cache_modifier=".cg"), b_wi, input_precision=DOT_PRECISION)
        b_dh += tl.dot(tl.load(p_g + H, mask=m_g, other=0.0, cache_modifier=".cg"), b_wf, input_precision=DOT_PRECISION)
        b_dh += tl.dot(tl.load(p_g + 2 * H, mask=m_g, other=0.0, cache_modifier=".cg"), b_wg, input_precision=DOT_PRECISION)
        b_dh += tl.dot(tl.load(p_g + 3 * H, mask=m_g, other=0.0, cache_modifier=".cg"), b_wo, input_precision=DOT_PRECISION)
    else:
        b_dh = tl.full([o_b.shape[0], o_n.shape[0]], 0.0, ACC)
        for k0 in range(0, HP, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_g = m_b[:, None] & (o_k[None, :] < H)
            p_g = p_dgbuf + o_grow[:, None] * (4 * H) + o_k[None, :]
            b_ki, b_kf, b_kg, b_ko = _load_w_slice(p_w_d, o_k, o_n, H, P)
            b_dh = tl.dot(tl.load(p_g, mask=m_g, other=0.0, cache_modifier=".cg"), b_ki, b_dh, input_precision=DOT_PRECISION)
            b_dh = tl.dot(tl.load(p_g + H, mask=m_g, other=0.0, cache_modifier=".cg"), b_kf, b_dh, input_precision=DOT_PRECISION)
            b_dh = tl.dot(tl.load(p_g + 2 * H, mask=m_g, other=0.0, cache_modifier=".cg"), b_kg, b_dh, input_precision=DOT_PRECISION)
            b_dh = tl.dot(tl.load(p_g + 3 * H, mask=m_g, other=0.0, cache_modifier=".cg"), b_ko, b_dh, input_precision=DOT_PRECISION)
    return b_dh


@triton.jit
def _bwd_dh(
    s, B, i_d, o_b, m_b, b_len, o_p,
    p_w_d, b_wi, b_wf, b_wg, b_wo,
    p_dhn, p_dgbuf, p_dh0,
    H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """[BB, BN]: the gradient of one chunk of step s's h (features o_p of P) from the step
    after it (the recurrent dot; dh_n at phase 0), dout not included. Stores dh0 when its
    phase comes."""
    m_bp = m_b[:, None] & (o_p < P)[None, :]
    o_state = (i_d * B + o_b)[:, None] * P + o_p[None, :]
    # [BB, BN] dh_t coming back from the step after t (in the direction's own time order)
    b_dh_rec = _bwd_recurrent(
        s, i_d, B, o_b, m_b, o_p, p_dgbuf, p_w_d, b_wi, b_wf, b_wg, b_wo,
        H, HP, P, D, RESIDENT, BLOCK_K, DOT_PRECISION, ACC,
    )
    # phase 0 starts from dh_n; a row's last valid step was phase len_b - 1, so dh0 lands now
    b_dhn = tl.load(p_dhn + o_state, mask=m_bp & (s == 0), other=0.0)
    b_dh = tl.where(s == 0, b_dhn, b_dh_rec)
    tl.store(p_dh0 + o_state, b_dh, mask=m_bp & (s == b_len)[:, None])
    return b_dh


@triton.jit
def _bwd_gates(
    s, T, B, i_d, o_b, m_b, b_len, o_n, b_dh,
    p_dout, p_gates, p_cs, p_c0, p_dgbuf, p_dc, p_dgates,
    H: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr, WITH_DOUT: tl.constexpr,
):
    """Step s's gate gradients for one hidden chunk from b_dh [BB, BN], the gradient of its
    o * tanh(c) (plus dout's with WITH_DOUT); the carried dc; the stores (dgates twice: result
    and exchange)."""
    m_n = o_n < H
    # (this order of loads and arithmetic is the one that compiled without spills: NOTES T3, T6)
    m_bn = m_b[:, None] & m_n[None, :]
    b_valid, b_t, o_row = _step_rows(s, B, i_d, o_b, m_b, b_len, D, 0)
    m_valid = b_valid[:, None]
    m_load = m_valid & m_n[None, :]
    o_state = (i_d * B + o_b)[:, None] * H + o_n[None, :]
    o_seq = o_row[:, None] * H + o_n[None, :]
    p_gates_row = p_gates + o_row[:, None] * (4 * H) + o_n[None, :]
    b_i = tl.load(p_gates_row, mask=m_load, other=0.0).to(ACC)
    b_f = tl.load(p_gates_row + H, mask=m_load, other=0.0).to(ACC)
    b_g = tl.load(p_gates_row + 2 * H, mask=m_load, other=0.0).to(ACC)
    b_o = tl.load(p_gates_row + 3 * H, mask=m_load, other=0.0).to(ACC)
    b_c = tl.load(p_cs + o_seq, mask=m_load, other=0.0)
    # the cell state this step started from: its time neighbour in cs, or c0 at the edge
    b_tp = tl.where(i_d == 0, b_t - 1, b_t + 1)
    m_tp = ((b_tp >= 0) & (b_tp < T))[:, None]
    o_prev = ((b_tp * B + o_b) * D + i_d)[:, None] * H + o_n[None, :]
    b_c_prev = tl.load(p_cs + o_prev, mask=m_load & m_tp, other=0.0)
    b_c_prev += tl.load(p_c0 + o_state, mask=m_load & (~m_tp), other=0.0)
    if WITH_DOUT:
        b_dout = tl.load(p_dout + o_seq, mask=m_load, other=0.0).to(ACC)
    b_dc_carry = tl.load(p_dc + o_state, mask=m_bn, other=0.0)

    if WITH_DOUT:
        b_dh_t = b_dh + b_dout
    else:
        b_dh_t = b_dh
    b_tanh_c = _tanh(b_c)
    b_dc_t = b_dc_carry + b_dh_t * b_o * (1.0 - b_tanh_c * b_tanh_c)
    b_di = tl.where(m_valid, b_dc_t * b_g * b_i * (1.0 - b_i), 0.0)
    b_df = tl.where(m_valid, b_dc_t * b_c_prev * b_f * (1.0 - b_f), 0.0)
    b_dg = tl.where(m_valid, b_dc_t * b_i * (1.0 - b_g * b_g), 0.0)
    b_do = tl.where(m_valid, b_dh_t * b_tanh_c * b_o * (1.0 - b_o), 0.0)
    # outside a sequence the state passes through untouched, and so does its gradient
    tl.store(p_dc + o_state, tl.where(m_valid, b_dc_t * b_f, b_dc_carry), mask=m_bn)

    m_step = m_bn & (s < T)
    dtype = p_dgates.dtype.element_ty
    p_dg_row = p_dgates + o_row[:, None] * (4 * H) + o_n[None, :]
    tl.store(p_dg_row, b_di.to(dtype), mask=m_step)
    tl.store(p_dg_row + H, b_df.to(dtype), mask=m_step)
    tl.store(p_dg_row + 2 * H, b_dg.to(dtype), mask=m_step)
    tl.store(p_dg_row + 3 * H, b_do.to(dtype), mask=m_step)
    # the other ping-pong half, read by every chunk's dot next phase (zero on invalid rows)
    sdtype = p_dgbuf.dtype.element_ty
    p_next = p_dgbuf + ((((s + 1) % 2) * D + i_d) * B + o_b)[:, None] * (4 * H) + o_n[None, :]
    tl.store(p_next, b_di.to(sdtype), mask=m_step)
    tl.store(p_next + H, b_df.to(sdtype), mask=m_step)
    tl.store(p_next + 2 * H, b_dg.to(sdtype), mask=m_step)
    tl.store(p_next + 3 * H, b_do.to(sdtype), mask=m_step)


@triton.jit
def _bwd_project(
    s, B, i_d, o_b, m_b, o_n, p_whr_d, p_dhbuf,
    H: tl.constexpr, P: tl.constexpr, PP: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """[BB, BN]: the gradient of o * tanh(c) for one hidden chunk, dh @ W_hr with dh (all P
    features, every chunk's, from p_dhbuf) and W_hr [P, H] streamed in K chunks."""
    o_hrow = i_d * B + o_b  # [BB] rows of the [D*B, P] exchange
    b_dr = tl.full([o_b.shape[0], o_n.shape[0]], 0.0, ACC)
    for k0 in range(0, PP, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < P
        p_dh = p_dhbuf + (o_hrow[:, None] * P + o_k[None, :])
        b_dh = tl.load(p_dh, mask=m_b[:, None] & m_k[None, :], other=0.0, cache_modifier=".cg")
        b_w = tl.load(p_whr_d + (o_k[:, None] * H + o_n[None, :]), mask=m_k[:, None] & (o_n < H)[None, :], other=0.0)
        b_dr = tl.dot(b_dh, b_w, b_dr, input_precision=DOT_PRECISION)
    return b_dr


@triton.jit(do_not_specialize=["T", "B", "s_begin", "s_end"])
def _lstm_bwd_kernel(
    p_dout, p_dhn, p_w, p_whr, p_len, p_gates, p_cs, p_c0, p_dgbuf, p_dhbuf, p_dc, p_dh0, p_dh, p_dgates, p_sync,
    T, B, s_begin, s_end,
    H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    N_CHUNKS: tl.constexpr, P_CHUNKS: tl.constexpr,
    RESIDENT: tl.constexpr, SYNC: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr, PROJ: tl.constexpr, STAGE: tl.constexpr,
):
    """Backward recurrence, stages [s_begin, s_end) of phases 0..T. A stage is one phase, or
    with a projection (PROJ) half of one: stage 2s forms phase s's dh (chunks of P: stored as
    the contract's dh and exchanged through p_dhbuf), 2s + 1 its gate gradients (chunks of H).
    Phase T only produces dh0, so the last stage is 2T. STAGE and SYNC as forward."""
    i_n, i_d = tl.program_id(1), tl.program_id(2)
    o_b, m_b, b_len = _program_rows(p_len, T, B, BLOCK_B, HAS_LENGTHS)
    p_w_d = p_w + i_d * (4 * H * P)
    p_whr_d = p_whr + i_d * (P * H)
    if RESIDENT:
        # the program's chunk of P (all of H without a projection, where P = H)
        tl.static_assert(N_CHUNKS == 1)
        b_wi, b_wf, b_wg, b_wo = _load_w_slice(p_w_d, tl.arange(0, HP), i_n * BLOCK_N + tl.arange(0, BLOCK_N), H, P)
    else:
        b_wi, b_wf, b_wg, b_wo = None, None, None, None
    for u in range(s_begin, s_end):
        if PROJ:
            s = u // 2
            if STAGE == -1:
                first = u % 2 == 0
            else:  # a stepwise launch: one kind of stage, a kernel of its own (see _run)
                first = STAGE == 0
            if first:
                for j in range(P_CHUNKS):
                    o_p = (i_n * P_CHUNKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
                    b_dh = _bwd_dh(
                        s, B, i_d, o_b, m_b, b_len, o_p, p_w_d, b_wi, b_wf, b_wg, b_wo,
                        p_dhn, p_dgbuf, p_dh0, H, HP, P, D, RESIDENT, BLOCK_K, DOT_PRECISION, ACC,
                    )
                    m_bp = m_b[:, None] & (o_p < P)[None, :]
                    # backward walks the forward direction from each row's end
                    b_valid, _, o_row = _step_rows(s, B, i_d, o_b, m_b, b_len, D, 0)
                    o_seq = o_row[:, None] * P + o_p[None, :]
                    b_dout = tl.load(p_dout + o_seq, mask=b_valid[:, None] & m_bp, other=0.0).to(ACC)
                    b_dh_t = b_dh + b_dout
                    # the contract's dh: the projected h's gradient, zero past each sequence's end
                    b_dh_out = tl.where(b_valid[:, None], b_dh_t, 0.0).to(p_dh.dtype.element_ty)
                    tl.store(p_dh + o_seq, b_dh_out, mask=m_bp & (s < T))
                    o_x = (i_d * B + o_b)[:, None] * P + o_p[None, :]
                    tl.store(p_dhbuf + o_x, b_dh_t.to(p_dhbuf.dtype.element_ty), mask=m_bp)
            else:
                for j in range(N_CHUNKS):
                    o_n = (i_n * N_CHUNKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
                    b_dr = _bwd_project(s, B, i_d, o_b, m_b, o_n, p_whr_d, p_dhbuf, H, P, PP, BLOCK_K, DOT_PRECISION, ACC)
                    _bwd_gates(s, T, B, i_d, o_b, m_b, b_len, o_n, b_dr, p_dout, p_gates, p_cs, p_c0, p_dgbuf,
                               p_dc, p_dgates, H, D, ACC, False)
        else:
            for j in range(N_CHUNKS):
                o_n = (i_n * N_CHUNKS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
                b_dh = _bwd_dh(
                    u, B, i_d, o_b, m_b, b_len, o_n, p_w_d, b_wi, b_wf, b_wg, b_wo,
                    p_dhn, p_dgbuf, p_dh0, H, HP, P, D, RESIDENT, BLOCK_K, DOT_PRECISION, ACC,
                )
                _bwd_gates(u, T, B, i_d, o_b, m_b, b_len, o_n, b_dh, p_dout, p_gates, p_cs, p_c0, p_dgbuf,
                           p_dc, p_dgates, H, D, ACC, True)
        _end_of_step(u, s_begin, s_end, p_sync, SYNC)


# ---------------------------------------------------------------------------------------------
# Host side: schedule choice and launchers
# ---------------------------------------------------------------------------------------------


def _check_device(t):
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")


def state_dtype(dtype):
    """Cell state and gradient accumulation: fp32 at least (fp64 for fp64), as vectorized.py."""
    return torch.promote_types(dtype, torch.float32)


def _empty(like, *shape, dtype=None):
    """Every output buffer the kernels must fill completely (tests swap in NaN-filled ones)."""
    return like.new_empty(shape, dtype=dtype)


_FORCED = {}


@contextmanager
def forced_plan(schedule=None, block_n=None, resident=None):
    """Force the schedule of every recurrence call inside the block (tests, benchmarks)."""
    global _FORCED
    saved = _FORCED
    _FORCED = {"schedule": schedule, "block_n": block_n, "resident": resident}
    try:
        yield
    finally:
        _FORCED = saved


def _run(kernel, plan, T, B, D, n_stages, args, meta):
    """Launch `kernel` over stages 0..n_stages-1 (steps, or half steps with a projection) with
    the plan's schedule."""
    num_warps = plan.bwd_num_warps if kernel is _lstm_bwd_kernel else plan.num_warps
    grid = plan.grid(B, D)
    meta = dict(
        meta,
        HP=plan.hp,
        BLOCK_B=plan.block_b,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        N_CHUNKS=plan.chunks_per_program,
        # a tile program walks P's chunks as well; otherwise program i_n owns chunk i_n of P as
        # of H (PP <= HP: those beyond P have nothing to do in a projection stage)
        P_CHUNKS=triton.cdiv(meta["PP"], plan.block_n) if plan.schedule == "tile" else 1,
        RESIDENT=plan.resident,
        num_warps=num_warps,
    )
    device = args[0].device
    if plan.schedule == "persistent":
        # one monotonic counter per (batch tile, direction) group, fresh for every launch
        sync = torch.zeros(grid[0] * D, dtype=torch.int32, device=device)
        if COOPERATIVE and device.type == "cuda":
            meta["launch_cooperative_grid"] = True
        kernel[grid](*args, sync, T, B, 0, n_stages, SYNC=2, STAGE=-1, **meta)
        return
    sync = torch.empty(1, dtype=torch.int32, device=device)  # never touched
    if plan.schedule == "tile":
        kernel[grid](*args, sync, T, B, 0, n_stages, SYNC=1, STAGE=-1, **meta)
        return
    for s in range(n_stages):
        # with a projection, a kernel for each kind of stage: neither holds the other's registers
        # (one kernel for both spilled 56-108 B in TF32 forwards: NOTES.md T6)
        kernel[grid](*args, sync, T, B, s, s + 1, SYNC=0, STAGE=s % 2 if meta["PROJ"] else -1, **meta)


def _plan(B, D, H, dtype, device, schedule, block_n, resident):
    """plan_schedule with explicit arguments first, then whatever forced_plan set."""
    explicit = {"schedule": schedule, "block_n": block_n, "resident": resident}
    chosen = {k: v if v is not None else _FORCED.get(k) for k, v in explicit.items()}
    return plan_schedule(B, D, H, dtype, device, **chosen)


def _meta(dtype, device, H, D, has_lengths, w_hr):
    acc = tl.float64 if state_dtype(dtype) == torch.float64 else tl.float32
    P = H if w_hr is None else w_hr.shape[1]
    if P > H:
        # a projection stage's chunks are the programs' hidden chunks (see _run)
        raise ValueError(f"the Triton kernels need proj_size <= hidden_size, got {P} > {H}")
    return dict(
        H=H, P=P, PP=_pow2_at_least(P), D=D, PROJ=w_hr is not None,
        HAS_LENGTHS=has_lengths, DOT_PRECISION=dot_precision(dtype, device), ACC=acc,
    )


def recurrence_forward(
    gx, w_hh, h0, c0, lengths=None, save=True, *, w_hr=None, schedule=None, block_n=None, resident=None
):
    """See the contract in contract.py (with its projection extra, `w_hr`). `schedule`,
    `block_n`, `resident` force a Plan."""
    _check_device(gx)
    T, B, D, G = gx.shape
    H = G // 4
    dtype, sdtype = gx.dtype, state_dtype(gx.dtype)
    plan = _plan(B, D, H, dtype, gx.device, schedule, block_n, resident)
    meta = dict(_meta(dtype, gx.device, H, D, lengths is not None, w_hr), SAVE=save)
    P = meta["P"]
    gx = gx.contiguous()
    w = w_hh.to(dtype).contiguous()
    out = _empty(gx, T, B, D, P)
    gates = _empty(gx, T, B, D, G) if save else None
    cs = _empty(gx, T, B, D, H, dtype=sdtype) if save else None
    h_n = _empty(gx, D, B, P)
    h_buf = gx.new_empty(2, D, B, P)  # ping-pong h exchange; half 0 starts as h0
    h_buf[0].copy_(h0)
    c0_s = gx.new_empty(D, B, H, dtype=sdtype).copy_(c0)
    c = c0_s.clone()  # the running cell state; holds c_n at the end
    p_len = lengths.contiguous() if lengths is not None else c0_s  # never read without lengths
    if w_hr is None:  # W_hr and the o * tanh(c) exchange are never touched: stand-ins
        w_r, r_buf = w, h_buf
    else:
        w_r, r_buf = w_hr.to(dtype).contiguous(), gx.new_empty(D, B, H)
    _run(
        _lstm_fwd_kernel, plan, T, B, D, T if w_hr is None else 2 * T,
        # without save the gates/cs pointers are never stored to: out and c stand in for them
        (gx, w, w_r, p_len, h_buf, r_buf, c, c0_s, out, gates if save else out, cs if save else c, h_n),
        meta,
    )
    return out, h_n, c.to(dtype), gates, cs


def recurrence_backward(
    dout, dh_n, dc_n, w_hh, gates, cs, c0, lengths=None, *, w_hr=None, schedule=None, block_n=None, resident=None
):
    """See the contract in contract.py (with its projection extra, `w_hr`, which adds a
    fourth result, dh); dh0 and dc0 come back in the state dtype."""
    _check_device(gates)
    T, B, D, G = gates.shape
    H = G // 4
    dtype, sdtype = gates.dtype, state_dtype(gates.dtype)
    plan = _plan(B, D, H, dtype, gates.device, schedule, block_n, resident)
    meta = _meta(dtype, gates.device, H, D, lengths is not None, w_hr)
    P = meta["P"]
    w = w_hh.to(dtype).contiguous()
    dout = dout.reshape(T, B, D, P).contiguous()
    dgates = _empty(gates, T, B, D, G)
    dh0 = _empty(gates, D, B, P, dtype=sdtype)
    # dgates exchange for the recurrent dot, in the dot's input dtype; phase 0 reads zeros
    dg_buf = gates.new_zeros(2, D, B, G)
    dh_n_s = gates.new_empty(D, B, P, dtype=sdtype).copy_(dh_n)
    dc = gates.new_empty(D, B, H, dtype=sdtype).copy_(dc_n)  # running dc; dc0 at the end
    c0_s = gates.new_empty(D, B, H, dtype=sdtype).copy_(c0)
    p_len = lengths.contiguous() if lengths is not None else c0_s
    if w_hr is None:  # W_hr, the dh exchange and the dh result are never touched: stand-ins
        w_r, dh_buf, dh = w, dg_buf, dgates
    else:
        # dh exchanged in the dot's input dtype, as dgates
        w_r, dh_buf, dh = w_hr.to(dtype).contiguous(), gates.new_empty(D, B, P), _empty(gates, T, B, D, P)
    _run(
        # with a projection phase T (dh0 only) needs its first stage alone
        _lstm_bwd_kernel, plan, T, B, D, T + 1 if w_hr is None else 2 * T + 1,
        (dout, dh_n_s, w, w_r, p_len, gates.contiguous(), cs.contiguous(), c0_s, dg_buf, dh_buf, dc, dh0, dh, dgates),
        meta,
    )
    if w_hr is None:
        return dgates, dh0, dc
    return dgates, dh0, dc, dh
