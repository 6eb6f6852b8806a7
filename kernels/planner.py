"""Schedule planner for the Triton recurrence (kernels/triton_recurrence.py): which schedule,
block sizes and W_hh placement a [*, B, D, 4H] recurrence runs with. Plain Python: it runs
(and is tested) without a GPU, and plans for any SM count (`sm_count`).

Schedule chosen by shape (`plan_schedule`), HP = next_pow2(max(H, 16)) because tl.dot wants
every dim >= 16 and tl.arange powers of two (batch tiles are padded to >= 16 rows the same way):
  - HP <= 128: tile, 16 batch rows per program. W_hh is small and a step is little work: one
    program per batch tile and direction needs no barrier at all. W_hh resident when
    HP <= 64 (HP <= 32 for FMA dots: IEEE fp32, fp64), one chunk covering H; otherwise
    streamed in 32-wide chunks.
  - HP > 128 on a GPU: persistent, batch tiles of up to 32 rows, BLOCK_N the smallest power of
    two >= 16 such that D * batch_tiles * HP/BLOCK_N <= SM count, if the W slice 4*HP*BLOCK_N
    fits the on-chip budget (64 KiB for tensor-core dots: fp16/bf16/TF32; 8K elements for IEEE
    fp32, whose FMA dot replicates K per thread). Otherwise: tile with W streamed when the
    D * cdiv(B, 16) 16-row tiles alone fill the SMs (no launch per step), else stepwise, whose
    programs own 32-wide chunks (16 for FMA dots; no barrier, so any grid size works) with the
    W slice resident when it fits the same budget, batch tiles of up to 32 rows either way.
    Streamed W comes in K chunks of 16. The budgets, the 32-row and chunk limits and the
    backward's warp count (Plan.bwd_num_warps) come from compiling every plan for sm_80 and
    sm_90 with the bundled ptxas (benchmarks/compile_matrix.py: no spills); the thresholds
    between schedules are first guesses, to be measured on a GPU (benchmarks/schedules.py).
  - Off-GPU (interpreter) persistent runs only when each group is one program (its barrier
    then never waits); the planner picks that for HP > 128, and stepwise can be forced.
A layer with a projection (proj_size P <= H) is planned on H alone: its W_hh slices are no
larger than those of the same H without one, and W_hr is streamed (triton_recurrence.py's
docstring; its plans are in the compile matrix as HpP, NOTES.md T6).
"""
import os
from dataclasses import dataclass

import torch
import triton

SCHEDULES = ("tile", "persistent", "stepwise")
MIN_DOT = 16  # smallest M, N, K tl.dot accepts
TILE_MAX_HP = 128  # padded H up to which one program walks all of H (tile schedule)
TILE_RESIDENT_HP = 64  # ... and keeps all of W_hh on chip (tensor-core dots)
TILE_RESIDENT_HP_FMA = 32  # the same for FMA dots (IEEE fp32, fp64), which hold K per thread
TILE_STREAM_BLOCK_N = 32  # hidden chunk of a tile program that streams W_hh
STEPWISE_BLOCK_N = 32  # hidden chunk per program of the one-launch-per-step schedule
STEPWISE_BLOCK_N_FMA = 16  # ... with FMA dots, whose fused 4*BLOCK_N-wide dot spills at 32
STREAM_BLOCK_K = 16  # K chunk of a program that streams W_hh (32 spilled: compile matrix, T3)
RESIDENT_BLOCK_B = 32  # batch rows of a persistent (or resident stepwise) program
STREAM_BLOCK_B = 32  # batch rows of a streaming stepwise program (64 spilled: compile matrix, T3)
# On-chip W_hh slice budgets (every plan they admit compiles without spills for sm_80/sm_90:
# benchmarks/compile_matrix.py):
# tensor-core dots (fp16, bf16, TF32) hold 64 KiB; IEEE fp32 dots run on the FMA units, which
# replicate the K extent per thread, so they hold far less.
RESIDENT_BYTES_MMA = 64 * 1024
RESIDENT_ELEMS_FMA = 8 * 1024


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Plan:
    """How one recurrence call is laid out (see the module docstring)."""

    schedule: str
    block_b: int  # batch rows per program (>= 16 for tl.dot)
    block_n: int  # hidden units per chunk
    hp: int  # H padded to a power of two >= 16
    resident: bool  # W_hh slice loaded once before the time loop, else streamed per K chunk
    block_k: int = 32  # K chunk when streaming
    num_warps: int = 4

    @property
    def bwd_num_warps(self):
        """Warps of the backward kernel. Its dot, [BB, K] x [K, BN], has only BB/16 * BN/8
        m16n8 MMA tiles, and more warps than tiles compute the same products again and make
        ptxas halve its register budget (it aims at 2 CTAs per SM): 4 warps when there are at
        most 4 tiles, or at most 2 with W resident, whose slice must stay spread over enough
        threads (compile matrix, NOTES T3: 2 warps spilled 732 B, 4 warps at 32 rows 762 B)."""
        tiles = (self.block_b // 16) * (self.block_n // 8)
        return min(self.num_warps, 4) if tiles <= (2 if self.resident else 4) else self.num_warps

    def grid(self, B, D):
        chunk_programs = 1 if self.schedule == "tile" else self.hp // self.block_n
        return (triton.cdiv(B, self.block_b), chunk_programs, D)

    @property
    def chunks_per_program(self):
        return self.hp // self.block_n if self.schedule == "tile" else 1


def _pow2_at_least(n, floor=MIN_DOT):
    return max(floor, triton.next_power_of_2(n))


def _sm_count(device):
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fma_dot(dtype, precision):
    """Whether the recurrent dot runs on the FMA units (IEEE fp32, fp64), not tensor cores."""
    return dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee")


def _slice_fits(hp, block_n, dtype, precision):
    elems = 4 * hp * block_n
    if _fma_dot(dtype, precision):
        return elems <= RESIDENT_ELEMS_FMA
    return elems * torch.finfo(dtype).bits // 8 <= RESIDENT_BYTES_MMA


def plan_schedule(B, D, H, dtype, device, schedule=None, block_n=None, resident=None, *, sm_count=None):
    """The Plan for a [*, B, D, 4H] recurrence. `schedule`, `block_n` and `resident` force a
    choice (tests, benchmarks); the defaults follow the rules in the module docstring.
    `sm_count` plans for a GPU with that many SMs whatever `device` is (the compile matrix and
    tests plan for GPUs they do not have); by default it is `device`'s own."""
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    hp = _pow2_at_least(H)
    if block_n is not None and (block_n < MIN_DOT or block_n & (block_n - 1) or block_n > hp):
        raise ValueError(f"block_n must be a power of two in [{MIN_DOT}, {hp}], got {block_n}")
    on_gpu = sm_count is not None or (device.type == "cuda" and not _interpreting())
    if sm_count is None:
        sm_count = _sm_count(device)
    forced = schedule is not None
    precision = dot_precision(dtype, device)
    block_k = min(hp, STREAM_BLOCK_K)
    fma = _fma_dot(dtype, precision)
    if schedule is None:
        schedule = "tile" if hp <= TILE_MAX_HP else "persistent"

    if schedule == "tile":
        resident_hp = TILE_RESIDENT_HP_FMA if fma else TILE_RESIDENT_HP
        if block_n is None:
            block_n = hp if hp <= resident_hp else TILE_STREAM_BLOCK_N
        if resident is None:
            resident = block_n == hp and hp <= resident_hp
        if resident and block_n != hp:
            raise ValueError("a resident tile program holds all of W_hh: block_n must equal the padded H")
        # W streamed through tensor cores: 4 warps (the fused forward dot still gives each warp
        # distinct MMA tiles; with 8 ptxas capped registers at 128 and spilled); W resident or
        # FMA dots need the 8 warps' registers (compile matrix, NOTES T3)
        warps = 4 if hp <= 32 or not (resident or fma) else 8
        return Plan("tile", MIN_DOT, block_n, hp, resident, block_k, num_warps=warps)

    # batch rows per program: the [BLOCK_B, *] operand and gate tiles spill beyond 32 rows
    # (ptxas, sm_80/sm_90: benchmarks/compile_matrix.py), with W resident or streamed
    block_b = min(_pow2_at_least(B), RESIDENT_BLOCK_B)
    n_bt = triton.cdiv(B, block_b)
    if schedule == "persistent":
        explicit_block_n = block_n is not None
        if block_n is None:
            if on_gpu:
                # the smallest chunks whose grid still fits the SMs: the least W_hh per program
                block_n = MIN_DOT
                while block_n < hp and D * n_bt * (hp // block_n) > sm_count:
                    block_n *= 2
            else:
                block_n = hp
        n_members = hp // block_n
        grid_fits = D * n_bt * n_members <= sm_count
        slice_fits = _slice_fits(hp, block_n, dtype, precision)
        if on_gpu and not (grid_fits and slice_fits):
            if forced:
                raise ValueError(f"persistent grid {D}x{n_bt}x{n_members} or its W_hh slice does not fit this GPU")
            if D * triton.cdiv(B, MIN_DOT) >= sm_count:
                # enough batch tiles to fill the GPU on their own: no launch per step needed
                return Plan("tile", MIN_DOT, TILE_STREAM_BLOCK_N, hp, False, block_k, num_warps=8 if fma else 4)
            schedule = "stepwise"
            if not explicit_block_n:
                block_n = None  # stepwise needs no co-residency: keep its chunks narrow
        elif not on_gpu and n_members > 1:
            # programs run one after another here: a multi-program barrier would never open
            raise ValueError("off-GPU the persistent schedule needs one program per group; use stepwise")
    if schedule == "persistent":
        if resident is False:
            raise ValueError("the persistent schedule always keeps its W_hh slice resident")
        return Plan("persistent", block_b, block_n, hp, True, block_k, num_warps=8)
    # stepwise: one launch per step, any number of programs
    if block_n is None:
        block_n = min(hp, STEPWISE_BLOCK_N_FMA if fma else STEPWISE_BLOCK_N)
    if resident is None:
        resident = _slice_fits(hp, block_n, dtype, precision)
    if not resident:
        block_b = min(_pow2_at_least(B), STREAM_BLOCK_B)
    return Plan("stepwise", block_b, block_n, hp, resident, block_k, num_warps=4 if block_b == MIN_DOT else 8)


def strict_fp32_dot():
    """The fp32 dot used when TF32 is off: "ieee" (FMA units, the default) or "tf32x3" (three
    TF32 tensor-core products per term, a_hi*b_hi + a_hi*b_lo + a_lo*b_hi), chosen with the
    environment variable BILSTM_FAST_STRICT_FP32_DOT. Emulated on the CPU, tf32x3 is as accurate
    as IEEE at the parity shapes (benchmarks/NOTES.md, T5), but with the tensor-core budgets
    below its plans spill (the hi/lo operand split triples what each thread holds): opt-in,
    for measuring on a GPU, until it has budgets of its own."""
    choice = os.environ.get("BILSTM_FAST_STRICT_FP32_DOT", "ieee")
    if choice not in ("ieee", "tf32x3"):
        raise ValueError(f"BILSTM_FAST_STRICT_FP32_DOT must be ieee or tf32x3, got {choice!r}")
    return choice


def dot_precision(dtype, device):
    """Input precision of the fp32 recurrent dot: follows cuDNN's RNN TF32 switch on CUDA
    (TF32 when on, strict_fp32_dot() when off)."""
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    return "tf32" if rnn_allows_tf32() else strict_fp32_dot()


def rnn_allows_tf32():
    """Whether nn.LSTM's cuDNN path may use TF32 right now (new fp32_precision API first)."""
    cudnn = torch.backends.cudnn
    rnn = getattr(getattr(cudnn, "rnn", None), "fp32_precision", None)
    if rnn is None:  # torch without the fp32_precision settings
        return bool(cudnn.allow_tf32)
    for precision in (rnn, getattr(cudnn, "fp32_precision", "none"), getattr(torch.backends, "fp32_precision", "none")):
        if precision != "none":
            return precision == "tf32"
    return False


