"""Files on disk: transactions (temporary names, atomic publish, overwrite rules), the
checksummed compressed format, checked input matrices, and the readers of compressed output.
Imports only :mod:`lplr_dask.kernels` and :mod:`lplr_dask.errors`."""
