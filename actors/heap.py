"""glibc heap settings for the processes that run physflow's numerical work.

Set in a worker's environment before it starts (glibc reads them once). Large buffers
below 32 MiB come from the heap, which is trimmed above 64 MiB, so a step's temporaries
reuse the memory of the step before instead of being mapped, page-faulted in and unmapped
again every time. Dask's own default (trim threshold 64 KiB, which also freezes the mmap
threshold at 128 KiB) made every FFT buffer of a simulation step a fresh mmap and the
simulators run at half speed; an expert actor's solve page-faulted in its temporaries on
every call (a solve and backward of 4 x 6 000 rows: about 3 500 faults before, 7 after).
"""

HEAP_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
}
