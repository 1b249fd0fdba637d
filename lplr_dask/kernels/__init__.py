"""Pure per-block kernels on NumPy or CuPy arrays: quantizers, bit packing, the seeded random
streams and small dense linear algebra. No Dask, no I/O; every function takes and returns
arrays of one block, so the layers above can map it over tiles on any scheduler or device."""
