"""The quantizer family: throughput of each kind, quality at equal bits, and compress time.

Usage::

    python benchmarks/bench_quantizers.py                      # all three parts
    python benchmarks/bench_quantizers.py --part throughput --bits 1,2,3,4,8
    python benchmarks/bench_quantizers.py --part quality --size 2048x1024
    python benchmarks/bench_quantizers.py --part speed --speed-size 4096x4096
    python benchmarks/bench_quantizers.py --part throughput,speed --device gpu   # CuPy blocks

Parts
-----
``throughput``
    quantize and dequantize (including the per-group range or scale, and the clipped range
    search) of one 4096 × 4096 float32 block with groups of 128 along rows, per named
    quantizer (:data:`lplr_dask.kernels.quantize.QUANTIZERS`) and width, in entries per second
    on one core (``lloyd``'s codebook is fitted once beforehand and not timed; its histogram
    pass is timed separately).
``quality``
    relative Frobenius error and honest bits per entry of ``compress`` on the two matrices of
    ``benchmarks/compare_methods.py`` (low-rank+noise and outlier-heavy): ``lplr`` (rank 64,
    B = B′), ``nq`` (B_nq) with every quantizer on every factor, then ``lplr`` with the kinds
    of L and R chosen separately (the defaults are set per factor). A kind whose bits per
    entry are ≤ min–max's at the same widths and whose error is lower wins at equal bits.
``speed``
    ``compress`` wall time with the default quantizers and with ``quantizer="minmax"`` at the
    same configuration, alternately (min of ``--repeat`` runs each), on a generated matrix;
    with ``--device gpu`` the input's blocks are CuPy arrays (threaded scheduler, one GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import dask
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import MATRICES, write_matrix

from lplr_dask import compress
from lplr_dask.core import params
from lplr_dask.kernels.codebooks import fit_lloyd
from lplr_dask.kernels.quantize import (
    QUANTIZERS,
    block_range,
    dequantize,
    entry_histogram,
    quantize,
    quantizer_spec,
)
from lplr_dask.kernels.xp import to_numpy


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(line.format(*header))
    for r in rows:
        print(line.format(*r))
    sys.stdout.flush()


def _sync(device):
    """Wait for the device's queued work (GPU timings need it)."""
    if device == "gpu":
        import cupy

        cupy.cuda.Device().synchronize()


def _best(fn, repeat, device="cpu"):
    best = np.inf
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _on(device, a):
    """``a`` on the device: a NumPy array, or a CuPy array for ``"gpu"``."""
    if device == "gpu":
        import cupy

        return cupy.asarray(a)
    return a


def throughput(bits_list, repeat, device="cpu"):
    rng = np.random.default_rng(0)
    x = _on(device, rng.standard_normal((4096, 4096), dtype=np.float32))
    n = x.size
    rows = []
    for name in QUANTIZERS:
        for bits in bits_list:
            if name == "sign" and bits != 1:
                continue
            spec = quantizer_spec(name, bits=bits, granularity="group", group_size=128)
            book, fit_s = None, 0.0
            if spec.stores_codebook:
                t0 = time.perf_counter()
                _, hi = block_range(x, spec=spec)
                book = fit_lloyd(to_numpy(entry_histogram(x, hi, spec=spec)), bits)
                fit_s = time.perf_counter() - t0

            def enc(spec=spec, book=book):
                lo, hi = block_range(x, spec=spec)
                return lo, hi, quantize(x, lo, hi, spec=spec, codebook=book)

            tq, (lo, hi, codes) = _best(enc, repeat, device)
            td, y = _best(
                partial(dequantize, codes, lo, hi, spec=spec, codebook=book), repeat, device
            )
            err = float(to_numpy(((x - y) ** 2).sum() / (x**2).sum())) ** 0.5
            rows.append(
                (
                    name,
                    bits,
                    f"{n / tq / 1e6:.1f}",
                    f"{n / td / 1e6:.1f}",
                    f"{fit_s:.2f}" if book is not None else "-",
                    f"{err:.4f}",
                )
            )
    where = "one core" if device == "cpu" else "the GPU"
    print(
        f"\nThroughput on one 4096x4096 float32 block on {where}, groups of 128 (Gaussian entries)"
    )
    _table(("quantizer", "bits", "quantize Me/s", "dequantize Me/s", "fit s", "rel err"), rows)


def _run(src, out, **kw):
    r = compress(src, str(out), overwrite=True, **kw)
    return r.rel_fro_error, r.bits_per_entry, r.seconds


def quality(size, workdir, bits_list):
    n, d = size
    kinds = [q for q in QUANTIZERS if q != "sign"]
    for label, gen in MATRICES:
        src = workdir / f"{label}.zarr"
        write_matrix(src, gen(np.random.default_rng(0), n, d), (512, 512))
        rows = []
        for bits in bits_list:
            for method, kw in (
                ("lplr", dict(rank=64, bits_left=bits, bits_right=bits)),
                ("nq", dict(bits_matrix=bits)),
            ):
                for q in kinds + (["sign"] if bits == 1 else []):
                    err, bpe, _ = _run(src, workdir / "out", method=method, quantizer=q, **kw)
                    rows.append((method, bits, q, f"{bpe:.4f}", f"{err:.4f}"))
        print(f"\n{label} {n}x{d}: every factor with one quantizer (lplr rank 64)")
        _table(("method", "bits", "quantizer", "bits/entry", "rel err"), rows)
        rows = []
        saved = dict(params.DEFAULT_QUANTIZERS)
        try:
            for bits in bits_list:
                for ql in kinds:
                    for qr in kinds:
                        params.DEFAULT_QUANTIZERS.update(left=ql, right=qr)
                        err, bpe, _ = _run(
                            src,
                            workdir / "out",
                            method="lplr",
                            rank=64,
                            bits_left=bits,
                            bits_right=bits,
                        )
                        rows.append((bits, ql, qr, f"{bpe:.4f}", f"{err:.4f}"))
        finally:
            params.DEFAULT_QUANTIZERS.clear()
            params.DEFAULT_QUANTIZERS.update(saved)
        print(f"\n{label} {n}x{d}: lplr rank 64, L and R quantizers chosen separately")
        _table(("bits", "L", "R", "bits/entry", "rel err"), rows)


def speed(size, workdir, repeat, device="cpu"):
    n, d = size
    path = workdir / "speed.zarr"
    a = MATRICES[0][1](np.random.default_rng(1), n, d)
    write_matrix(path, a, (2048, 2048))
    del a
    src = str(path)
    if device == "gpu":
        import cupy
        import dask.array as da

        src = da.from_zarr(str(path)).map_blocks(
            cupy.asarray, meta=cupy.empty((0, 0), dtype=np.float32)
        )
    rows = []
    for method, kw in (
        ("lplr", dict(rank=128, bits_left=4, bits_right=4)),
        ("nq", dict(bits_matrix=4)),
        ("nq+lplr", dict(rank=32, bits_left=4, bits_right=4, bits_matrix=3)),
    ):
        times = {"default": [], "minmax": []}
        errs = {}
        for _ in range(repeat):
            for which in ("default", "minmax"):
                q = None if which == "default" else "minmax"
                err, bpe, secs = _run(src, workdir / "out", method=method, quantizer=q, **kw)
                times[which].append(secs)
                errs[which] = (err, bpe)
        t_def, t_mm = min(times["default"]), min(times["minmax"])
        rows.append(
            (
                method,
                f"{t_mm:.2f}",
                f"{t_def:.2f}",
                f"{t_def / t_mm:.3f}",
                f"{errs['minmax'][0]:.4f}",
                f"{errs['default'][0]:.4f}",
                f"{errs['minmax'][1]:.3f}",
                f"{errs['default'][1]:.3f}",
            )
        )
    print(
        f"\ncompress on {n}x{d} ({device}, threaded scheduler, min of {repeat}), defaults "
        f"{params.DEFAULT_QUANTIZERS} vs minmax"
    )
    _table(
        (
            "method",
            "minmax s",
            "default s",
            "ratio",
            "err minmax",
            "err default",
            "bpe mm",
            "bpe def",
        ),
        rows,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--part", default="all", help="throughput, quality, speed or all; several with commas"
    )
    p.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: CuPy blocks (throughput and speed; needs cupy and a CUDA device)",
    )
    p.add_argument("--bits", default="1,2,3,4,8", help="widths for throughput")
    p.add_argument("--quality-bits", default="1,2,3,4", help="widths for quality")
    p.add_argument("--size", default="2048x1024", help="quality matrices, NxD")
    p.add_argument("--speed-size", default="4096x4096", help="speed matrix, NxD")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    bits = [int(b) for b in args.bits.split(",")]
    qbits = [int(b) for b in args.quality_bits.split(",")]
    size = tuple(int(v) for v in args.size.split("x"))
    ssize = tuple(int(v) for v in args.speed_size.split("x"))
    with (
        tempfile.TemporaryDirectory(prefix="bench-quantizers-") as tmp,
        dask.config.set(scheduler="threads"),
    ):
        work = Path(tmp)
        parts = set(args.part.split(","))
        if parts & {"throughput", "all"}:
            throughput(bits, args.repeat, args.device)
        if parts & {"quality", "all"}:
            quality(size, work, qbits)
        if parts & {"speed", "all"}:
            speed(ssize, work, args.repeat, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
