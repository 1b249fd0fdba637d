"""The one resolved configuration of a compression, its result, and their validation.

:func:`make_config` validates the parameters of :func:`lplr_dask.compress` once and returns a
:class:`CompressionConfig` (method, rank, the quantizer of every factor, the block grid); the
job, the budget search and the checkpoint policy take that object. The paper's symbols: rank
is m, ``bits_left`` is B (L = Q(·)), ``bits_right`` is B′ (R = Q′(·)), ``bits_matrix`` is
B_nq (the direct quantizer Q(A)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.quantize import QuantizerSpec
from lplr_dask.storage.format import layout_nbytes
from lplr_dask.storage.inputs import canonical_block_shape

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_SVD_POWER_ITER",
    "LOW_RANK_METHODS",
    "METHODS",
    "CompressionConfig",
    "CompressionResult",
    "make_config",
]


METHODS = ("lplr", "paper", "nq", "dsvd", "lplr-svd", "nq+lplr", "auto")
LOW_RANK_METHODS = ("lplr", "paper", "dsvd", "lplr-svd", "nq+lplr")
DEFAULT_GROUP_SIZE = 128
DEFAULT_SVD_POWER_ITER = 2


@dataclass(frozen=True)
class CompressionConfig:
    """A fully resolved configuration: method, rank, the quantizer of every factor and the
    block grid of A, which fixes the chunk shapes of the stored arrays (L in row blocks of
    ``block_shape[0]`` × rank, R in rank × ``block_shape[1]`` panels, Q(A) in blocks)."""

    method: str
    rank: int | None
    left: QuantizerSpec | None
    right: QuantizerSpec | None
    matrix: QuantizerSpec | None
    n_oversamples: int
    n_power_iter: int
    seed: int
    block_shape: tuple[int, int] | None = None
    """Rows and columns of A's canonical blocks; None (plan records of earlier versions):
    the default grid of :func:`lplr_dask.storage.inputs.canonical_block_shape`."""

    def blocks(self, shape) -> tuple[int, int]:
        """The block grid for a matrix of ``shape``, clipped to it."""
        if self.block_shape is not None:
            return (
                min(int(self.block_shape[0]), shape[0]),
                min(int(self.block_shape[1]), shape[1]),
            )
        groups = [s.group_size for s in (self.right, self.matrix) if s is not None and s.group_size]
        return canonical_block_shape(shape, group_size=groups[0] if groups else None)

    def nbytes(self, shape) -> int:
        """Bytes stored for the codes and ranges of every factor of a matrix of ``shape``:
        the chunk payloads as they lie on disk, edge chunks padded to the full chunk shape
        (:func:`lplr_dask.storage.format.layout_nbytes`), without checksums or metadata."""
        n, d = (int(v) for v in shape)
        br, bc = self.blocks((n, d))
        total = 0
        if self.matrix is not None:
            total += layout_nbytes((n, d), self.matrix, (br, bc))
        if self.rank:
            total += layout_nbytes((n, self.rank), self.left, (br, self.rank))
            total += layout_nbytes((self.rank, d), self.right, (self.rank, bc))
        return total

    def bits_per_entry(self, shape) -> float:
        """8 × :meth:`nbytes` / (n·d): what the result costs on disk per entry of A."""
        return 8.0 * self.nbytes(shape) / (shape[0] * shape[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("left", "right", "matrix"):
            spec = getattr(self, name)
            d[name] = spec.to_dict() if spec is not None else None
        d["block_shape"] = list(self.block_shape) if self.block_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CompressionConfig:
        specs = {
            name: QuantizerSpec.from_dict(d[name]) if d.get(name) else None
            for name in ("left", "right", "matrix")
        }
        block = d.get("block_shape")
        return cls(**{**d, **specs, "block_shape": tuple(block) if block else None})


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress` wrote and measured (also stored in the group's attributes)."""

    output: str
    shape: tuple[int, int]
    source_dtype: str
    method: str
    rank: int | None
    bits_left: int | None
    bits_right: int | None
    bits_matrix: int | None
    group_size: int | None
    rel_fro_error: float
    bits_per_entry: float
    stored_bytes: int
    seconds: float
    seed: int
    n_oversamples: int
    n_power_iter: int
    stage_seconds: dict = field(default_factory=dict)
    budget: float | None = None
    budget_search: list = field(default_factory=list)
    """With ``budget``: every candidate scored (rank, bits, bits_per_entry,
    estimated_rel_error), as :func:`lplr_dask.core.search.choose_config` measured them."""
    reused_stages: list = field(default_factory=list)
    """Stages a resumed job took from an earlier run (see :mod:`lplr_dask.core.job`)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _check_int(name, value, lo, hi=None, fix=""):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer, got {value!r}.")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ParameterError(f"{name}={value} is out of range: it must be {bound}. {fix}".strip())


def _check_bits(name, bits):
    if bits is None:
        return
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, np.integer))
        or not (1 <= bits <= 8 or bits == 16)
    ):
        raise ParameterError(
            f"{name}={bits!r} is out of range: use 1 to 8 bits for integer codes, or 16 for a "
            "float16 passthrough."
        )


def make_config(
    *,
    method: str,
    shape,
    rank: int | None,
    bits_left: int | None = None,
    bits_right: int | None = None,
    bits_matrix: int | None = None,
    group_size: int | None = DEFAULT_GROUP_SIZE,
    n_oversamples: int = 0,
    n_power_iter: int | None = None,
    seed: int = 0,
    rounding: str = "nearest",
    block_shape: tuple[int, int] | None = None,
) -> CompressionConfig:
    """Validate parameters and build the quantizers of ``method`` (see :func:`compress`).

    ``block_shape`` is A's canonical block grid (``InputMatrix.block_shape``); by default
    :func:`lplr_dask.storage.inputs.canonical_block_shape` of ``shape`` and ``group_size``. It fixes
    the stored chunk shapes, hence the bytes that :meth:`CompressionConfig.nbytes` counts.
    """
    if method not in METHODS:
        raise ParameterError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    if method == "auto":
        raise ParameterError(
            "method='auto' chooses among lplr, nq+lplr and nq by their measured errors under a "
            "budget: give --budget BITS_PER_ENTRY (budget=...) instead of a rank."
        )
    n, d = shape
    for name, b in (
        ("bits_left", bits_left),
        ("bits_right", bits_right),
        ("bits_matrix", bits_matrix),
    ):
        _check_bits(name, b)
    _check_int("n_oversamples", n_oversamples, 0)
    _check_int("seed", seed, 0, fix="Use a non-negative integer seed.")
    if group_size is not None and group_size != 0 and (group_size < 8 or group_size % 8):
        raise ParameterError(
            f"group_size={group_size} is invalid: use a positive multiple of 8 (such as 128), "
            "or 0 for one scale per row (nq: per matrix)."
        )
    if n_power_iter is None:
        n_power_iter = DEFAULT_SVD_POWER_ITER if method in ("dsvd", "lplr-svd") else 0
    _check_int("n_power_iter", n_power_iter, 0)
    group = group_size or None
    if block_shape is None:
        blocks = canonical_block_shape((n, d), group_size=group)
    else:
        blocks = (min(int(block_shape[0]), n), min(int(block_shape[1]), d))

    def grouped(bits, fallback):
        if bits == 16:
            return QuantizerSpec(bits=16)
        if group:
            return QuantizerSpec(
                bits=bits, granularity="group", group_size=group, rounding=rounding
            )
        return QuantizerSpec(bits=bits, granularity=fallback, rounding=rounding)

    matrix = left = right = None
    if method in ("nq", "nq+lplr"):
        matrix = grouped(bits_matrix if bits_matrix is not None else 4, "tensor")
    if method == "nq":
        if rank is not None:
            raise ParameterError("method='nq' quantizes A directly and takes no rank; drop --rank.")
        return CompressionConfig(method, None, None, None, matrix, 0, 0, seed, blocks)
    if rank is None:
        raise ParameterError(
            f"method={method!r} needs a rank (--rank M) or a budget (--budget BITS_PER_ENTRY)."
        )
    limit = min(n, d) - 1
    _check_int(
        "rank",
        rank,
        1,
        limit,
        fix=f"For a {n}×{d} matrix the rank must be below min(n, d) = {min(n, d)}.",
    )
    if rank + n_oversamples > min(n, d):
        raise ParameterError(
            f"rank + n_oversamples = {rank + n_oversamples} exceeds min(n, d) = {min(n, d)}; "
            "lower n_oversamples."
        )
    bl = 8 if bits_left is None else bits_left
    br = 8 if bits_right is None else bits_right
    if method == "paper":
        if rounding != "nearest" or n_oversamples or n_power_iter:
            raise ParameterError(
                "method='paper' reproduces the reference code exactly: nearest rounding, no "
                "oversampling, no power iterations. Use method='lplr' for those options."
            )
        left = QuantizerSpec(bits=16) if bl == 16 else QuantizerSpec.paper(bl)
        right = QuantizerSpec(bits=16) if br == 16 else QuantizerSpec.paper(br)
    else:
        left = (
            QuantizerSpec(bits=16)
            if bl == 16
            else QuantizerSpec(bits=bl, granularity="column", rounding=rounding)
        )
        right = grouped(br, "row")
    return CompressionConfig(
        method, rank, left, right, matrix, n_oversamples, n_power_iter, seed, blocks
    )
