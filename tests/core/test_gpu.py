"""CuPy kernels and CuPy-backed compressions give the CPU's codes (needs a CUDA device).

Every quantizer kind is checked at every width against NumPy on the same block: the codes,
the packed bytes, the ranges, the fitted codebook and the dequantized values. Compressions of
a CuPy-backed input, one per method and the planner, agree with the CPU's to GEMM rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import group_digest, write_zarr

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except cupy.cuda.runtime.CUDARuntimeError:
    pytest.skip("no CUDA device", allow_module_level=True)

from lplr_dask import QuantizerSpec, compress  # noqa: E402
from lplr_dask.kernels.codebooks import fit_lloyd  # noqa: E402
from lplr_dask.kernels.packing import pack_codes, unpack_codes  # noqa: E402
from lplr_dask.kernels.quantize import (  # noqa: E402
    QUANTIZERS,
    block_range,
    dequantize,
    entry_histogram,
    quantize,
    quantizer_spec,
)
from lplr_dask.storage.reader import open_compressed  # noqa: E402

GRANULARITIES = ["tensor", "column", "group"]
KIND_WIDTHS = [(q, b) for q in QUANTIZERS for b in range(1, 9) if q != "sign" or b == 1]


def _spec(name, bits, granularity, rounding="nearest"):
    return quantizer_spec(
        name,
        bits=bits,
        granularity=granularity,
        group_size=32 if granularity == "group" else None,
        rounding=rounding,
    )


def _same_on_both(x, spec, *, rounding_seed=None):
    """Quantize ``x`` with NumPy and with CuPy; assert every output is identical."""
    xg = cupy.asarray(x)
    lo, hi = block_range(x, spec=spec)
    lo_g, hi_g = block_range(xg, spec=spec)
    np.testing.assert_array_equal(lo_g.get(), lo)
    np.testing.assert_array_equal(hi_g.get(), hi)
    book = None
    if spec.stores_codebook:
        book = fit_lloyd(entry_histogram(x, hi, spec=spec), spec.bits)
        # The histogram's weighted sums run in another order on the GPU (last-bit
        # differences); the fitted float32 levels must still agree to float32 rounding.
        book_g = fit_lloyd(entry_histogram(xg, hi_g, spec=spec).get(), spec.bits)
        np.testing.assert_allclose(book_g, book, rtol=1e-6, atol=1e-7)

    def rng():
        return None if rounding_seed is None else np.random.default_rng(rounding_seed)

    codes = quantize(x, lo, hi, spec=spec, codebook=book, rng=rng())
    codes_g = quantize(xg, lo_g, hi_g, spec=spec, codebook=book, rng=rng())
    np.testing.assert_array_equal(codes_g.get(), codes)
    cols = x.shape[1]
    packed = pack_codes(codes, spec.bits)
    np.testing.assert_array_equal(pack_codes(codes_g, spec.bits).get(), packed)
    np.testing.assert_array_equal(unpack_codes(cupy.asarray(packed), spec.bits, cols).get(), codes)
    np.testing.assert_array_equal(
        dequantize(codes_g, lo_g, hi_g, spec=spec, codebook=book).get(),
        dequantize(codes, lo, hi, spec=spec, codebook=book),
    )


@pytest.mark.parametrize("name,bits", KIND_WIDTHS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_every_kind_on_cupy_equals_numpy(name, bits, granularity):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((64, 100)).astype(np.float32)  # 100: a partial last group
    _same_on_both(x, _spec(name, bits, granularity))


@pytest.mark.parametrize("name,bits", [kw for kw in KIND_WIDTHS if kw[1] in (1, 2, 4)])
def test_stochastic_rounding_on_cupy_equals_numpy(name, bits):
    """The dither is drawn on the host: the same stream gives the same codes on both."""
    x = np.random.default_rng(7).standard_t(4, (48, 96)).astype(np.float32)
    _same_on_both(x, _spec(name, bits, "group", "stochastic"), rounding_seed=11)


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_16_bit_scales_on_cupy_equal_numpy(scale_dtype, bits):
    """Ranges rounded outward to float16 / bfloat16 on the GPU as on the CPU."""
    x = np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32)
    spec = QuantizerSpec(bits=bits, granularity="column", scale_dtype=scale_dtype)
    _same_on_both(x, spec)


def _gpu(a, chunks=(256, 128)):
    import dask.array as da

    cpu = da.from_array(a, chunks=chunks)
    return cpu, cpu.map_blocks(cupy.asarray, meta=cupy.empty((0, 0), dtype=a.dtype))


def _codes(group, name: str) -> np.ndarray:
    """The unpacked integer codes of factor ``name`` of a compressed group (uint8)."""
    import zarr

    cm = open_compressed(group)
    bits = cm.meta["factors"][name]["bits"]
    cols = cm.factor(name).shape[1]
    packed = zarr.open_array(str(group / name / "codes"), mode="r")[...]
    return unpack_codes(packed, bits, cols)


def _assert_close_outputs(cpu_path, gpu_path, factors):
    """Same stored arrays and quantizers; the codes differ in at most 0.1 % of the entries,
    by one level: where cuBLAS and OpenBLAS round a value onto the other side of a level
    boundary (the random streams are drawn on the host, so nothing else differs). A fitted
    codebook and a scale can differ in their last bits for the same reason, so the decoded
    values are not compared bit for bit."""
    a, b = open_compressed(cpu_path), open_compressed(gpu_path)
    assert group_digest(cpu_path).keys() == group_digest(gpu_path).keys()
    assert a.meta["factors"] == b.meta["factors"]
    for name in factors:
        if a.meta["factors"][name]["bits"] == 16:
            continue
        c_cpu, c_gpu = _codes(cpu_path, name), _codes(gpu_path, name)
        diff = np.abs(c_cpu.astype(np.int16) - c_gpu.astype(np.int16))
        assert diff.max() <= 1, name
        assert np.count_nonzero(diff) <= 1e-3 * diff.size, name


CASES = {
    "lplr-verify": (dict(rank=16, bits_left=4, bits_right=4, verify=True), ("L", "R")),
    "lplr-2bit-clipped": (
        dict(rank=16, bits_left=2, bits_right=2, quantizer="clipped"),
        ("L", "R"),
    ),
    "lplr-sign": (dict(rank=16, bits_left=1, bits_right=1, quantizer="sign"), ("L", "R")),
    "nq": (dict(method="nq", bits_matrix=3), ("Q",)),
    "nq-normal": (dict(method="nq", bits_matrix=4, quantizer="normal"), ("Q",)),
    "nq+lplr": (dict(method="nq+lplr", rank=8, bits_left=4, bits_right=4, bits_matrix=3), "LRQ"),
    "dsvd": (dict(method="dsvd", rank=16, bits_left=4, bits_right=4), ("L", "R")),
    "lplr-svd": (dict(method="lplr-svd", rank=16, bits_left=4, bits_right=4), ("L", "R")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cupy_backed_compression_matches_numpy(tmp_path, decaying, case):
    kw, factors = CASES[case]
    cpu, gpu = _gpu(decaying)
    kw = dict(kw, block_shape=(256, 128))
    r_cpu = compress(cpu, tmp_path / "cpu.zarr", **kw)
    r_gpu = compress(gpu, tmp_path / "gpu.zarr", **kw)
    assert r_gpu.rel_fro_error == pytest.approx(r_cpu.rel_fro_error, rel=1e-3)
    assert r_gpu.bits_per_entry == r_cpu.bits_per_entry
    _assert_close_outputs(tmp_path / "cpu.zarr", tmp_path / "gpu.zarr", factors)


@pytest.mark.parametrize("method", ["lplr", "auto"])
def test_cupy_backed_budget_plans_as_numpy(tmp_path, decaying, method):
    """The planner on CuPy blocks makes the CPU's choice (method, rank, widths, kinds)."""
    cpu, gpu = _gpu(decaying)
    kw = dict(method=method, budget=2.0, block_shape=(256, 128))
    r_cpu = compress(cpu, tmp_path / "cpu.zarr", **kw)
    r_gpu = compress(gpu, tmp_path / "gpu.zarr", **kw)
    for key in ("method", "rank", "bits_left", "bits_right", "bits_matrix"):
        assert getattr(r_gpu, key) == getattr(r_cpu, key), key
    assert r_gpu.plan["quantizers"] == r_cpu.plan["quantizers"]
    # The chosen point (rank 100 at 8 bits, error 0.0073) is sensitive: on the CPU, scaling
    # A's entries by 1 + 1e-7·N(0, 1) moved its error by 0.9 % (auto) and 0.12 % (lplr).
    assert r_gpu.rel_fro_error == pytest.approx(r_cpu.rel_fro_error, rel=2e-2)


def test_device_gpu_computes_a_zarr_input_on_the_gpu(tmp_path, decaying):
    """``device="gpu"`` reads a Zarr input's tiles into CuPy blocks (the job's matrix is
    CuPy-backed) and gives the CPU's result to GEMM rounding."""
    from dask.array.utils import meta_from_array

    from lplr_dask import CompressionJob, CompressionOptions

    src = write_zarr(tmp_path / "A.zarr", decaying, (300, 256))
    # 4 bits, as the other cases: at 8 bits a fitted codebook's level boundaries are finer
    # than GEMM rounding (on the H200 1.1 % of R's codes moved by one level; on the CPU,
    # scaling A's entries by 1 + 1e-7·N(0, 1) moves 0.4 %).
    opts = CompressionOptions(rank=16, bits_left=4, bits_right=4, block_shape=(256, 128))
    job = CompressionJob.create(src, tmp_path / "probe.zarr", opts, device="gpu")
    assert isinstance(meta_from_array(job.matrix.data), cupy.ndarray)
    r_cpu = compress(src, tmp_path / "cpu.zarr", opts)
    r_gpu = compress(src, tmp_path / "gpu.zarr", opts, device="gpu")
    assert r_gpu.rel_fro_error == pytest.approx(r_cpu.rel_fro_error, rel=1e-3)
    _assert_close_outputs(tmp_path / "cpu.zarr", tmp_path / "gpu.zarr", ("L", "R"))


def test_cli_on_a_local_cuda_cluster(tmp_path, capsys, decaying):
    """``lplr compress --cluster cuda``: a dask-cuda LocalCUDACluster, tiles on the GPU."""
    pytest.importorskip("dask_cuda")
    import json

    from lplr_dask.cli.main import main

    src = write_zarr(tmp_path / "A.zarr", decaying, (300, 256))
    args = ["compress", src, str(tmp_path / "c.zarr"), "--rank", "16", "--json"]
    assert main([*args, "--cluster", "cuda", "--no-progress"]) == 0
    gpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r_cpu = compress(src, tmp_path / "cpu.zarr", rank=16)
    assert gpu["rel_fro_error"] == pytest.approx(r_cpu.rel_fro_error, rel=1e-3)
