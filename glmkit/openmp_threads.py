"""The process's OpenMP worker threads, kept to the team of the thread that computes.

torch computes on the CPU with OpenMP, and every thread that runs a parallel op gets a team of worker
threads of its own, kept after the op. Once the threads of all teams outnumber the cores, libgomp's
workers stop spin-waiting between parallel regions and sleep instead, so each of a decode step's many
short regions waits for them to wake. A server loads its model on the main thread and then computes on
a worker thread: with the main thread's idle team alive, a 16-row decode step of the serving benchmark's
model took 44 ms instead of 36 (2 cores). So a thread that hands the computing to another, or falls idle,
lets its team go.
"""

from __future__ import annotations

import ctypes
import functools
import re

OMP_PAUSE_SOFT = 1  # OpenMP 5.0: end the threads, keep nothing the next parallel region cannot rebuild
_RUNTIME = re.compile(r"/lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")


def release_openmp_threads() -> bool:
    """End the calling thread's OpenMP worker threads (OpenMP 5's `omp_pause_resource_all`), in every
    OpenMP runtime loaded (torch's, and those other libraries bring, e.g. sentencepiece's); its next
    parallel op starts new ones. False where no runtime offers the call or one refuses (inside a
    parallel region)."""
    pauses = [pause for pause in map(_pause_function, _loaded_runtimes()) if pause is not None]
    return bool(pauses) and all(pause(OMP_PAUSE_SOFT) == 0 for pause in pauses)


def _loaded_runtimes() -> list[str]:
    """The OpenMP runtimes mapped into this process (Linux; none found elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if _RUNTIME.search(p))


@functools.cache
def _pause_function(path: str):
    """The runtime's `omp_pause_resource_all`, or None when it predates OpenMP 5.0."""
    try:
        pause = ctypes.CDLL(path).omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause
