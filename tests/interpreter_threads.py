"""Test-only: run every program instance of a TRITON_INTERPRET=1 launch in its own thread.

The interpreter runs a launch's programs one after another (GridExecutor.__call__ loops over
the grid and calls the kernel once per program id), so a cross-program spin barrier can never
open there. `concurrent_programs()` changes that for the launches inside the block:

  - GridExecutor is swapped for a subclass whose kernel stand-in only records each program id
    as the grid loop hands it over; when the last one arrives, one thread per program is
    started, all released together by a threading.Barrier, and joined. Argument copies, the
    patching of triton.language and the copy-back stay triton's own code.
  - The program id becomes per-thread: the interpreter keeps it in module state
    (`interpreter_builder.grid_idx`), so the builder's class is swapped for a subclass whose
    `grid_idx` is a thread-local property.
  - The interpreter's loads, stores and atomics run whole under the GIL (its atomics are real
    std::atomic operations in C++), so memory is sequentially consistent across programs.
    `delay_stores=True` weakens that: a program's stores stay private to it (its own loads see
    them) until it issues a release (or acq_rel) atomic, or ends. That is the most a GPU
    guarantees, so a barrier whose arrival is not a release publishes nothing in time.
  - `skew` seconds times the program's index along grid axis 1 is slept after every atomic
    the program issues: after each barrier the programs of a group start their next step in
    order, the last one well after the first, so a barrier that lets anyone through early, or
    a buffer overwritten while another program still reads it, shows up as wrong values every
    run instead of when the OS scheduler happens to allow it. Every atomic also yields the GIL
    (sleep(0)), so spinning programs leave the working ones most of the CPU.
  - The interpreter parses each @jit helper lazily, at its first call, and CPython's parser is
    not thread-safe ("AST constructor recursion depth mismatch" when programs first reach a
    helper together): that first parse is serialized by a lock.
  - A launch that does not finish within `timeout` seconds raises LaunchTimeout (an
    AssertionError): its threads are told to stop and raise at their next memory operation;
    they are daemon threads, so even a thread stuck elsewhere cannot keep pytest alive.

Nothing here touches library code; it patches triton's interpreter module only inside the block.
"""
import inspect
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import triton.language as tl  # noqa: F401  (GridExecutor patches the triton.language visible to self.fn)
from triton.runtime import interpreter as _interp


class LaunchTimeout(AssertionError):
    pass


class _Stopped(BaseException):
    """Raised inside a program thread told to stop (BaseException: the kernel cannot catch it)."""


_RELEASING = {_interp._ir.MEM_SEMANTIC.RELEASE, _interp._ir.MEM_SEMANTIC.ACQUIRE_RELEASE}


class _State(threading.local):
    grid_idx = None
    program = None  # the running program's private state (None in the launching thread)


class _Program:
    def __init__(self, grid_idx):
        self.grid_idx = grid_idx
        self.pending = []  # delayed stores: (addresses, values, mask), in program order
        self.atomics = 0


class _Launch:
    """Settings and bookkeeping of the concurrent mode, shared by every launch in the block."""

    def __init__(self, timeout, delay_stores, skew):
        self.timeout, self.delay_stores, self.skew = timeout, delay_stores, skew
        self.stop = threading.Event()
        self.launches = 0  # launches run concurrently (tests check that theirs did)
        self.max_programs = 0


_tls = _State()
_active = None  # the _Launch of the enclosing concurrent_programs() block


class _ThreadedBuilder(_interp.InterpreterBuilder):
    @property
    def grid_idx(self):
        return _tls.grid_idx

    @grid_idx.setter
    def grid_idx(self, value):
        _tls.grid_idx = value

    def _check(self):
        if _active is not None and _active.stop.is_set() and _tls.program is not None:
            raise _Stopped()

    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        self._check()
        ret = super().create_masked_load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)
        program = _tls.program
        if program is not None and program.pending:
            # a program sees its own stores at once, published or not
            data = ret.data
            addr = ptrs.data.astype(np.uint64)
            m = mask.data.astype(bool) if mask is not None else np.ones(addr.shape, bool)
            for p_addr, p_val, p_mask in program.pending:
                hit = np.isin(addr, p_addr[p_mask]) & m
                if hit.any():
                    lookup = dict(zip(p_addr[p_mask].tolist(), p_val[p_mask].tolist()))
                    for idx in zip(*np.nonzero(hit)):
                        data[idx] = lookup[int(addr[idx])]
        return ret

    def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        self._check()
        program = _tls.program
        if program is not None and _active is not None and _active.delay_stores:
            m = mask.data.astype(bool) if mask is not None else np.ones(ptrs.data.shape, bool)
            p_addr, p_val, p_mask = np.broadcast_arrays(ptrs.data.astype(np.uint64), value.data, m)
            program.pending.append((p_addr.copy(), p_val.copy(), p_mask.copy()))
            return None
        return super().create_masked_store(ptrs, value, mask, cache_modifier, eviction_policy)

    def _publish(self, program):
        for p_addr, p_val, p_mask in program.pending:
            _interp._interpreter.store(p_addr, p_val, p_mask)
        program.pending.clear()

    def _atomic(self, sem, run):
        self._check()
        program = _tls.program
        if program is not None and sem in _RELEASING:
            self._publish(program)
        result = run()
        if program is not None:
            program.atomics += 1
            # let the other programs run (a spinning program yields at every poll), and skew
            time.sleep(_active.skew * program.grid_idx[1] if _active.skew else 0)
        return result

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        plain = super().create_atomic_rmw
        return self._atomic(sem, lambda: plain(rmwOp, ptr, val, mask, sem, scope))

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        plain = super().create_atomic_cas
        return self._atomic(sem, lambda: plain(ptr, cmp, val, sem, scope))


def _run_programs(fn, jobs, launch):
    """Run fn(**args) for every (grid_idx, args) in jobs, one thread each, released together."""
    start = threading.Barrier(len(jobs))
    errors = {}

    def body(grid_idx, args):
        program = _Program(grid_idx)
        _tls.grid_idx, _tls.program = grid_idx, program
        try:
            start.wait()
            fn(**args)
            _ThreadedBuilder._publish(None, program)
        except _Stopped:
            errors[grid_idx] = "stopped"
        except BaseException as e:  # reported by the launching thread
            errors[grid_idx] = e
            launch.stop.set()  # the others would wait for this program at the barrier until the timeout
        finally:
            _tls.program = None

    threads = [threading.Thread(target=body, args=job, daemon=True, name=f"program{job[0]}") for job in jobs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + launch.timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        launch.stop.set()  # every program still running raises _Stopped at its next memory op
        for t in threads:
            t.join(5.0)
        raise LaunchTimeout(f"launch did not finish within {launch.timeout:.0f} s: {', '.join(stuck)} still running")
    for grid_idx, e in errors.items():
        if isinstance(e, BaseException):
            raise e
    launch.launches += 1
    launch.max_programs = max(launch.max_programs, len(jobs))


class _ConcurrentGridExecutor(_interp.GridExecutor):
    def __init__(self, fn, arg_names, grid, pre_run_hooks=[]):
        super().__init__(fn, arg_names, grid, pre_run_hooks)
        jobs = []

        def collect(**args):  # called by the grid loop once per program id, in order
            jobs.append((_tls.grid_idx, args))
            nx, ny, nz = _interp.interpreter_builder.grid_dim
            if len(jobs) == nx * ny * nz:
                batch = list(jobs)
                jobs.clear()
                _run_programs(fn, batch, _active)

        # __call__ reads the kernel's signature from self.fn: the stand-in carries the kernel's
        collect.__signature__ = inspect.signature(fn)
        self.fn = collect


_rewrite_lock = threading.Lock()
_unlocked_rewrite = _interp.InterpretedFunction.rewrite


def _locked_rewrite(self):
    with _rewrite_lock:
        return _unlocked_rewrite(self)


@contextmanager
def concurrent_programs(timeout=60.0, delay_stores=False, skew=0.0, switch_interval=1e-3):
    """Inside the block, every interpreted launch runs its programs concurrently (see above).

    Yields the _Launch record (its `launches` and `max_programs` say what ran that way)."""
    global _active
    if _active is not None:
        raise RuntimeError("concurrent_programs() blocks do not nest")
    launch = _Launch(timeout, delay_stores, skew)
    builder = _interp.interpreter_builder
    saved = (builder.__class__, _interp.GridExecutor, sys.getswitchinterval())
    grid_idx = builder.__dict__.pop("grid_idx", None)
    _active = launch
    builder.__class__ = _ThreadedBuilder
    _interp.GridExecutor = _ConcurrentGridExecutor
    _interp.InterpretedFunction.rewrite = _locked_rewrite
    sys.setswitchinterval(switch_interval)  # finer interleaving of the programs' Python code
    try:
        yield launch
    finally:
        launch.stop.set()
        builder.__class__, _interp.GridExecutor = saved[0], saved[1]
        _interp.InterpretedFunction.rewrite = _unlocked_rewrite
        sys.setswitchinterval(saved[2])
        builder.grid_idx = grid_idx
        _active = None
