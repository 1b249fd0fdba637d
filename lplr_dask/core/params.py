"""The one parameter object of a compression, its resolved configuration and its result.

:class:`CompressionOptions` holds what the user asks for (method, rank or budget, bit widths,
...), validated once when it is made, with every default in one place. The job, the budget
search, the flows' configuration, the CLI and the checkpoint policy take it.
:meth:`CompressionOptions.resolve` turns it into a :class:`CompressionConfig` for a matrix of a
given shape (the quantizer of every factor, the block grid), which the engine runs.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.quantize import QUANTIZERS, QuantizerSpec, quantizer_spec
from lplr_dask.storage.format import layout_nbytes
from lplr_dask.storage.inputs import canonical_block_shape

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_QUANTIZERS",
    "DEFAULT_SVD_POWER_ITER",
    "LOW_RANK_METHODS",
    "METHODS",
    "ROUNDINGS",
    "CompressionConfig",
    "CompressionOptions",
    "CompressionResult",
]


METHODS = ("lplr", "paper", "nq", "dsvd", "lplr-svd", "nq+lplr", "auto")
LOW_RANK_METHODS = ("lplr", "paper", "dsvd", "lplr-svd", "nq+lplr")
DEFAULT_GROUP_SIZE = 128
DEFAULT_SVD_POWER_ITER = 2
ROUNDINGS = ("nearest", "stochastic")


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

    def low_rank(self) -> tuple[int, QuantizerSpec, QuantizerSpec]:
        """(rank, left, right) of a configuration with low-rank factors (every method but
        ``nq``); the low-rank stages call it, so a configuration without them fails loudly."""
        if not self.rank or self.left is None or self.right is None:
            raise RuntimeError(f"method {self.method!r} has no low-rank factors")  # a bug
        return self.rank, self.left, self.right

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
        if self.rank and self.left is not None and self.right is not None:
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
    """With ``budget`` or ``max_error``: every candidate scored (method, rank, bits,
    bits_per_entry, estimated_rel_error), as :func:`lplr_dask.core.planner.plan` measured
    them."""
    reused_stages: list = field(default_factory=list)
    """Stages a resumed job took from an earlier run (see :mod:`lplr_dask.core.job`)."""
    plan: dict = field(default_factory=dict)
    """With ``budget`` or ``max_error``: what the planner chose and how (method family,
    estimate, candidates scored and pruned, its sketch rank and passes); with ``max_error``
    also ``stepped_up`` (the first run's exact error missed E, so the next frontier point
    was run: ``first_rel_fro_error``, ``first_bits_per_entry``)."""
    passes: int = 2
    """Passes over A of the factorization: ``lplr`` 2, + 2 per power iteration, ``nq`` 1,
    ``dsvd``/``lplr-svd``/``nq+lplr`` 3 + 2 per power iteration, 1 with ``passes=1``
    (``verify`` adds one; a budget's planning passes are ``plan["plan_passes"]``)."""
    error_is_estimate: bool = False
    """True when ``rel_fro_error`` is the single-pass estimate (``passes=1`` without
    ``verify``); False when it is exact."""
    estimated_rel_fro_error: float | None = None
    """``passes=1``: the single-pass estimate, also when ``verify`` measured the exact error."""
    error_method: str | None = None
    """``passes=1``: how ``rel_fro_error`` was obtained (the estimator, or the verify pass)."""

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


@dataclass(frozen=True, kw_only=True)
class CompressionOptions:
    """What a compression computes: the method and its parameters, validated once.

    The one parameter object of the package: :func:`lplr_dask.compress`, the resumable job,
    the budget search, the flows' YAML ``compression:`` section, the ``lplr compress`` flags
    and the checkpoint policy's candidates all build or take one. Checks that need no matrix
    run on construction (:class:`~lplr_dask.errors.ParameterError` naming the field and the
    fix); :meth:`resolve` adds those that need its shape and returns the
    :class:`CompressionConfig` the engine runs. The paper's symbols: ``rank`` is m,
    ``bits_left`` is B (L = Q(·)), ``bits_right`` is B′ (R = Q′(·)), ``bits_matrix`` is B_nq
    (the direct quantizer Q(A)).

    Parameters
    ----------
    method : {"lplr", "paper", "nq", "dsvd", "lplr-svd", "nq+lplr", "auto"}, optional
        Default ``"auto"`` with ``budget`` (the planner weighs every method within
        ``max_passes``), ``"lplr"`` with ``rank`` or ``max_error`` (``auto``'s search for the
        fewest bits re-plans every family at each budget it tries: unfinished after 15
        minutes on 12288², where ``lplr`` takes 49 s).
        ``lplr``: orthonormalized sketch, quantized basis (per-column scales), projection
        re-quantized per column panel. ``paper``: Algorithm 1 of the paper with its reference
        quantizer (no QR, per-matrix min–max). ``nq``: A quantized directly. ``dsvd``: the
        quantized randomized SVD. ``lplr-svd``: LPLR on the SVD factors. ``nq+lplr``: Q(A)
        plus an LPLR correction of A − Q(A). ``auto``: the best of every method the planner
        knows (:data:`lplr_dask.core.planner.FAMILIES`: lplr, lplr with power iterations,
        dsvd, lplr-svd, nq, nq+lplr) within ``max_passes``, under ``budget`` or
        ``max_error``, by their estimated errors.
    rank : int, optional
        m, the inner dimension of L·R, 1 ≤ m < min(n, d). Required unless ``budget`` is
        given (or for ``nq``, which takes none).
    budget : float, optional
        Bits per entry of A: choose rank and bit widths so that ``bits_per_entry <= budget``
        with the lowest error (see :func:`lplr_dask.core.planner.plan`).
    bits_left, bits_right : int, optional
        B and B′: bits per entry of L and R, 1–8, or 16 for float16. Default 8 (the paper's).
    bits_matrix : int, optional
        Bits per entry of Q(A) for ``nq`` and ``nq+lplr``. Default 4.
    group_size : int, default 128
        Entries per scale along the rows of R (and of A for ``nq``); a multiple of 8, or 0 for
        one scale per row of R (``nq``: one scale for the matrix).
    n_oversamples : int, default 0
        Extra sketch columns; the rank-m basis is then the top-m subspace of the larger sketch
        (one more pass over A). Increase this before ``n_power_iter``.
    n_power_iter : int, optional
        Power iterations (two passes over A each). Default 0 (2 for ``dsvd``/``lplr-svd``).
    seed : int, default 0
        Seeds every random stream; the same seed and ``block_shape`` give byte-identical codes
        for any storage tiling, worker count or backend.
    rounding : {"nearest", "stochastic"}, default "nearest"
        Round to the nearest level, or unbiased stochastic rounding (dither from the seed).
    quantizer : {"minmax", "uniform", "clipped", "normal", "lloyd", "sign"}, optional
        The quantizer of every factor (see :func:`lplr_dask.kernels.quantize.quantizer_spec`):
        ``minmax`` the symmetric grid with float32 scales (the reference), ``uniform`` the
        asymmetric grid with bfloat16 ends, ``clipped`` the same on MSE-optimal ranges,
        ``normal`` normal-float levels (NF4 at 4 bits), ``lloyd`` a Lloyd–Max codebook fitted
        to the factor, ``sign`` 1-bit sign × mean |x|. Default: per factor
        :data:`DEFAULT_QUANTIZERS` (``paper``: ``minmax``, which it requires); with
        ``budget`` or ``max_error`` the planner weighs
        :data:`lplr_dask.core.planner.KIND_CHOICES` against them for L and R.
    block_shape : (int, int), optional
        The canonical block grid of the computation, and the chunk shape of the stored
        factors. Default: at most 4096 × 4096, in nearly equal blocks (see
        :func:`lplr_dask.storage.inputs.canonical_block_shape`).
    max_rank : int, optional
        Largest rank the planner considers. Default: no fixed cap; the budget and the matrix
        set the rank range, within the planner's memory guard (its n × K float64 sketch at
        most :data:`lplr_dask.core.planner.PLAN_SKETCH_BYTES`).
    passes : {1, 2}, default 2
        Passes over A. 2: the sketch, then the exact projection R = (LᵀL)⁺LᵀA and its exact
        error. 1: the range and co-range sketches in one pass (Tropp et al. 2017), R solved
        from the co-range sketch, the error estimated (see :mod:`lplr_dask.core.single_pass`).
        ``passes=1`` takes methods ``lplr`` and ``paper`` with a rank: the other methods, a
        budget, oversampling and power iterations need more passes over A.
    corange_size : int, optional
        ``passes=1`` only: ℓ, the rows of the co-range sketch W = Ψ·A, rank + 2 ≤ ℓ ≤ n.
        The single-pass error is about √(1 + m/(ℓ − m − 1)) times the two-pass error
        (Tropp et al. 2017, Thm. 4.3); the pass costs (m + ℓ + 10)·n·d multiply-adds and W
        takes ℓ·d float64 on the workers. Default 4m + 1 (×1.155; Tropp et al.'s 2m + 1
        gives ×1.41).
    max_error : float, optional
        E, 0 < E < 1: the fewest bits per entry whose relative Frobenius error is at most E
        (estimated by the planner, :func:`lplr_dask.core.planner.plan`; the run measures the
        exact error and, if it misses E, steps up once). Instead of ``rank`` or ``budget``.
    max_passes : int, optional
        The most passes over A a compression chosen by the planner may take (``auto``
        considers only methods within it; 1 lets it choose ``passes=1``). Default: unbounded
        for inputs up to 4 GiB, where an extra pass is a GEMM over data in memory, and 3 for
        larger ones, where every pass is a cold read of A
        (:func:`lplr_dask.core.planner.default_max_passes`).
    """

    method: str | None = None
    rank: int | None = None
    budget: float | None = None
    bits_left: int | None = None
    bits_right: int | None = None
    bits_matrix: int | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    n_oversamples: int = 0
    n_power_iter: int | None = None
    seed: int = 0
    rounding: str = "nearest"
    quantizer: str | None = None
    block_shape: tuple[int, int] | None = None
    max_rank: int | None = None
    passes: int = 2
    corange_size: int | None = None
    max_error: float | None = None
    max_passes: int | None = None

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", "lplr" if self.budget is None else "auto")
        method = self.method
        if method not in METHODS:
            raise ParameterError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
                raise ParameterError(f"budget={b!r} must be a positive number of bits per entry.")
            if self.rank is not None:
                raise ParameterError("Give either rank or budget, not both.")
            if self.max_error is not None:
                raise ParameterError(
                    "Give either budget or max_error, not both: a budget gets the lowest error "
                    "within a size, max_error the smallest size within an error."
                )
        if self.max_error is not None:
            e = self.max_error
            if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e < 1:
                raise ParameterError(
                    f"max_error={e!r} must be a relative Frobenius error between 0 and 1 "
                    "(exclusive), such as 0.05."
                )
            if self.rank is not None:
                raise ParameterError(
                    "Give either rank or max_error, not both: max_error chooses the rank."
                )
        elif self.budget is not None:
            pass
        elif method == "auto":
            raise ParameterError(
                "method='auto' chooses the method, rank and bit widths by their estimated "
                "errors: give --budget BITS_PER_ENTRY (budget=...) or --max-error E instead "
                "of a rank."
            )
        elif method == "nq" and self.rank is not None:
            raise ParameterError("method='nq' quantizes A directly and takes no rank; drop --rank.")
        elif method != "nq" and self.rank is None:
            raise ParameterError(
                f"method={method!r} needs a rank (--rank M) or a budget (--budget BITS_PER_ENTRY)."
            )
        if self.rank is not None:
            _check_int("rank", self.rank, 1)
        for name in ("bits_left", "bits_right", "bits_matrix"):
            _check_bits(name, getattr(self, name))
        _check_int("n_oversamples", self.n_oversamples, 0)
        _check_int("seed", self.seed, 0, fix="Use a non-negative integer seed.")
        if self.max_rank is not None:
            _check_int("max_rank", self.max_rank, 1)
        if self.max_passes is not None:
            _check_int("max_passes", self.max_passes, 1, fix="Use 1 or more, or leave it unset.")
        _check_int("passes", self.passes, 1, 2, fix="Use 2 (exact projection) or 1 (one read).")
        self._check_single_pass()
        if self.group_size is None:
            object.__setattr__(self, "group_size", 0)
        gs = self.group_size
        _check_int("group_size", gs, 0)
        if gs and (gs < 8 or gs % 8):
            raise ParameterError(
                f"group_size={gs} is invalid: use a positive multiple of 8 (such as 128), "
                "or 0 for one scale per row (nq: per matrix)."
            )
        if self.n_power_iter is not None:
            _check_int("n_power_iter", self.n_power_iter, 0)
        if self.rounding not in ROUNDINGS:
            raise ParameterError(f"rounding={self.rounding!r} is unknown; use one of {ROUNDINGS}.")
        _check_quantizer(self)
        if self.block_shape is not None:
            bs = tuple(self.block_shape)
            if len(bs) != 2:
                raise ParameterError(f"block_shape={self.block_shape!r} must be (rows, cols).")
            for v in bs:
                _check_int("block_shape", v, 1)
            object.__setattr__(self, "block_shape", (int(bs[0]), int(bs[1])))
        if method == "paper" and (
            self.rounding != "nearest" or self.n_oversamples or self.n_power_iter
        ):
            raise ParameterError(
                "method='paper' reproduces the reference code exactly: nearest rounding, no "
                "oversampling, no power iterations. Use method='lplr' for those options."
            )

    def _check_single_pass(self):
        """What ``passes=1`` can do: a rank-m lplr or paper factorization, nothing that needs
        a second look at A; ``corange_size`` only with it (the bounds that need n: the job)."""
        if self.corange_size is not None:
            if self.passes != 1:
                raise ParameterError(
                    "corange_size sets the co-range sketch of passes=1; with two passes R is the "
                    "exact projection and needs none. Drop corange_size or add passes=1."
                )
            _check_int("corange_size", self.corange_size, 1)
            if self.rank is not None and self.corange_size < self.rank + 2:
                raise ParameterError(
                    f"corange_size={self.corange_size} is too small for rank {self.rank}: it "
                    f"must be at least rank + 2 = {self.rank + 2} (the error factor is "
                    "√(1 + rank/(corange_size − rank − 1))). Leave it unset for 4·rank + 1."
                )
        if self.passes != 1:
            return
        why = None
        if self.method == "nq":
            why = (
                "method='nq' has no low-rank factors to sketch; it reads A once with group-wise "
                "scales (twice with group_size=0) at the default passes=2 already"
            )
        elif self.method not in ("lplr", "paper"):
            why = (
                f"method={self.method!r} needs more than one pass over A (nq+lplr quantizes A "
                "in a pass of its own, dsvd and lplr-svd truncate with a second, auto "
                "searches)"
            )
        elif self.budget is not None or self.max_error is not None:
            why = "the planner reads A once more than the compression"
        elif self.n_oversamples:
            why = "n_oversamples truncates the larger sketch with a second pass over A"
        elif self.n_power_iter:
            why = "n_power_iter adds two passes over A per iteration"
        if why:
            raise ParameterError(
                f"passes=1 is not available here: {why}. Use passes=1 with method 'lplr' or "
                "'paper', a rank and neither oversampling nor power iterations, or passes=2."
            )

    @classmethod
    def of(cls, options: CompressionOptions | None = None, **fields_) -> CompressionOptions:
        """``options`` with ``fields_`` replaced (a new object when ``options`` is None).

        Raises :class:`~lplr_dask.errors.ParameterError` for a name that is not a field.
        """
        names = [f.name for f in fields(cls)]
        unknown = [k for k in fields_ if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParameterError(
                f"{unknown[0]!r} is not a compression option.{hint} The options are: "
                f"{', '.join(names)}."
            )
        return cls(**fields_) if options is None else replace(options, **fields_)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_shape"] = list(self.block_shape) if self.block_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CompressionOptions:
        block = d.get("block_shape")
        return cls.of(None, **{**d, "block_shape": tuple(block) if block else None})

    def resolve(self, shape, *, block_shape=None) -> CompressionConfig:
        """The :class:`CompressionConfig` for a matrix of ``shape`` (rank given, no budget).

        ``block_shape`` overrides the block grid (the input's ``InputMatrix.block_shape``, the
        same grid by default); it fixes the stored chunk shapes, hence the bytes that
        :meth:`CompressionConfig.nbytes` counts.
        """
        return _resolve(self, tuple(int(v) for v in shape), block_shape or self.block_shape)


DEFAULT_QUANTIZERS = {"left": "lloyd", "right": "lloyd", "matrix": "lloyd"}
"""The quantizer of each factor when ``quantizer`` is not given (``paper`` always uses its
reference ``minmax``): L (per column), R (group-wise) and Q(A) (group-wise), measured by
``benchmarks/bench_quantizers.py --part quality`` at equal widths (lloyd stores no more
bits than minmax there); with a budget the planner also weighs
:data:`lplr_dask.core.planner.KIND_CHOICES` for L and R. Where ``lloyd`` cannot run
(Q(A) of ``nq+lplr``, R of ``passes=1``) the default is :data:`FALLBACK_QUANTIZER`."""
FALLBACK_QUANTIZER = "normal"
ONE_BIT_QUANTIZERS = {"left": "clipped", "right": "clipped", "matrix": "lloyd"}
"""The defaults of 1-bit factors: for L and R the clipped two-level grid was best or within
0.2 % of the best on both matrices (a 2-level Lloyd codebook shared by all groups did worst);
for Q(A) no kind won on both, lloyd had the smallest worst-case ratio to the best."""


def _check_quantizer(opts) -> None:
    q = opts.quantizer
    if q is None:
        return
    if q not in QUANTIZERS:
        raise ParameterError(f"quantizer={q!r} is unknown; use one of {', '.join(QUANTIZERS)}.")
    if opts.method == "paper" and q != "minmax":
        raise ParameterError(
            f"method='paper' keeps the reference quantizer (per-matrix min–max); "
            f"quantizer={q!r} needs another method, such as 'lplr'."
        )
    if q == "lloyd" and opts.method == "nq+lplr":
        raise ParameterError(
            "quantizer='lloyd' fits a codebook per factor, which the residual of nq+lplr "
            "cannot take yet; use quantizer='normal' or 'clipped' with nq+lplr."
        )
    if q == "lloyd" and opts.passes == 1:
        raise ParameterError(
            "quantizer='lloyd' fits R's codebook to R's values, which passes=1 never holds; "
            "use passes=2, or quantizer='normal' or 'clipped'."
        )


def _factor_spec(opts, factor: str, bits: int, granularity: str, group, rounding):
    """The quantizer of one factor: the named ``quantizer``, else the factor's default."""
    defaults = ONE_BIT_QUANTIZERS if bits == 1 else DEFAULT_QUANTIZERS
    name = opts.quantizer or defaults[factor]
    if name == "sign" and bits not in (1, 16):
        raise ParameterError(
            f"quantizer='sign' is a 1-bit code, but {factor} has {bits} bits; give 1 bit "
            "(--bits-left/--bits-right/--bits-matrix 1) or another quantizer."
        )
    lloyd_impossible = (factor == "matrix" and opts.method == "nq+lplr") or (
        factor == "right" and opts.passes == 1
    )
    if name == "lloyd" and lloyd_impossible:
        name = FALLBACK_QUANTIZER
    return quantizer_spec(
        name, bits=bits, granularity=granularity, group_size=group, rounding=rounding
    )


def _resolve(opts: CompressionOptions, shape, block_shape) -> CompressionConfig:
    method, rank, rounding = opts.method, opts.rank, opts.rounding
    assert method is not None  # set by __post_init__
    if opts.budget is not None or opts.max_error is not None:
        raise ParameterError(
            "a budget or max_error is resolved by the planner (lplr_dask.core.planner.plan), "
            "not by CompressionOptions.resolve."
        )
    n, d = shape
    group_size = opts.group_size
    n_power_iter = opts.n_power_iter
    if n_power_iter is None:
        n_power_iter = DEFAULT_SVD_POWER_ITER if method in ("dsvd", "lplr-svd") else 0
    bits_left, bits_right, bits_matrix = opts.bits_left, opts.bits_right, opts.bits_matrix
    n_oversamples, seed = opts.n_oversamples, opts.seed
    group = group_size or None
    if block_shape is None:
        blocks = canonical_block_shape((n, d), group_size=group)
    else:
        blocks = (min(int(block_shape[0]), n), min(int(block_shape[1]), d))

    def grouped(bits, fallback, factor):
        if bits == 16:
            return QuantizerSpec(bits=16)
        if group:
            return _factor_spec(opts, factor, bits, "group", group, rounding)
        return _factor_spec(opts, factor, bits, fallback, None, rounding)

    matrix = left = right = None
    if method in ("nq", "nq+lplr"):
        matrix = grouped(bits_matrix if bits_matrix is not None else 4, "tensor", "matrix")
    if method == "nq":
        return CompressionConfig(method, None, None, None, matrix, 0, 0, seed, blocks)
    assert rank is not None  # __post_init__: every method but nq has a rank or a budget
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
        left = QuantizerSpec(bits=16) if bl == 16 else QuantizerSpec.paper(bl)
        right = QuantizerSpec(bits=16) if br == 16 else QuantizerSpec.paper(br)
    else:
        left = (
            QuantizerSpec(bits=16)
            if bl == 16
            else _factor_spec(opts, "left", bl, "column", None, rounding)
        )
        right = grouped(br, "row", "right")
    return CompressionConfig(
        method, rank, left, right, matrix, n_oversamples, n_power_iter, seed, blocks
    )
