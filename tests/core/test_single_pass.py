"""The single-pass mode (``passes=1``): Tropp et al.'s single-view bound, the error estimate,
determinism, verify, resume and the command line, on real Zarr stores and real Dask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import group_digest, known_spectrum, large_graphs, write_zarr

from lplr_dask import ParameterError, compress
from lplr_dask.core.single_pass import CORANGE_FACTOR, ERROR_TEST_ROWS
from lplr_dask.storage.reader import open_compressed, relative_error

BLOCK = (256, 128)  # several canonical blocks each way


@pytest.fixture(scope="module")
def tail_heavy():
    """600 × 400 float32, s_i = 100·0.9^i (i < 100) plus noise 1e-2: beyond rank 20 the tail
    still holds 12% of ‖A‖_F (the optimum), so the sketch's error dominates the 16-bit
    quantization (~1e-3) and the single-view factor is visible."""
    s = 100 * 0.9 ** np.arange(100)
    return known_spectrum(600, 400, s, noise=1e-2, seed=1)


@pytest.fixture(scope="module")
def tail_zarr(tmp_path_factory, tail_heavy):
    return write_zarr(tmp_path_factory.mktemp("sp") / "A.zarr", tail_heavy, (300, 256))


def _f(s, t):
    """Tropp et al. (2017)'s f(s, t) = s / (t − s − 1)."""
    return s / (t - s - 1)


def test_error_within_single_view_bound(tmp_path, tail_heavy, tail_zarr):
    """Tropp, Yurtsever, Udell & Cevher (2017), Thm. 4.3: with a range sketch of m columns and
    a co-range sketch of ℓ rows,

        E‖A − QX‖²_F ≤ (1 + f(m, ℓ)) · min_{ϱ < m−1} (1 + f(ϱ, m)) · τ²_{ϱ+1}(A),

    τ²_{ϱ+1} the squared tail beyond ϱ. Here m = 20, ℓ = 4m + 1 = 81, f(m, ℓ) = 1/3. The
    factors are stored at 16 bits (float16): that moves L̂R̂ by about 2⁻¹¹ of ‖A‖ per factor,
    ≤ 2e-3 of ‖A‖_F, which we add to the bound of the relative error. The bound is on the
    expectation; we assert it for each of 6 seeds, which its margin allows (the worst of 10
    seeds measured 0.47 of the bound in the square).

    Also the factor itself: with the same L̂ (the two-pass run of the same seed stores the
    same L̂), E‖A − L̂R‖² = (1 + f(m, ℓ))·‖A − P_L̂A‖² exactly for R = (ΨL̂)⁺ΨA (Tropp et al.,
    Lemma A.5). Over 10 seeds the mean of err₁²/err₂² measured 1.30 (theory 4/3; single seeds
    1.25–1.38); we assert the mean over 6 within [1 + f/2, 1 + 2f]: a solve that ignores Ψ
    (R = L̂⁺A) gives 1, a wrong Ψ far more.
    """
    m, ell = 20, CORANGE_FACTOR * 20 + 1
    sv = np.linalg.svd(tail_heavy.astype(np.float64), compute_uv=False)
    total = np.sum(sv**2)
    tail = [np.sum(sv[r:] ** 2) for r in range(m)]
    bound2 = (1 + _f(m, ell)) * min((1 + _f(r, m)) * tail[r] for r in range(m - 1)) / total
    one, two = [], []
    for seed in range(6):
        kw = dict(rank=m, bits_left=16, bits_right=16, seed=seed, block_shape=BLOCK)
        one.append(compress(tail_zarr, tmp_path / f"p1-{seed}.zarr", passes=1, verify=True, **kw))
        two.append(compress(tail_zarr, tmp_path / f"p2-{seed}.zarr", **kw))
    e1 = np.array([r.rel_fro_error for r in one])
    e2 = np.array([r.rel_fro_error for r in two])
    assert all(not r.error_is_estimate for r in one)  # verify: the exact error
    assert np.all(e1 <= np.sqrt(bound2) + 2e-3), (e1, np.sqrt(bound2))
    f = _f(m, ell)
    ratio = np.mean(e1**2) / np.mean(e2**2)
    assert 1 + f / 2 <= ratio <= 1 + 2 * f, ratio


def test_estimate_is_within_a_stated_factor_of_the_exact_error(tmp_path, tail_zarr):
    """‖Γ(A − L̂R̂)‖²_F with q = 10 Gaussian rows (scaled by 1/√q) is distributed as
    Σ_i σ_i²·χ²_q(i)/q over the residual's singular values (Tropp et al. 2019, Sec. 6): mean
    the exact ‖A − L̂R̂‖²_F, and about q·r_eff degrees of freedom with r_eff the residual's
    effective rank. Here the residual is the 0.9^i tail beyond rank 20 plus noise, r_eff ≈ 10,
    so the estimate of the error (not squared) has a relative spread of about 7%: measured
    est/exact 0.83–1.11 over 10 seeds. Factor 1.5 is more than 5 such spreads; at 8/8 bits the
    quantization error is part of what is estimated. Seeds 10–15: others than the bound's."""
    for seed in range(10, 16):
        res = compress(
            tail_zarr,
            tmp_path / f"o{seed}.zarr",
            rank=20,
            passes=1,
            seed=seed,
            block_shape=BLOCK,
            verify=True,
        )
        est, exact = res.estimated_rel_fro_error, res.rel_fro_error
        assert exact == pytest.approx(relative_error(tail_zarr, tmp_path / f"o{seed}.zarr"))
        assert 1 / 1.5 <= est / exact <= 1.5, (seed, est, exact)


def test_result_and_attributes_say_the_error_is_an_estimate(tmp_path, tail_zarr):
    out = tmp_path / "o.zarr"
    res = compress(tail_zarr, out, rank=12, passes=1, block_shape=BLOCK)
    assert res.passes == 1 and res.error_is_estimate
    assert res.rel_fro_error == res.estimated_rel_fro_error
    assert "estimate" in res.error_method and f"{ERROR_TEST_ROWS}-row" in res.error_method
    meta = open_compressed(out).meta
    assert meta["passes"] == 1 and meta["error_is_estimate"] is True
    assert meta["error_method"] == res.error_method
    assert meta["rel_fro_error"] == res.rel_fro_error
    # the estimate is close to the truth (see the test above for the factor)
    assert res.rel_fro_error == pytest.approx(relative_error(tail_zarr, out), rel=0.5)
    # and the two-pass result says nothing of the kind
    two = compress(tail_zarr, tmp_path / "t.zarr", rank=12, block_shape=BLOCK)
    assert two.passes == 2 and not two.error_is_estimate and two.estimated_rel_fro_error is None


def test_verify_reports_the_exact_error_and_the_estimate(tmp_path, tail_zarr):
    out = tmp_path / "o.zarr"
    res = compress(tail_zarr, out, rank=12, passes=1, block_shape=BLOCK, verify=True)
    exact = relative_error(tail_zarr, out)
    assert res.rel_fro_error == pytest.approx(exact, rel=1e-6)
    assert not res.error_is_estimate and res.estimated_rel_fro_error is not None
    assert res.estimated_rel_fro_error != res.rel_fro_error
    assert "exact" in res.error_method and "verify" in res.error_method
    meta = open_compressed(out).meta
    assert meta["error_is_estimate"] is False
    assert meta["estimated_rel_fro_error"] == res.estimated_rel_fro_error


def _digest(tmp_path, a, chunks, name, **kw):
    src = write_zarr(tmp_path / f"{name}-in.zarr", a, chunks)
    out = tmp_path / f"{name}.zarr"
    kw = {"rank": 16, "bits_left": 4, "bits_right": 3, "block_shape": BLOCK, **kw}
    compress(src, out, passes=1, **kw)
    return group_digest(out)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_same_seed_same_codes_for_any_tiling(tmp_path, tail_heavy, rounding):
    """Storage tilings that cut A's canonical blocks every way: the codes are the same."""
    kw = dict(rounding=rounding, seed=7)
    a = _digest(tmp_path, tail_heavy, (300, 256), "t1", **kw)
    b = _digest(tmp_path, tail_heavy, (600, 100), "t2", **kw)
    c = _digest(tmp_path, tail_heavy, (77, 400), "t3", **kw)
    assert a == b == c
    assert any(k.startswith("R/codes/") for k in a) and len(a) > 4


def test_same_codes_on_a_cluster_and_different_seeds_differ(tmp_path, tail_heavy, cluster):
    """Threaded scheduler against two worker processes; another seed gives other codes."""
    from distributed import Client

    with Client(cluster):
        on_two = _digest(tmp_path, tail_heavy, (300, 256), "w2", seed=3)
    threaded = _digest(tmp_path, tail_heavy, (300, 256), "w0", seed=3)
    other = _digest(tmp_path, tail_heavy, (300, 256), "s4", seed=4)
    assert threaded == on_two
    for key in ("L/codes/c/0/0", "R/codes/c/0/0"):
        assert other[key] != threaded[key]


def test_tiles_run_row_by_row_on_a_cluster(tmp_path, tail_heavy):
    """On a distributed cluster the pass reads and multiplies A's tiles row block by row block
    (a priority on A's blocks and the tile tasks), so each row's Y partials are summed and
    freed before the next row starts; in Dask's own order the tiles went column panel by
    column panel and whole rows of partials waited (65536 × 32768 float32, 2 workers: peak
    worker RSS 1500 MiB, 785 MiB row by row). One worker thread: the order is the priority's."""
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    class TileOrder(SchedulerPlugin):
        name = "tile-order"

        def __init__(self):
            self.rows = []

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "processing" and isinstance(key, tuple) and "-tile-" in key[0]:
                self.rows.append(key[1])

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(TileOrder())
        src = write_zarr(tmp_path / "A.zarr", tail_heavy, BLOCK)  # a read per tile
        compress(src, tmp_path / "o.zarr", passes=1, rank=16, block_shape=BLOCK)
        rows = cluster.scheduler.plugins["tile-order"].rows
    assert len(rows) == 3 * 4  # 600 × 400 in 256 × 128 blocks
    assert rows == sorted(rows)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(group_size=0, bits_left=4, bits_right=5)],
    ids=["group-ranges", "row-ranges"],
)
def test_no_coefficient_matrix_travels_in_a_task_graph(tmp_path, decaying, client, kw):
    """Ψ·L̂, (Ψ·L̂)⁺ and Γ·L̂ are read or computed on the workers. At m = 300 on 1200 rows
    (ℓ = min(4m + 1, n) = 1200), (Ψ·L̂)⁺ is 300 × 1200 float64 (2.9 MB) and Γ·L̂ 10 × 300
    (24 kB). With the large-graph warning lowered to 20 kB no graph sent to the cluster
    triggers it; the largest graphs of these runs are about 8 kB (the row ranges'
    lo and hi, 2 × m values, included). Before, the projection embedded (Ψ·L̂)⁺ and Γ·L̂
    (graphs of 2.8 MB; twice with ranges that span panels) and the verify stage's check
    Γ·L̂ from the stored codes (27 kB)."""
    rank = 300
    src = write_zarr(tmp_path / "A.zarr", decaying, (300, 256))
    with large_graphs("20kB") as large:
        res = compress(src, tmp_path / "o.zarr", rank=rank, passes=1, seed=2, **kw)
    assert res.rank == rank and res.error_is_estimate
    assert not large, large


def test_projection_refuses_a_coefficient_matrix_held_by_the_driver():
    """A NumPy Ψ·L̂ or Γ·L̂ would be embedded in the projection's graph: refused."""
    import dask.array as da

    from lplr_dask.core.engine import Stages
    from lplr_dask.core.single_pass import solve_and_quantize

    w = da.zeros((41, 64), chunks=(41, 32))
    t = da.zeros((ERROR_TEST_ROWS, 64), chunks=(ERROR_TEST_ROWS, 32))
    psi_l, gamma_l = np.zeros((41, 8)), np.zeros((ERROR_TEST_ROWS, 8))
    for args in ((psi_l, da.from_array(gamma_l)), (da.from_array(psi_l), gamma_l)):
        with pytest.raises(ParameterError, match="one-block Dask array"):
            solve_and_quantize(w, t, *args, None, None, seed=0, stages=Stages())


def test_left_factor_is_the_two_pass_left_factor(tmp_path, tail_zarr):
    """The single pass computes Y exactly as the sketch pass does (same stream, same per-tile
    GEMM, same reduction tree), so L̂ is byte-identical and only R differs."""
    kw = dict(rank=16, bits_left=4, bits_right=4, seed=5, block_shape=BLOCK)
    compress(tail_zarr, tmp_path / "one.zarr", passes=1, **kw)
    compress(tail_zarr, tmp_path / "two.zarr", **kw)
    one, two = group_digest(tmp_path / "one.zarr"), group_digest(tmp_path / "two.zarr")
    left = [k for k in one if k.startswith("L/")]
    assert left and all(one[k] == two[k] for k in left)
    assert any(one[k] != two[k] for k in one if k.startswith("R/codes"))


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="paper", bits_left=8, bits_right=8),  # the reference quantizer, one pass
        dict(group_size=0, bits_left=4, bits_right=5),  # per-row R ranges span the panels
        dict(bits_left=16, bits_right=16, corange_size=2 * 12 + 1),  # Tropp et al.'s ℓ = 2m + 1
    ],
    ids=["paper", "row-ranges", "corange-2m+1"],
)
def test_other_quantizers_and_sizes(tmp_path, tail_zarr, kw):
    """The exact error is what the verify pass reads back; the estimate within its factor;
    against the two-pass run with the same L̂, the ratio within 1.25 × Tropp et al.'s factor
    √(1 + m/(ℓ − m − 1)) (1.155 at ℓ = 4m + 1, 1.41 at 2m + 1): over 10 seeds at ℓ = 4m + 1
    it measured 1.12–1.18, and quantization only adds the same error to both."""
    m = 12
    out = tmp_path / "o.zarr"
    res = compress(tail_zarr, out, rank=m, passes=1, block_shape=BLOCK, verify=True, **kw)
    assert res.rel_fro_error == pytest.approx(relative_error(tail_zarr, out), rel=1e-6)
    assert 1 / 1.5 <= res.estimated_rel_fro_error / res.rel_fro_error <= 1.5
    two_kw = {k: v for k, v in kw.items() if k != "corange_size"}
    two = compress(tail_zarr, tmp_path / "t.zarr", rank=m, block_shape=BLOCK, **two_kw)
    ell = kw.get("corange_size", CORANGE_FACTOR * m + 1)
    assert res.rel_fro_error <= 1.25 * np.sqrt(1 + _f(m, ell)) * two.rel_fro_error


def test_resume_after_a_failed_projection_writes_the_same_codes(tmp_path, tail_zarr):
    """Kill-free version of the job's resume tests: stop after ``basis``, rerun, compare."""
    from lplr_dask.core.job import CompressionJob
    from lplr_dask.core.params import CompressionOptions

    opts = CompressionOptions(rank=16, passes=1, seed=2, block_shape=BLOCK)
    ref = tmp_path / "ref.zarr"
    compress(tail_zarr, ref, options=opts)
    out = tmp_path / "o.zarr"
    job = CompressionJob.create(tail_zarr, out, opts, resume=True)
    job.open()
    for name in ("plan", "sketch", "basis"):
        job.run_stage(name)
    job.close(failed=True)
    again = CompressionJob.create(tail_zarr, out, opts, resume=True)
    res = again.run()
    assert res.reused_stages == ["plan", "sketch", "basis"]
    assert group_digest(out) == group_digest(ref)


def test_codes_that_differ_from_the_computation_are_not_published(tmp_path, tail_zarr):
    """The verify stage recomputes the estimate from the codes on disk (no pass over A). A
    chunk of R rewritten after the projection (through Zarr, so its checksum is valid: what a
    misaligned or stale write would leave) makes them disagree: VerificationError, nothing
    published."""
    import zarr

    from lplr_dask.core.job import CompressionJob
    from lplr_dask.core.params import CompressionOptions
    from lplr_dask.errors import VerificationError

    out = tmp_path / "o.zarr"
    opts = CompressionOptions(rank=16, passes=1, seed=2, block_shape=BLOCK)
    job = CompressionJob.create(tail_zarr, out, opts)
    job.open()
    for name in ("plan", "sketch", "basis", "project"):
        job.run_stage(name)
    codes = zarr.open_array(str(job.out_tmp / "R" / "codes"), mode="r+")
    codes[:, :8] = 0
    with pytest.raises(VerificationError, match="do not match"):
        job.run_stage("verify")
    job.close(failed=True)
    assert not out.exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rank=8, passes=3), "passes"),
        (dict(rank=8, passes=1, method="dsvd"), "passes=1"),
        (dict(rank=8, passes=1, method="nq+lplr"), "passes=1"),
        (dict(method="nq", passes=1), "passes=1"),
        (dict(budget=1.0, passes=1), "passes=1"),
        (dict(rank=8, passes=1, n_oversamples=4), "n_oversamples"),
        (dict(rank=8, passes=1, n_power_iter=1), "n_power_iter"),
        (dict(rank=8, corange_size=40), "passes=1"),
        (dict(rank=8, passes=1, corange_size=9), "corange_size"),
        (dict(rank=8, passes=1, corange_size=601), "corange_size"),
    ],
)
def test_bad_parameters(tmp_path, tail_zarr, kw, match):
    with pytest.raises(ParameterError, match=match):
        compress(tail_zarr, tmp_path / "o.zarr", block_shape=BLOCK, **kw)
    assert not (tmp_path / "o.zarr").exists()


def test_cli_passes_1(tmp_path, capsys, tail_zarr, cluster):
    from lplr_dask.cli import main

    out = tmp_path / "c.zarr"
    argv = ["compress", tail_zarr, out, "--rank", "12", "--passes", "1", "--verify"]
    argv += ["--block-shape", "256", "128", "--cluster", cluster.scheduler_address, "--json"]
    code = main([str(a) for a in argv])
    stdout, _ = capsys.readouterr()
    assert code == 0
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["passes"] == 1 and record["error_is_estimate"] is False
    assert record["rel_fro_error"] == pytest.approx(relative_error(tail_zarr, out), rel=1e-6)
    assert "estimated" in stdout  # the summary line names both
    argv = ["compress", tail_zarr, tmp_path / "d.zarr", "--rank", "12", "--passes", "1"]
    code = main([str(a) for a in [*argv, "--cluster", cluster.scheduler_address]])
    stdout, _ = capsys.readouterr()
    assert code == 0 and "estimate" in stdout and "--verify" in stdout
    argv = ["error", tail_zarr, tmp_path / "d.zarr", "--cluster", cluster.scheduler_address]
    code = main([str(a) for a in [*argv, "--json"]])
    stdout, _ = capsys.readouterr()
    record = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and record["reported_error_is_estimate"] is True
    assert main([str(a) for a in argv]) == 0
    assert "estimated in one pass at compression" in capsys.readouterr()[0]


def test_flow_configuration_takes_passes_and_checks_it():
    """The flows' YAML ``compression:`` section is CompressionOptions: ``passes`` and
    ``corange_size`` are keys there, validated before Prefect starts."""
    from lplr_dask import ConfigError
    from pipelines.config import parse_config

    base = {"name": "sp", "inputs": {"paths": ["/tmp/A.zarr"]}, "output_dir": "/tmp/out"}
    cfg = parse_config({**base, "compression": {"rank": 8, "passes": 1, "corange_size": 40}})
    assert cfg.compression.passes == 1 and cfg.compression.corange_size == 40
    with pytest.raises(ConfigError, match="passes=1"):
        parse_config({**base, "compression": {"budget": 1.0, "passes": 1}})
    with pytest.raises(ConfigError, match="passes"):
        parse_config({**base, "compression": {"rank": 8, "passes": 0}})


@pytest.mark.gpu
def test_cupy_backed_single_pass_matches_numpy(tmp_path, tail_heavy):
    """A CuPy-backed input: the same estimate and exact error as on the CPU (the streams are
    drawn on the host; cuBLAS and OpenBLAS differ in rounding only)."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    import dask.array as da

    cpu = da.from_array(tail_heavy, chunks=(256, 128))
    gpu = cpu.map_blocks(cupy.asarray, meta=cupy.empty((0, 0), dtype=np.float32))
    kw = dict(rank=16, passes=1, block_shape=BLOCK, verify=True)
    r_cpu = compress(cpu, tmp_path / "cpu.zarr", **kw)
    r_gpu = compress(gpu, tmp_path / "gpu.zarr", **kw)
    assert r_gpu.rel_fro_error == pytest.approx(r_cpu.rel_fro_error, rel=1e-3)
    assert r_gpu.estimated_rel_fro_error == pytest.approx(r_cpu.estimated_rel_fro_error, rel=1e-3)


def test_golden_test_stream():
    """The seed contract of the single-pass mode (as tests/kernels/test_random.py pins S, the
    dithers and the sparse sign Ψ): Γᵀ rows 1000:3100 (three seed blocks), recorded with
    numpy 2.4.6. A change here is a breaking change: a resumed job would draw another Γ than
    its stored T used."""
    import hashlib

    from lplr_dask.kernels.random import STREAM_ERROR_TEST, sketch_rows

    def digest(x):
        return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:32]

    gamma_t = sketch_rows(7, 1000, 3100, 10, stream=STREAM_ERROR_TEST)
    assert digest(gamma_t) == "86ac63608c6a81575bff54c1e72821d0"
    # independent of S's stream with the same seed, rows and width
    assert not np.array_equal(gamma_t, sketch_rows(7, 1000, 3100, 10))
