"""Which tensors of a checkpoint are compressed, with what candidates, and the ``auto`` allocation.

Pure functions, no I/O: the checkpoint layer (:mod:`lplr_dask.checkpoint`) asks the planner
for every tensor's curve of candidates (estimated errors, no compression) and hands the curves
to :func:`allocate`; only the chosen candidate of each tensor is then compressed.

The ``auto`` policy follows LQ-LoRA's integer program: each compressed tensor t has a curve of
candidates c with stored bits b_tc (8 × stored bytes, exact) and an error e_tc (the checkpoint
layer passes n_t·‖W_t − Ŵ_tc‖²/‖W_t‖², the planner's estimate of the squared relative error
counted once per parameter: see :func:`lplr_dask.checkpoint.choose_candidates`). Choose one
candidate per tensor to minimise Σ_t e_t under Σ_t b_t ≤ budget · Σ_t n_t. :func:`allocate`
solves the Lagrangian relaxation min Σ_t (e_tc + λ b_tc) by bisection on λ, fills the remaining
slack greedily (best error drop per bit first), and finally compares the result with every
baseline assignment it is given (the single methods at the same budget: per tensor the
method's best point within the budget, from the same curves): so ``auto`` is never worse than
the best single method on the estimates, by construction; the real errors are measured by the
one compression of each tensor.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from lplr_dask.core.params import METHODS, CompressionConfig, CompressionOptions
from lplr_dask.errors import ParameterError

__all__ = [
    "AUTO",
    "CHECKPOINT_METHODS",
    "COMPRESSIBLE_DTYPES",
    "Candidate",
    "TensorPolicy",
    "allocate",
    "candidate_set",
    "classify",
    "nq_bits_for_budget",
]

AUTO = "auto"
SINGLE_METHODS = tuple(m for m in METHODS if m != AUTO)
CHECKPOINT_METHODS = (AUTO, *SINGLE_METHODS)
COMPRESSIBLE_DTYPES = ("F32", "F16", "BF16", "F64")
DEFAULT_CANDIDATE_BUDGETS = (2.0, 3.0, 4.0)
NQ_BITS = tuple(range(1, 9))
OVERRIDE_KEYS = (
    "method",
    "rank",
    "budget",
    "bits_left",
    "bits_right",
    "bits_matrix",
    "group_size",
)


def _matches(name: str, pattern: str) -> bool:
    """``re:REGEX`` is a regular expression searched in the name; anything else a glob."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(what: str, patterns) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str) or not p:
            raise ParameterError(f"{what} pattern {p!r} must be a non-empty string.")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ParameterError(
                    f"{what} pattern {p!r} is not a valid regular expression ({exc}); fix it or "
                    "drop the 're:' prefix to use a glob."
                ) from exc
    return out


@dataclass(frozen=True)
class TensorPolicy:
    """Which tensors are compressed; every other tensor passes through bit-identical.

    Parameters
    ----------
    min_size : int, default 4096
        Tensors with fewer entries pass through (their scales would cost more than they save).
    min_dim : int, default 16
        Both dimensions must be at least this (a rank-1 factor needs two; group scales want
        more).
    include : sequence of str, default ()
        Only names matching one of these are compressed (empty: every name). A pattern is a
        glob (``encoder.*.weight``) or ``re:REGEX`` (searched anywhere in the name).
    exclude : sequence of str, default ()
        Names matching one of these pass through.
    compress_embeddings : bool, default True
        Whether 2-D embedding tables (names containing ``embed``) may be compressed.
    overrides : mapping of str to dict or str, default {}
        Per-tensor settings by pattern (the first matching pattern wins): ``"skip"`` (pass
        through) or a dict of :func:`lplr_dask.compress` options among ``method``, ``rank``,
        ``budget``, ``bits_left``, ``bits_right``, ``bits_matrix``, ``group_size``. An overridden
        tensor is compressed exactly so; its bits count against the global budget.

    Notes
    -----
    Whatever the patterns say, tensors that are not 2-D (biases, norms, position ids), that are
    not float32/float16/bfloat16/float64, and names containing ``norm`` always pass through.
    """

    min_size: int = 4096
    min_dim: int = 16
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    compress_embeddings: bool = True
    overrides: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("min_size", "min_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "min_dim" else 0):
                raise ParameterError(
                    f"{name}={v!r} must be an integer ≥ {2 if name == 'min_dim' else 0}."
                )
        object.__setattr__(self, "include", _check_patterns("include", self.include))
        object.__setattr__(self, "exclude", _check_patterns("exclude", self.exclude))
        overrides = dict(self.overrides or {})
        _check_patterns("override", tuple(overrides))
        for pattern, spec in overrides.items():
            if spec in ("skip", None):
                continue
            if not isinstance(spec, Mapping):
                raise ParameterError(
                    f"override {pattern!r}: {spec!r} must be 'skip' or a dict of compress "
                    f"options ({', '.join(OVERRIDE_KEYS)})."
                )
            unknown = sorted(set(spec) - set(OVERRIDE_KEYS))
            if unknown:
                raise ParameterError(
                    f"override {pattern!r} has unknown option(s) {', '.join(unknown)}; use "
                    f"{', '.join(OVERRIDE_KEYS)}."
                )
            if spec.get("method") not in (None, *METHODS):
                raise ParameterError(
                    f"override {pattern!r}: method={spec['method']!r} is unknown; use one of "
                    f"{', '.join(METHODS)}."
                )
        object.__setattr__(self, "overrides", overrides)

    def override_for(self, name: str):
        """The override (``"skip"`` or a dict) of the first pattern matching ``name``."""
        for pattern, spec in self.overrides.items():
            if _matches(name, pattern):
                return "skip" if spec in ("skip", None) else dict(spec)
        return None

    def to_dict(self) -> dict:
        return {
            "min_size": self.min_size,
            "min_dim": self.min_dim,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "compress_embeddings": self.compress_embeddings,
            "overrides": dict(self.overrides),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorPolicy:
        d = dict(d)
        d["include"] = tuple(d.get("include", ()))
        d["exclude"] = tuple(d.get("exclude", ()))
        return cls(**d)


def classify(name: str, shape: Sequence[int], dtype: str, policy: TensorPolicy) -> tuple[bool, str]:
    """Whether tensor ``name`` is compressed under ``policy``, and why (a short reason).

    ``dtype`` is the safetensors dtype string (``F32``, ``BF16``, ``I64``, ...).
    """
    low = name.lower()
    if dtype not in COMPRESSIBLE_DTYPES:
        return False, f"dtype {dtype}"
    if len(shape) != 2:
        return False, f"{len(shape)}-D (bias, norm or buffer)"
    if "norm" in low:
        return False, "normalization weight"
    override = policy.override_for(name)
    if override == "skip":
        return False, "override: skip"
    if "embed" in low and not policy.compress_embeddings and override is None:
        return False, "embedding (compress_embeddings=False)"
    if min(shape) < policy.min_dim:
        return False, f"dimension below min_dim={policy.min_dim}"
    if math.prod(shape) < policy.min_size and override is None:
        return False, f"fewer than min_size={policy.min_size} entries"
    if policy.include and override is None and not any(_matches(name, p) for p in policy.include):
        return False, "not matched by include"
    if any(_matches(name, p) for p in policy.exclude) and override is None:
        return False, "matched by exclude"
    return True, "override" if override is not None else "2-D weight"


@dataclass(frozen=True)
class Candidate:
    """One configuration to measure on a tensor: the options of :func:`lplr_dask.compress`.

    ``key`` names it in the work directory (the same configuration has the same key in every
    plan, which is what lets one measurement serve several budgets and methods); it is made
    from the fields given, validated by :class:`~lplr_dask.core.params.CompressionOptions`.
    """

    key: str
    options: CompressionOptions

    @classmethod
    def of(cls, **fields) -> Candidate:
        return cls(_key(fields), CompressionOptions.of(None, **fields))

    def to_dict(self) -> dict:
        return {"key": self.key, "options": self.options.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping) -> Candidate:
        return cls(d["key"], CompressionOptions.from_dict(d["options"]))

    @classmethod
    def from_config(cls, config: CompressionConfig, shape) -> Candidate | None:
        """The candidate whose options, with ``config``'s seed, resolve to ``config`` on
        ``shape`` (a planner's point), or None when no options reproduce it (per-factor
        quantizer kinds that are not the defaults, say)."""
        group = next(
            (s.group_size for s in (config.right, config.matrix) if s is not None and s.group_size),
            None,
        )
        fields = {
            "method": config.method,
            "rank": config.rank,
            "bits_left": config.left.bits if config.left is not None else None,
            "bits_right": config.right.bits if config.right is not None else None,
            "bits_matrix": config.matrix.bits if config.matrix is not None else None,
            "group_size": group or 0,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        extra = {}
        if config.n_oversamples:
            extra["n_oversamples"] = config.n_oversamples
        kinds = {s.kind for s in (config.left, config.right, config.matrix) if s is not None}
        for quantizer in (None, *sorted(kinds)):
            for power in dict.fromkeys((None, config.n_power_iter)):
                kw = dict(extra)
                if quantizer is not None:
                    kw["quantizer"] = quantizer
                if power is not None:
                    kw["n_power_iter"] = power
                try:
                    opts = CompressionOptions.of(None, **fields, **kw)
                    # the seed is the tensor's (TensorEntry.seed), not the candidate's
                    seeded = replace(opts, seed=config.seed)
                    same = seeded.resolve(shape, block_shape=config.block_shape) == config
                except ParameterError:
                    continue
                if same:
                    return cls(_key({**fields, **kw}), opts)
        return None


def _fmt(b: float) -> str:
    return f"{float(b):g}"


def _key(kwargs: Mapping) -> str:
    method = kwargs["method"].replace("+", "_")
    parts = [method]
    for k, tag in (
        ("budget", "budget"),
        ("bits_matrix", "q"),
        ("rank", "r"),
        ("bits_left", "bl"),
        ("bits_right", "br"),
        ("group_size", "g"),
        ("n_power_iter", "p"),
        ("n_oversamples", "o"),
    ):
        if kwargs.get(k) is not None:
            parts.append(f"{tag}{_fmt(kwargs[k])}")
    if kwargs.get("quantizer") is not None:
        parts.append(f"k{kwargs['quantizer']}")
    return "-".join(parts)


def nq_bits_for_budget(shape, *, budget: float, group_size: int, seed: int = 0) -> int | None:
    """The largest ``nq`` bit width (1–8) whose exact bits per entry fit ``budget``, or None."""
    for bits in sorted(NQ_BITS, reverse=True):
        opts = CompressionOptions(method="nq", bits_matrix=bits, group_size=group_size, seed=seed)
        if opts.resolve(shape).bits_per_entry(shape) <= budget:
            return bits
    return None


def _cheapest_bits(method: str, shape, *, group_size: int, seed: int) -> float:
    """Bits per entry of the cheapest configuration ``compress(method=..., budget=...)`` can
    pick on ``shape`` (rank 1 at the fewest bits), to reject infeasible budgets up front."""
    kw = dict(group_size=group_size, seed=seed)
    if method == "nq":
        opts = CompressionOptions(method="nq", bits_matrix=1, **kw)
    elif method == "paper":
        opts = CompressionOptions(method="paper", rank=1, bits_left=8, bits_right=8, **kw)
    else:
        bm = 1 if method == "nq+lplr" else None
        opts = CompressionOptions(
            method=method, rank=1, bits_left=1, bits_right=1, bits_matrix=bm, **kw
        )
    return opts.resolve(shape).bits_per_entry(shape)


def method_candidate(
    method: str, shape, *, budget: float, group_size: int, seed: int
) -> Candidate | None:
    """The single-method configuration at ``budget`` (what ``compress(method=, budget=)`` does),
    or None when that method cannot fit the budget on this shape."""
    if method == "nq":
        bits = nq_bits_for_budget(shape, budget=budget, group_size=group_size, seed=seed)
        if bits is None:
            return None
        return Candidate.of(method="nq", bits_matrix=bits, group_size=group_size)
    if _cheapest_bits(method, shape, group_size=group_size, seed=seed) > budget:
        return None
    return Candidate.of(method=method, budget=float(budget), group_size=group_size)


def override_candidate(spec: Mapping, shape, *, budget: float, group_size: int) -> Candidate:
    """The candidate of a per-tensor override (a dict of compress options)."""
    kwargs = {k: v for k, v in spec.items() if v is not None}
    if "method" not in kwargs:
        raise ParameterError(
            f"override {dict(spec)!r} names no method; add method=nq|lplr|paper|nq+lplr|..."
        )
    kwargs.setdefault("group_size", group_size)
    if kwargs["method"] != "nq" and "rank" not in kwargs and "budget" not in kwargs:
        kwargs["budget"] = float(budget)
    if kwargs["method"] == "nq" and "bits_matrix" not in kwargs and "budget" not in kwargs:
        kwargs["budget"] = float(budget)
    return Candidate.of(**kwargs)


def candidate_set(
    shape,
    *,
    method: str,
    budget: float,
    candidate_budgets: Sequence[float] = DEFAULT_CANDIDATE_BUDGETS,
    group_size: int = 128,
    seed: int = 0,
) -> list[Candidate]:
    """The configurations measured on one tensor.

    For a single method: its configuration at ``budget``. For ``auto``: ``nq`` at 1–8 bits;
    ``lplr``, ``paper`` and ``nq+lplr`` at every budget of ``candidate_budgets`` ∪ {budget}
    (so every single method's choice at that budget is a candidate); ``lplr`` at ranks
    min(n, d)/16 and min(n, d)/8 with B = B′ = 4 (cheap points below 1 bit per entry, far
    better than 1-bit codes, whose symmetric levels ±max have no zero); and ``nq+lplr`` at
    three fixed points (B_nq ∈ {2, 3, 4}, rank min(n, d)/16, B = 4, B′ = 4). Fixed-rank points
    cost one compression each, no search. Configurations that cannot fit their budget on this
    shape are left out.
    """
    if method != AUTO:
        cand = method_candidate(method, shape, budget=budget, group_size=group_size, seed=seed)
        return [cand] if cand is not None else []
    out: dict[str, Candidate] = {}

    def add(c):
        if c is not None:
            out.setdefault(c.key, c)

    for bits in NQ_BITS:
        add(Candidate.of(method="nq", bits_matrix=bits, group_size=group_size))
    for b in sorted({float(budget), *(float(x) for x in candidate_budgets)}):
        for m in ("nq", "lplr", "paper", "nq+lplr"):
            add(method_candidate(m, shape, budget=b, group_size=group_size, seed=seed))
    rank = max(1, min(shape) // 16)
    for r in sorted({rank, max(1, min(shape) // 8)}):  # cheap low-rank points (< 1 bit)
        add(Candidate.of(method="lplr", rank=r, bits_left=4, bits_right=4, group_size=group_size))
    for bm in (2, 3, 4):
        add(
            Candidate.of(
                method="nq+lplr",
                bits_matrix=bm,
                rank=rank,
                bits_left=4,
                bits_right=4,
                group_size=group_size,
            )
        )
    return list(out.values())


def min_bits(method: str, shape, *, group_size: int, seed: int = 0) -> float:
    """Bits per entry of the cheapest candidate of ``method`` (``auto``: of any) on ``shape``."""
    methods = ("nq", "lplr", "paper", "nq+lplr") if method == AUTO else (method,)
    return min(_cheapest_bits(m, shape, group_size=group_size, seed=seed) for m in methods)


# ---------------------------------------------------------------------------- the allocation


def _frontier(points: Mapping[str, tuple[float, float]]) -> list[tuple[float, float, str]]:
    """Pareto frontier (bits ascending, error strictly descending) of {key: (bits, err)}."""
    pts = sorted((b, e, k) for k, (b, e) in points.items())
    out = []
    for b, e, k in pts:
        if not out or e < out[-1][1]:
            out.append((b, e, k))
    return out


def _total(curves, choice):
    bits = sum(curves[t][k][0] for t, k in choice.items())
    err = sum(curves[t][k][1] for t, k in choice.items())
    return bits, err


def allocate(
    curves: Mapping[str, Mapping[str, tuple[float, float]]],
    *,
    total_bits: float,
    baselines: Sequence[Mapping[str, str]] = (),
) -> dict[str, str]:
    """One candidate per tensor minimising the total error within ``total_bits``.

    Parameters
    ----------
    curves : mapping
        ``{tensor: {candidate_key: (bits, error)}}``: stored bits (8 × bytes) and error (any
        additive measure: the sum over tensors is minimised) of every measured candidate.
    total_bits : float
        The bits the tensors may use together.
    baselines : sequence of mappings
        Complete assignments ``{tensor: candidate_key}`` to compare with (the single methods
        at this budget): the answer is never worse than any feasible one of them.

    Returns
    -------
    dict
        ``{tensor: candidate_key}``.

    Raises
    ------
    ParameterError
        If even the cheapest candidates exceed ``total_bits``.
    """
    fronts = {t: _frontier(pts) for t, pts in curves.items() if pts}
    missing = sorted(set(curves) - set(fronts))
    if missing:
        raise ParameterError(f"no measured candidate for {', '.join(missing[:5])}.")
    cheapest = sum(f[0][0] for f in fronts.values())
    if cheapest > total_bits:
        raise ParameterError(
            f"the budget allows {total_bits:,.0f} bits but the cheapest candidates need "
            f"{cheapest:,.0f}; raise the budget."
        )

    def pick(lam):
        return {t: min(f, key=lambda p: p[1] + lam * p[0]) for t, f in fronts.items()}

    def bits_of(sel):
        return sum(p[0] for p in sel.values())

    # Bisection on λ (error per bit): λ = hi always fits, λ = lo may not.
    lo, hi = 0.0, 1.0
    while bits_of(pick(hi)) > total_bits:
        hi *= 4.0
        if hi > 1e300:
            break
    if bits_of(pick(lo)) <= total_bits:
        hi = lo
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if bits_of(pick(mid)) <= total_bits:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
    sel = pick(hi)
    # Greedy fill of the slack: the upgrade with the best error drop per extra bit first.
    slack = total_bits - bits_of(sel)
    while True:
        best = None
        for t, f in fronts.items():
            b0, e0, _ = sel[t]
            for p in f:
                db, de = p[0] - b0, e0 - p[1]
                if de > 0 and db <= slack:
                    score = de / db if db > 0 else math.inf
                    if best is None or score > best[0]:
                        best = (score, t, p)
        if best is None:
            break
        _, t, p = best
        slack -= p[0] - sel[t][0]
        sel[t] = p
    choice = {t: p[2] for t, p in sel.items()}
    _, err = _total(curves, choice)
    for base in baselines:
        if set(base) != set(curves) or any(k not in curves[t] for t, k in base.items()):
            continue
        b_bits, b_err = _total(curves, base)
        if b_bits <= total_bits and b_err < err:
            choice, err = dict(base), b_err
    return choice
