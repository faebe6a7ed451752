"""glibc heap settings for the processes that run physflow's numerical work.

Set in a worker's environment before it starts (glibc reads them once). Large buffers
below 32 MiB come from the heap, which is trimmed above 64 MiB, so a step's temporaries
reuse the memory of the step before instead of being mapped, page-faulted in and unmapped
again every time. Dask's own default (trim threshold 64 KiB, which also freezes the mmap
threshold at 128 KiB) made every FFT buffer of a simulation step a fresh mmap and the
simulators run at half speed; an expert actor's solve page-faulted in its temporaries on
every call (a solve and backward of 4 x 6 000 rows: about 3 500 faults before, 7 after).

A process already running (a training job's driver) takes the same settings through
`use_in_this_process`.
"""

import ctypes

HEAP_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
}

# glibc's mallopt parameters for the two variables
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}


def use_in_this_process() -> bool:
    """`HEAP_ENV` for the running process, through glibc's `mallopt` (which the variables
    only preset at start-up) -> whether it took. For a training driver: glibc's own
    sliding thresholds had PI-HC's driver map, page-fault in (13 000 faults, about 50 MB)
    and unmap again part of its network's and rows' buffers on every step (its part of a
    step on the quick timing problem 147 -> 130 ms). False, and nothing changed, where the
    C library has no `mallopt` (macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(_MALLOPT[name], int(value)) == 1 for name, value in HEAP_ENV.items())
