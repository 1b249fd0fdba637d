"""Stage-by-stage jobs: resume after a crash, work-directory hygiene, locking, verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import group_digest, large_graphs, write_zarr

from lplr_dask import CompressionOptions, compress
from lplr_dask.core.job import STAGES, CompressionJob, JobBusyError, input_fingerprint

KW = dict(rank=20, bits_left=4, bits_right=4, seed=2, block_shape=(512, 256))


def _work_dirs(out):
    return sorted(out.parent.glob(f".{out.name}.lplr-*"))


@pytest.mark.parametrize(
    "method, kw",
    [
        ("lplr", KW),
        ("dsvd", dict(rank=12, block_shape=(512, 256))),  # stores B = QᵀA between stages
        ("nq+lplr", dict(rank=8, bits_matrix=2, block_shape=(512, 256))),  # stores Q's ranges
    ],
)
@pytest.mark.parametrize("crash_after", ["plan", "sketch", "basis"])
def test_resume_after_crash_reuses_stages_and_writes_identical_codes(
    tmp_path, decaying_zarr, method, kw, crash_after
):
    ref = compress(decaying_zarr, tmp_path / "ref.zarr", method=method, **kw)
    out = tmp_path / "out.zarr"
    job = CompressionJob.create(
        decaying_zarr, out, CompressionOptions(method=method, **kw), resume=True
    )
    job.open()
    for name in job.stages[: job.stages.index(crash_after) + 1]:
        job.run_stage(name)
    # The process dies here: no close(), the lock and the work directory stay behind.
    (work,) = _work_dirs(out)
    records = {p.name: p.stat().st_mtime_ns for p in (work / "stages").iterdir()}

    again = CompressionJob.create(
        decaying_zarr, out, CompressionOptions(method=method, **kw), resume=True
    )
    assert again.work_dir == work  # same input and parameters: same key
    done = again.open()
    assert done == list(again.stages[: again.stages.index(crash_after) + 1])
    # Reused records are read, not rewritten.
    assert all((work / "stages" / n).stat().st_mtime_ns == t for n, t in records.items())
    res = again.run()
    assert res.reused_stages == done
    assert group_digest(out) == group_digest(tmp_path / "ref.zarr")
    assert res.rel_fro_error == pytest.approx(ref.rel_fro_error, rel=1e-12)
    assert not _work_dirs(out)


def test_changed_input_or_parameters_do_not_reuse(tmp_path, decaying):
    src = write_zarr(tmp_path / "A.zarr", decaying, (300, 256))
    out = tmp_path / "out.zarr"
    job = CompressionJob.create(src, out, CompressionOptions(**KW), resume=True)
    job.open()
    job.run_stage("plan")
    assert (
        CompressionJob.create(src, out, CompressionOptions(**{**KW, "seed": 3}), resume=True).key
        != job.key
    )
    z = zarr.open_array(src, mode="r+")
    z[0, 0] = z[0, 0] + 1  # rewrites one chunk file: the fingerprint changes
    changed = CompressionJob.create(src, out, CompressionOptions(**KW), resume=True)
    assert changed.key != job.key
    assert changed.open() == []


def test_fingerprint_depends_on_files_not_on_reading_them(tmp_path, decaying):
    src = write_zarr(tmp_path / "A.zarr", decaying, (300, 256))
    job = CompressionJob.create(src, tmp_path / "o.zarr", CompressionOptions(**KW))
    f1 = input_fingerprint(job.matrix)
    np.asarray(zarr.open_array(src, mode="r")[:])  # reading changes nothing
    assert input_fingerprint(job.matrix) == f1


def test_failure_without_resume_leaves_nothing(tmp_path, decaying):
    a = decaying.copy()
    a[700, 3] = np.nan
    src = write_zarr(tmp_path / "A.zarr", a, (300, 256))
    out = tmp_path / "out.zarr"
    with pytest.raises(ValueError, match="NaN"):
        compress(src, out, **KW)
    assert not out.exists() and not _work_dirs(out)


def test_failure_with_resume_keeps_finished_stages(tmp_path, decaying):
    a = decaying.copy()
    a[700, 3] = np.inf
    src = write_zarr(tmp_path / "A.zarr", a, (300, 256))
    out = tmp_path / "out.zarr"
    with pytest.raises(ValueError, match="rows 512:1024"):
        compress(src, out, resume=True, **KW)
    (work,) = _work_dirs(out)
    assert sorted(p.stem for p in (work / "stages").iterdir()) == ["plan"]
    assert not (work / "lock").exists()
    assert not out.exists()


def test_live_lock_refuses_a_second_run(tmp_path, decaying_zarr):
    out = tmp_path / "out.zarr"
    job = CompressionJob.create(decaying_zarr, out, CompressionOptions(**KW), resume=True)
    job.open()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (job.work_dir / "lock").write_text(
            json.dumps({"host": os.uname().nodename, "pid": sleeper.pid})
        )
        with pytest.raises(JobBusyError, match=f"Process {sleeper.pid}"):
            CompressionJob.create(decaying_zarr, out, CompressionOptions(**KW), resume=True).open()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is dead now: its lock is taken over.
    CompressionJob.create(decaying_zarr, out, CompressionOptions(**KW), resume=True).run()
    assert out.exists()


def test_verify_runs_an_independent_pass(tmp_path, decaying_zarr):
    """The verify stage's independent error is the reader's blockwise error of the written
    codes, and agrees with the error from the projection's statistics."""
    from lplr_dask.storage.reader import relative_error

    job = CompressionJob.create(
        decaying_zarr, tmp_path / "v.zarr", CompressionOptions(**KW), verify=True
    )
    res = job.run()
    check = job.records["verify"].values["independent_rel_fro_error"]
    assert check == pytest.approx(relative_error(decaying_zarr, tmp_path / "v.zarr"), rel=1e-12)
    assert check == pytest.approx(res.rel_fro_error, rel=1e-3)
    assert 0 < res.rel_fro_error < 0.5


def test_verify_refuses_codes_that_do_not_match_the_computation(tmp_path, decaying_zarr):
    """Codes changed between the projection and the verify stage (re-encoded, so every
    checksum holds): the independent pass disagrees with the statistics, nothing is published."""
    from lplr_dask.errors import VerificationError

    out = tmp_path / "v.zarr"
    job = CompressionJob.create(decaying_zarr, out, CompressionOptions(**KW), verify=True)
    job.open()
    for name in job.stages[: job.stages.index("project") + 1]:
        job.run_stage(name)
    codes = zarr.open_array(str(job.out_tmp / "R" / "codes"), mode="r+")
    codes[:, :8] = 255 - codes[:, :8]  # every code of the first columns flipped
    with pytest.raises(VerificationError, match="do not match the computation"):
        job.run_stage("verify")
    job.close(failed=True)
    assert not out.exists()


def test_stage_order_is_enforced(tmp_path, decaying_zarr):
    job = CompressionJob.create(decaying_zarr, tmp_path / "o.zarr", CompressionOptions(**KW))
    job.open()
    with pytest.raises(RuntimeError, match="needs 'plan' first"):
        job.run_stage("sketch")
    with pytest.raises(ValueError, match="not part of this job"):
        job.run_stage("quantize-matrix")
    job.close(failed=True)
    assert set(job.stages) == set(STAGES) - {"quantize-matrix"}


def test_nq_jobs_have_no_low_rank_stages(tmp_path, decaying_zarr):
    job = CompressionJob.create(
        decaying_zarr, tmp_path / "o.zarr", CompressionOptions(method="nq", bits_matrix=3)
    )
    assert job.stages == ("plan", "quantize-matrix", "verify", "publish")


def test_resume_after_a_kill_inside_publish_keeps_the_published_result(tmp_path, decaying_zarr):
    """Killed after its result became OUTPUT and before the work directory was removed: the
    rerun must not publish the (now empty) work directory over the good OUTPUT."""
    out = tmp_path / "out.zarr"
    job = CompressionJob.create(decaying_zarr, out, CompressionOptions(**KW), resume=True)
    job.open()
    for name in job.stages[:-1]:
        job.run_stage(name)
    job.close = lambda failed: None  # the process dies right after the rename
    job.run_stage("publish")
    published = group_digest(out)
    assert _work_dirs(out) and not (job.out_tmp / "zarr.json").exists()

    again = CompressionJob.create(
        decaying_zarr, out, CompressionOptions(**KW), resume=True, overwrite=True
    )
    res = again.run()
    assert res.reused_stages == list(again.stages[:-1])
    assert group_digest(out) == published
    assert (out / "L" / "codes").is_dir()
    assert not _work_dirs(out)


def test_killed_run_without_resume_leaves_nothing_for_the_next_writer(tmp_path, decaying_zarr):
    """A work directory without --resume is tagged with host and pid; once that process is
    dead, the next writer of the same OUTPUT removes it (lplr_dask.storage.fs.recover_publish)."""
    from lplr_dask.storage.fs import check_output_path

    out = tmp_path / "out.zarr"
    script = (
        "import os, sys\n"
        "from lplr_dask import CompressionJob, CompressionOptions\n"
        f"job = CompressionJob.create({str(decaying_zarr)!r}, {str(out)!r}, "
        "CompressionOptions(rank=8))\n"
        "job.open()\n"
        "for name in job.stages[:3]:\n"
        "    job.run_stage(name)\n"
        "os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    (left,) = _work_dirs(out)
    assert (left / "stages" / "sketch.json").is_file()
    check_output_path(out, overwrite=False)
    assert not _work_dirs(out) and not out.exists()


@pytest.mark.parametrize("block_shape", [(512, 256), (128, 256)], ids=["blocks", "short-blocks"])
def test_budget_run_takes_the_planners_basis_and_resumes_without_the_planner(
    tmp_path, decaying_zarr, block_shape
):
    """The plan stage stores the planner's rotated basis Q_m·H of the point it chose (in the
    row blocks of the job's own QR); the basis stage does no QR and no rotation; a run resumed
    after ``plan`` reads that basis back and writes the same codes; the codes match a run of
    the same configuration given directly up to rounding. Short row blocks (128 rows, fewer
    than the planner's sketch is wide) make its QR re-block the rows; the job restores its
    own blocks."""
    kw = dict(method="lplr", budget=1.0, seed=2, block_shape=block_shape)
    ref = compress(decaying_zarr, tmp_path / "ref.zarr", **kw)
    assert "orthonormalize" not in ref.stage_seconds and "rotate" not in ref.stage_seconds
    direct = compress(
        decaying_zarr,
        tmp_path / "direct.zarr",
        rank=ref.rank,
        bits_left=ref.bits_left,
        bits_right=ref.bits_right,
        seed=2,
        block_shape=block_shape,
    )
    assert "orthonormalize" in direct.stage_seconds
    # The same subspace up to rounding; the basis's columns past the signal's rank 40 span
    # noise, which rounding rotates: the errors agree to a few parts in 10³ (a wrong basis
    # would miss by far more), as with the planner's sketch handed over before.
    assert ref.rel_fro_error == pytest.approx(direct.rel_fro_error, rel=5e-3)

    out = tmp_path / "out.zarr"
    job = CompressionJob.create(decaying_zarr, out, CompressionOptions(**kw), resume=True)
    job.open()
    job.run_stage("plan")  # the process dies here
    (work,) = _work_dirs(out)
    handed = json.loads((work / "stages" / "plan.json").read_text())["values"]["sketch"]
    assert "X" in handed and "Q" not in handed and "Y" not in handed
    again = CompressionJob.create(decaying_zarr, out, CompressionOptions(**kw), resume=True)
    assert again.open() == ["plan"]
    res = again.run()
    assert res.reused_stages == ["plan"]
    assert group_digest(out) == group_digest(tmp_path / "ref.zarr")
    assert res.rel_fro_error == pytest.approx(ref.rel_fro_error, rel=1e-12)


@pytest.mark.parametrize("method", ["lplr", "dsvd"])
def test_no_rank_by_rank_matrix_travels_in_a_task_graph(tmp_path, decaying, client, method):
    """G, G⁺ and the dsvd transform (m × m, 720 kB at m = 300) are read on the workers: with
    the large-graph warning lowered to half of one of them, no graph sent to the cluster
    triggers it (before, the projection embedded G and G⁺ in its graph: at m ≈ 1200 Dask
    warned "Sending large graph" at its default 10 MB)."""
    rank = 300
    src = write_zarr(tmp_path / "A.zarr", decaying, (300, 256))
    with large_graphs("360kB") as large:
        res = compress(src, tmp_path / "o.zarr", method=method, rank=rank, seed=2)
    assert res.rank == rank
    assert not large, large
