"""The LPLR algorithm on Dask: the validated parameter object, the graph builders and stages,
the budget search, the resumable job and :func:`lplr_dask.core.compress.compress`."""
