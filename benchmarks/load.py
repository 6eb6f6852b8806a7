"""--loaded: a second, busy process pinned to one core for the whole run, as another job on a
shared machine would be. Both implementations of a row run under it side by side.

What it shows (benchmarks/NOTES.md): an OpenMP team of 2 threads (oneDNN, MKL, ATen ops) waits
at every parallel region for the thread that shares its core with the busy process, so every
step of the recurrence pays a scheduler time slice; the native backend makes one fork/join per
call, so only its end waits.
"""
import os
import subprocess
import sys
import time

BUSY_LOOP = "import os\nif hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {0})\nwhile True: pass\n"


class BusyProcess:
    """Context: a process spinning on core 0 while the block runs."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        time.sleep(0.5)  # let it start spinning
        pinned = "pinned to core 0" if hasattr(os, "sched_setaffinity") else "not pinned (no sched_setaffinity)"
        self.description = f"a second process spinning on one core throughout ({pinned})"
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()
