"""Prefect flows for lplr-dask (``pip install 'lplr-dask[flows]'``); see :mod:`pipelines.flows`."""
