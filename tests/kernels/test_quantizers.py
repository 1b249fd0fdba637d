"""The quantizer family (issue 11): kinds, codebooks, clipping, scale precision, storage.

Kernel tests run on small seeded blocks; the storage and determinism tests compress real Zarr
stores with real Dask (threaded scheduler, and one LocalCluster test marked slow).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import group_digest, known_spectrum, write_zarr

from lplr_dask import compress
from lplr_dask.core.params import CompressionOptions
from lplr_dask.errors import ParameterError
from lplr_dask.kernels.codebooks import NF4, block_histogram, fit_lloyd, normal_levels
from lplr_dask.kernels.quantize import (
    CLIP_FACTORS,
    QUANTIZERS,
    QuantizerSpec,
    block_range,
    clip_errors,
    dequantize,
    entry_histogram,
    merge_stats,
    pick_clipped,
    quantize,
    quantizer_spec,
    range_stats,
    stats_ranges,
)
from lplr_dask.storage.format import bytes_on_disk, read_metadata

BITS = range(1, 9)
GRANS = [("group", 16), ("column", None), ("row", None), ("tensor", None)]


def outlier_block(seed, shape=(24, 80)):
    """Gaussian entries, a few heavy-tailed spikes, one scaled column, one all-zero row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    spikes = rng.choice(x.size, size=max(1, x.size // 50), replace=False)
    x.reshape(-1)[spikes] += 20 * rng.standard_t(2.0, size=spikes.size)
    x[:, rng.integers(shape[1])] *= 30
    x[rng.integers(shape[0])] = 0.0
    return x.astype(np.float32)


def group_sse(x, y, spec):
    """Per-group squared error in float64 (the groups of ``spec``)."""
    e2 = (x.astype(np.float64) - y.astype(np.float64)) ** 2
    rows, cols = x.shape
    if spec.granularity == "tensor":
        return e2.sum(keepdims=True)
    if spec.granularity == "column":
        return e2.sum(axis=0, keepdims=True)
    if spec.granularity == "row":
        return e2.sum(axis=1, keepdims=True)
    g = spec.group_size
    n_groups = -(-cols // g)
    pad = np.zeros((rows, n_groups * g - cols))
    return np.concatenate([e2, pad], axis=1).reshape(rows, n_groups, g).sum(axis=2)


def roundtrip(x, spec, rng=None):
    lo, hi = block_range(x, spec=spec)
    book = None
    if spec.stores_codebook:
        book = fit_lloyd(entry_histogram(x, hi, spec=spec), spec.bits)
    codes = quantize(x, lo, hi, spec=spec, rng=rng, codebook=book)
    return codes, dequantize(codes, lo, hi, spec=spec, codebook=book, dtype=np.float64), lo, hi


# ----------------------------------------------------------------------------- codebooks


def test_nf4_table_is_reproduced_bit_for_bit():
    assert normal_levels(4).tolist() == np.array(NF4, dtype=np.float32).tolist()


@pytest.mark.parametrize("bits", BITS)
def test_normal_levels_every_width(bits):
    c = normal_levels(bits)
    assert c.shape == (2**bits,) and c.dtype == np.float32
    assert np.all(np.diff(c) > 0), "levels sorted and distinct"
    assert c[-1] == 1.0 and 0.0 in c
    assert c[0] == (0.0 if bits == 1 else -1.0)
    # Quantiles of N(0, 1): the positive half is denser near 0 than near the top.
    pos = c[c > 0]
    if pos.size > 2:
        assert np.diff(pos)[0] < np.diff(pos)[-1]


def test_lloyd_fit_matches_the_gaussian_lloyd_max_quantizer():
    # Lloyd–Max 2-level quantizer of N(0, 1): ±sqrt(2/π) ≈ ±0.7979 (here with a level
    # pinned at 0, so 2 bits: {-a, 0, b, c}); check the 1-bit fit of a half-normal instead:
    # levels {0, E[x | x > mid]}. A deterministic fit from an exact histogram.
    rng = np.random.default_rng(0)
    t = np.abs(rng.standard_normal(200_000)) / 5.0
    h = block_histogram(np.clip(t, 0, 1))
    book = fit_lloyd(h, 1)
    assert book[0] == 0.0 and 0.1 < book[1] < 0.3
    assert np.array_equal(book, fit_lloyd(h, 1)), "deterministic"
    # Partial histograms add up to the whole one (the blocks' merge).
    parts = block_histogram(np.clip(t[:70_000], 0, 1)) + block_histogram(np.clip(t[70_000:], 0, 1))
    assert np.array_equal(parts, h)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize(("granularity", "group_size"), GRANS)
@pytest.mark.parametrize("bits", BITS)
def test_every_kind_roundtrips_at_every_width(name, bits, granularity, group_size):
    if name == "sign" and bits != 1:
        pytest.skip("sign is a 1-bit code")
    spec = quantizer_spec(name, bits=bits, granularity=granularity, group_size=group_size)
    x = outlier_block(bits)
    codes, y, lo, hi = roundtrip(x, spec)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    assert int(codes.max()) < 2**bits
    if spec.kind in ("minmax", "clipped"):
        # The grid lo..hi with 2^B levels: half a step inside, the nearest end outside.
        from lplr_dask.kernels.quantize import expand_range

        lo_e = np.broadcast_to(expand_range(lo, x.shape, spec=spec), x.shape).astype(np.float64)
        hi_e = np.broadcast_to(expand_range(hi, x.shape, spec=spec), x.shape).astype(np.float64)
        step = (hi_e - lo_e) / (2**bits - 1)
        inside = (x >= lo_e) & (x <= hi_e)
        bound = np.where(inside, step / 2, np.maximum(lo_e - x, x - hi_e))
        assert np.all(np.abs(x - y) <= bound * (1 + 1e-6) + 1e-6 * np.abs(x) + 1e-30)
    else:
        # Codebook kinds: each entry goes to the nearest level of scale · codebook.
        from lplr_dask.kernels.quantize import codebook_levels, expand_range

        book = None
        if spec.stores_codebook:
            book = fit_lloyd(entry_histogram(x, hi, spec=spec), bits)
        levels = codebook_levels(spec, book).astype(np.float64)
        s = np.broadcast_to(expand_range(hi, x.shape, spec=spec), x.shape).astype(np.float64)
        best = np.min(np.abs(x[..., None] - s[..., None] * levels), axis=-1)
        assert np.all(np.abs(x - y) <= best + 1e-6 * np.maximum(np.abs(x), s) + 1e-30)


@pytest.mark.parametrize("name", ["normal", "lloyd", "sign", "clipped", "uniform"])
def test_stochastic_rounding_is_unbiased_inside_the_range(name):
    bits = 1 if name == "sign" else 2
    spec = quantizer_spec(
        name, bits=bits, granularity="group", group_size=16, rounding="stochastic"
    )
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, size=(4, 32)).astype(np.float32)
    x[:, 0], x[:, 16] = 1.0, -1.0  # full range in every group
    lo, hi = block_range(x, spec=spec)
    book = fit_lloyd(entry_histogram(x, hi, spec=spec), bits) if spec.stores_codebook else None
    n = 4000
    mean = np.zeros(x.shape)
    for k in range(n):
        c = quantize(x, lo, hi, spec=spec, rng=np.random.default_rng(k), codebook=book)
        mean += dequantize(c, lo, hi, spec=spec, codebook=book, dtype=np.float64)
    mean /= n
    from lplr_dask.kernels.quantize import expand_range

    if spec.kind in ("minmax", "clipped"):
        lo_e = np.broadcast_to(expand_range(lo, x.shape, spec=spec), x.shape)
        hi_e = np.broadcast_to(expand_range(hi, x.shape, spec=spec), x.shape)
    else:
        from lplr_dask.kernels.quantize import codebook_levels

        levels = codebook_levels(spec, book)
        s = np.broadcast_to(expand_range(hi, x.shape, spec=spec), x.shape)
        lo_e, hi_e = s * levels.min(), s * levels.max()
    inside = (x > lo_e) & (x < hi_e)
    # Each mean has standard deviation ≤ gap/2/sqrt(n) ≤ 2/2/63 ≈ 0.016 (gap ≤ 2 for entries in
    # [-1, 1]); 5 sigma over 128 entries keeps false failures below 1e-4.
    assert inside.sum() > 32
    assert np.max(np.abs(mean - x)[inside]) < 5 * 1.0 / np.sqrt(n)


# ----------------------------------------------------------------------------- guarantees


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("granularity", "group_size"), GRANS)
def test_clipping_never_increases_a_groups_error(
    seed, symmetric, scale_dtype, granularity, group_size
):
    """Property over many random groups with outliers, every width: the clipped range's error
    is at most the min–max range's (same scale precision), group by group, and at most the
    error of storing zeros (the shrink factor 0)."""
    x = outlier_block(100 + seed)
    for bits in BITS:
        kw = dict(bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric)
        mm = QuantizerSpec(**kw, scale_dtype=scale_dtype)
        cl = QuantizerSpec(**kw, scale_dtype=scale_dtype, kind="clipped")
        e_mm = group_sse(x, roundtrip(x, mm)[1], mm)
        e_cl = group_sse(x, roundtrip(x, cl)[1], cl)
        e_zero = group_sse(x, np.zeros_like(x), cl)
        assert np.all(e_cl <= e_mm), (bits, np.max(e_cl - e_mm))
        # The zero candidate is scored in float32: within its relative accuracy of zeros.
        assert np.all(e_cl <= e_zero * (1 + 1e-4) + 1e-30), bits
        if bits <= 3 and granularity != "tensor":  # with these outliers, clipping helps
            assert np.any(e_cl < e_mm), bits


def test_clipped_search_over_blocks_equals_the_search_on_the_whole():
    """Groups that span blocks (columns over row blocks): min–max merged, per-candidate errors
    summed over blocks, then picked, gives the same ranges as one block holding everything."""
    x = outlier_block(7, (90, 40))
    spec = QuantizerSpec(bits=3, granularity="column", symmetric=False, kind="clipped")
    whole = block_range(x, spec=spec)
    parts = [x[:30], x[30:55], x[55:]]
    stats = range_stats(parts[0], spec=spec)
    for p in parts[1:]:
        stats = merge_stats(stats, range_stats(p, spec=spec), spec=spec)
    lo, hi = stats_ranges(stats, spec=spec)
    errors = sum(clip_errors(p, lo, hi, spec=spec) for p in parts)
    assert errors.shape == (len(CLIP_FACTORS), 1, 40)
    lo2, hi2 = pick_clipped(lo, hi, errors, spec=spec)
    np.testing.assert_array_equal(lo2, whole[0])
    np.testing.assert_array_equal(hi2, whole[1])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("name", ["clipped", "normal", "lloyd", "sign"])
def test_one_bit_codes_never_worse_than_zeros(name, seed):
    """Every 1-bit kind except the reference minmax grid (whose two levels ±max|x| have no
    zero: it is what ``sign`` and ``clipped`` replace) stores no group worse than zeros."""
    x = outlier_block(200 + seed, (16, 64))
    x[3, :16] = 0.0
    x[5, 16:32] = 1e-3
    x[5, 20] = 50.0  # one outlier among tiny values: ±max would be far worse than zeros
    for gran, gs in GRANS:
        spec = quantizer_spec(name, bits=1, granularity=gran, group_size=gs)
        e = group_sse(x, roundtrip(x, spec)[1], spec)
        e0 = group_sse(x, np.zeros_like(x), spec)
        slack = 1e-4 if name == "clipped" else 1e-9  # clipped: float32 scoring of the 0 range
        assert np.all(e <= e0 * (1 + slack) + 1e-30), (gran, np.max(e - e0))


def test_minmax_one_bit_is_the_reference_grid_and_can_be_worse_than_zeros():
    x = np.full((1, 16), 1e-3, dtype=np.float32)
    x[0, 0] = 50.0
    spec = QuantizerSpec(bits=1, granularity="row")
    y = roundtrip(x, spec)[1]
    assert np.sum((x - y) ** 2) > np.sum(x.astype(np.float64) ** 2)
    z = roundtrip(x, quantizer_spec("sign", bits=1, granularity="row"))[1]
    assert np.sum((x - z) ** 2) <= np.sum(x.astype(np.float64) ** 2)


def test_sign_is_sign_times_mean_abs():
    x = np.array([[1.0, -3.0, 0.5, -0.5, 0.0, 2.0, -1.0, 4.0]], dtype=np.float32)
    spec = QuantizerSpec(bits=1, granularity="row", kind="sign")
    y = roundtrip(x, spec)[1]
    m = np.mean(np.abs(x))
    np.testing.assert_allclose(
        y, np.where(x >= 0, m, -m)[None] if y.ndim == 1 else np.where(x >= 0, m, -m)
    )


# ----------------------------------------------------------------------------- scales


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_sixteen_bit_scales_round_outward_and_are_representable(scale_dtype):
    x = outlier_block(3) * np.float32(1.2345)
    spec = QuantizerSpec(
        bits=4, granularity="group", group_size=16, symmetric=False, scale_dtype=scale_dtype
    )
    lo, hi = block_range(x, spec=spec)
    ref = QuantizerSpec(bits=4, granularity="group", group_size=16, symmetric=False)
    lo32, hi32 = block_range(x, spec=ref)
    assert np.all(lo <= lo32) and np.all(hi >= hi32)
    from lplr_dask.kernels.quantize import scales_for_storage, scales_from_storage

    np.testing.assert_array_equal(scales_from_storage(scales_for_storage(hi, spec), spec), hi)
    np.testing.assert_array_equal(scales_from_storage(scales_for_storage(lo, spec), spec), lo)


def test_float16_scales_refuse_ranges_beyond_their_maximum():
    x = np.full((2, 16), 1e6, dtype=np.float32)
    spec = QuantizerSpec(bits=4, granularity="row", scale_dtype="float16")
    with pytest.raises(ParameterError, match="float16"):
        block_range(x, spec=spec)
    bf = QuantizerSpec(bits=4, granularity="row", scale_dtype="bfloat16")
    _, hi = block_range(x, spec=bf)
    assert np.all(hi >= 1e6)


# ----------------------------------------------------------------------------- spec


def test_spec_dicts_of_earlier_versions_give_todays_minmax():
    old = {
        "bits": 4,
        "granularity": "group",
        "group_size": 128,
        "symmetric": True,
        "rounding": "nearest",
        "float_format": "float16",
    }
    spec = QuantizerSpec.from_dict(old)
    assert spec.kind == "minmax" and spec.scale_dtype == "float32"
    assert spec.to_dict() == old, "min–max specs keep their attributes of earlier versions"
    new = quantizer_spec("lloyd", bits=3, granularity="column")
    assert QuantizerSpec.from_dict(new.to_dict()) == new
    assert new.to_dict()["kind"] == "lloyd" and new.to_dict()["scale_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(kind="sign", bits=4), "1-bit"),
        (dict(kind="normal", symmetric=False), "zero"),
        (dict(kind="nf4"), "not a quantizer kind"),
        (dict(scale_dtype="float8"), "scale_dtype"),
        (dict(bits=16, kind="normal"), "16"),
    ],
)
def test_spec_validation(kwargs, needle):
    with pytest.raises(ParameterError, match=needle):
        QuantizerSpec(**kwargs)


def test_nbytes_counts_scales_at_their_precision_and_the_codebook():
    shape = (10, 256)
    mm = QuantizerSpec(bits=3, granularity="group", group_size=128)
    assert mm.nbytes(shape) == 10 * 96 + 4 * 20
    cl = quantizer_spec("clipped", bits=3, granularity="group", group_size=128)
    assert cl.nbytes(shape) == 10 * 96 + 2 * 2 * 20
    nf = quantizer_spec("normal", bits=3, granularity="group", group_size=128)
    assert nf.nbytes(shape) == 10 * 96 + 2 * 20
    ll = quantizer_spec("lloyd", bits=3, granularity="group", group_size=128)
    assert ll.nbytes(shape) == 10 * 96 + 2 * 20 + 4 * 8


def test_options_validate_the_quantizer():
    with pytest.raises(ParameterError, match="unknown"):
        CompressionOptions(rank=4, quantizer="nf4")
    with pytest.raises(ParameterError, match="paper"):
        CompressionOptions(method="paper", rank=4, quantizer="normal")
    with pytest.raises(ParameterError, match="1-bit"):
        CompressionOptions(rank=4, quantizer="sign").resolve((64, 64))
    cfg = CompressionOptions(rank=4, quantizer="sign", bits_left=1, bits_right=1).resolve((64, 64))
    assert cfg.left.kind == cfg.right.kind == "sign"
    paper = CompressionOptions(method="paper", rank=4).resolve((64, 64))
    assert paper.left == QuantizerSpec.paper(8) and paper.right == QuantizerSpec.paper(8)


def test_default_quantizers_per_factor_and_width():
    shape = (64, 64)
    cfg = CompressionOptions(rank=4, bits_left=4, bits_right=3).resolve(shape)
    assert (cfg.left.kind, cfg.right.kind) == ("lloyd", "lloyd")
    assert cfg.left.scale_dtype == cfg.right.scale_dtype == "bfloat16"
    one = CompressionOptions(rank=4, bits_left=1, bits_right=1).resolve(shape)
    assert (one.left.kind, one.right.kind) == ("clipped", "clipped")
    mixed = CompressionOptions(method="nq+lplr", rank=4, bits_matrix=2).resolve(shape)
    assert (mixed.matrix.kind, mixed.left.kind) == ("normal", "lloyd")
    single = CompressionOptions(rank=4, passes=1).resolve(shape)
    assert (single.left.kind, single.right.kind) == ("lloyd", "normal")
    nq = CompressionOptions(method="nq", bits_matrix=3).resolve(shape)
    assert nq.matrix.kind == "lloyd"
    assert CompressionOptions(rank=4, quantizer="minmax").resolve(shape).left == QuantizerSpec(
        bits=8, granularity="column"
    )


# ----------------------------------------------------------------------------- storage


@pytest.fixture(scope="module")
def outliers_zarr(tmp_path_factory):
    a = known_spectrum(300, 256, 10.0 * 0.8 ** np.arange(40), noise=0.01, seed=4)
    a[::37, 5] *= 40.0  # outliers
    return write_zarr(tmp_path_factory.mktemp("q") / "a.zarr", a, (100, 128))


CASES = [
    ("lplr", dict(rank=12, bits_left=3, bits_right=4)),
    ("lplr", dict(rank=12, bits_left=2, bits_right=2, group_size=0)),
    ("nq", dict(bits_matrix=3)),
    ("nq", dict(bits_matrix=2, group_size=0)),
    ("nq+lplr", dict(rank=6, bits_left=3, bits_right=3, bits_matrix=2)),
    ("dsvd", dict(rank=8, bits_left=4, bits_right=4)),
]


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize(
    ("method", "kw"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)]
)
def test_bytes_on_disk_equal_the_accounting(tmp_path, outliers_zarr, name, method, kw):
    import dask

    if name == "sign":
        kw = {**kw, **{k: 1 for k in ("bits_left", "bits_right", "bits_matrix") if k in kw}}
    if name == "lloyd" and method == "nq+lplr":
        with pytest.raises(ParameterError, match="lloyd"):
            CompressionOptions(method=method, quantizer=name, **kw)
        return
    out = tmp_path / "out"
    with dask.config.set(scheduler="threads"):
        res = compress(outliers_zarr, str(out), method=method, quantizer=name, **kw)
    disk = bytes_on_disk(out)
    opts = CompressionOptions(method=method, quantizer=name, **kw)
    assert disk["arrays"] == res.stored_bytes == opts.resolve((300, 256)).nbytes((300, 256))
    meta = read_metadata(out)
    for spec in meta["factors"].values():
        assert QuantizerSpec.from_dict(spec).kind == {"uniform": "minmax"}.get(name, name)
    assert np.isfinite(res.rel_fro_error) and res.rel_fro_error > 0
    if method == "nq" and name in ("clipped", "normal", "lloyd", "sign"):
        assert res.rel_fro_error <= 1.0 + 1e-4  # no group worse than zeros


def test_default_quantizers_are_not_worse_than_minmax(tmp_path, outliers_zarr):
    import dask

    with dask.config.set(scheduler="threads"):
        for method, kw in CASES[:1] + CASES[2:3]:
            src = outliers_zarr
            d = compress(src, str(tmp_path / f"d-{method}"), method=method, **kw)
            m = compress(
                src, str(tmp_path / f"m-{method}"), method=method, quantizer="minmax", **kw
            )
            # bfloat16 scales save bits; a lloyd codebook (2^B float32 per factor) costs a few
            # hundred bytes, which can outweigh the saving on a matrix this small.
            books = sum(4 * 2**b for b in (d.bits_left, d.bits_right, d.bits_matrix) if b)
            assert d.bits_per_entry <= m.bits_per_entry + 8 * books / (300 * 256)
            assert d.rel_fro_error < m.rel_fro_error


def _digest(src, out, **kw):
    compress(src, str(out), **kw)
    return group_digest(out)


@pytest.mark.slow
def test_codes_identical_across_tilings_and_worker_counts(tmp_path, outliers_zarr, cluster):
    """Every kind that needs a reduction over blocks (clipped column ranges of L, lloyd
    codebooks, sign means over rows of R) gives byte-identical codes for two storage tilings of
    A, on the threaded scheduler and on two worker processes."""
    import dask
    import zarr
    from distributed import Client

    a = np.asarray(zarr.open_array(outliers_zarr)[:])
    other = write_zarr(tmp_path / "b.zarr", a, (64, 96))
    cases = [
        dict(
            method="lplr",
            rank=10,
            bits_left=3,
            bits_right=3,
            quantizer="clipped",
            rounding="stochastic",
            group_size=0,
        ),
        dict(method="lplr", rank=10, bits_left=2, bits_right=3, quantizer="lloyd"),
        dict(method="lplr", rank=10, bits_left=1, bits_right=1, quantizer="sign", group_size=0),
        dict(method="nq", bits_matrix=2, quantizer="clipped", group_size=0),
        dict(method="nq", bits_matrix=3, quantizer="lloyd"),
        dict(method="nq", bits_matrix=3, quantizer="normal", rounding="stochastic"),
    ]
    block = dict(block_shape=(100, 128))
    with dask.config.set(scheduler="threads"):
        one = [
            _digest(outliers_zarr, tmp_path / f"t{i}", **kw, **block) for i, kw in enumerate(cases)
        ]
        two = [_digest(other, tmp_path / f"u{i}", **kw, **block) for i, kw in enumerate(cases)]
    with Client(cluster):
        on_two = [
            _digest(outliers_zarr, tmp_path / f"c{i}", **kw, **block) for i, kw in enumerate(cases)
        ]
    for kw, x, y, z in zip(cases, one, two, on_two, strict=True):
        assert x == y == z, kw
        assert len(x) > 3
