"""Choosing rank and bit widths under a budget: a thin wrapper over the planner.

Kept for callers of :func:`choose_config`; the work is :func:`lplr_dask.core.planner.plan`
(one sketch of the largest rank needed, a seeded column sample in the same pass, every
candidate scored exactly on the sample, coarse to fine over the bit widths).
"""

from __future__ import annotations

from lplr_dask.core.engine import Stages
from lplr_dask.core.params import CompressionConfig, CompressionOptions
from lplr_dask.core.planner import max_rank_for, plan
from lplr_dask.storage.inputs import InputMatrix

__all__ = ["choose_config", "max_rank_for"]


def choose_config(
    matrix: InputMatrix,
    options: CompressionOptions,
    *,
    stages: Stages | None = None,
    sample_cols: int = 2048,
    samples: dict | None = None,
) -> tuple[CompressionConfig, list[dict]]:
    """The configuration with the lowest estimated error within ``options.budget``.

    Parameters
    ----------
    matrix : InputMatrix
        The opened input (:func:`lplr_dask.storage.inputs.open_input`).
    options : CompressionOptions
        With ``budget`` set (see :func:`lplr_dask.core.planner.plan` for what bounds the
        candidates).
    stages : Stages, optional
        The stage runner; a new one by default.
    sample_cols : int, default 2048
        Columns of A kept (in whole scale groups) to score the candidates exactly on them.
    samples : dict, optional
        Ignored (the planner reads its sample once, in its sketch pass); kept for callers.

    Returns
    -------
    config : CompressionConfig
    table : list of dict
        Every candidate scored (method, rank, bits, bits_per_entry, estimated_rel_error).

    Raises
    ------
    ParameterError
        If no configuration fits: the message gives the smallest budget that does.
    """
    del samples
    pl = plan(matrix, options, stages=stages, sample_cols=sample_cols)
    return pl.best(options.budget).config, pl.table()
