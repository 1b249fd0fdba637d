"""CuPy kernels and a CuPy-backed compression give the CPU's codes (needs a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import group_digest

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except cupy.cuda.runtime.CUDARuntimeError:
    pytest.skip("no CUDA device", allow_module_level=True)

from lplr_dask import QuantizerSpec, compress  # noqa: E402
from lplr_dask.kernels.packing import pack_codes, unpack_codes  # noqa: E402
from lplr_dask.kernels.quantize import block_range, dequantize, quantize  # noqa: E402


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity", ["tensor", "column", "group"])
def test_kernels_on_cupy_equal_numpy(bits, granularity):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    spec = QuantizerSpec(
        bits=bits, granularity=granularity, group_size=32 if granularity == "group" else None
    )
    lo, hi = block_range(x, spec=spec)
    codes = quantize(x, lo, hi, spec=spec)
    xg = cupy.asarray(x)
    lo_g, hi_g = block_range(xg, spec=spec)
    codes_g = quantize(xg, lo_g, hi_g, spec=spec)
    np.testing.assert_array_equal(codes_g.get(), codes)
    np.testing.assert_array_equal(pack_codes(codes_g, bits).get(), pack_codes(codes, bits))
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes_g, bits), bits, 96).get(), codes)
    np.testing.assert_array_equal(
        dequantize(codes_g, lo_g, hi_g, spec=spec).get(), dequantize(codes, lo, hi, spec=spec)
    )


def test_cupy_backed_compression_matches_numpy(tmp_path, decaying):
    import dask.array as da

    cpu = da.from_array(decaying, chunks=(256, 128))
    gpu = cpu.map_blocks(cupy.asarray, meta=cupy.empty((0, 0), dtype=np.float32))
    kw = dict(rank=16, bits_left=4, bits_right=4, block_shape=(256, 128))
    r_cpu = compress(cpu, tmp_path / "cpu.zarr", **kw)
    r_gpu = compress(gpu, tmp_path / "gpu.zarr", **kw)
    assert r_gpu.rel_fro_error == pytest.approx(r_cpu.rel_fro_error, rel=1e-3)
    # Same seed and blocks: the random streams are drawn on the host, so the codes agree except
    # where cuBLAS and OpenBLAS round a value onto the other side of a level boundary: at most
    # 0.1 % of the codes of each factor, and those by one level.
    a, b = group_digest(tmp_path / "cpu.zarr"), group_digest(tmp_path / "gpu.zarr")
    assert a.keys() == b.keys()
    for name, cols in (("L", 16), ("R", decaying.shape[1])):
        c_cpu, c_gpu = (_codes(tmp_path / f"{s}.zarr", name, 4, cols) for s in ("cpu", "gpu"))
        diff = np.abs(c_cpu.astype(np.int16) - c_gpu.astype(np.int16))
        assert diff.max() <= 1, name
        assert np.count_nonzero(diff) <= 1e-3 * diff.size, name


def _codes(group, name: str, bits: int, cols: int) -> np.ndarray:
    """The unpacked integer codes of factor ``name`` (uint8, rows × cols)."""
    import zarr

    packed = zarr.open_array(str(group / name / "codes"), mode="r")[...]
    return unpack_codes(packed, bits, cols)
