"""The version of lplr-dask (one place; the package and its modules import it here)."""

__version__ = "0.1.0"
