"""The ``lplr`` command: shared flags and output, matrix commands, checkpoint commands."""

from lplr_dask.cli.main import main

__all__ = ["main"]
