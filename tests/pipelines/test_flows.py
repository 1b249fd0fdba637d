"""The Prefect flows end to end, on real services: a ``prefect server`` on 127.0.0.1, a
``dask scheduler`` with ``dask worker`` processes, a process work pool with a real
``prefect worker``, and the deployments of deploy/prefect.yaml."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import group_digest, known_spectrum, write_zarr
from services import BIN, DaskProcesses, PrefectServer, spawn, stop

pytest.importorskip("prefect")
from lplr_dask import compress

# Real Prefect servers and Dask processes: minutes in all. `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Projection long enough to kill a worker in the middle of it: 64 panels of 4096 × 128.
SHAPE, BLOCK = (4096, 8192), (1024, 128)
PARAMS = {
    "method": "lplr",
    "rank": 32,
    "bits_left": 4,
    "bits_right": 4,
    "seed": 5,
    "block_shape": list(BLOCK),
    "group_size": 128,
}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.url}):
        yield server
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # send the last logs before the server goes
    server.close()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """4096 × 8192 float32 with a decaying spectrum, in 1024 × 1024 Zarr chunks, and the
    digest of its compression by the library on the threaded scheduler (the reference)."""
    root = tmp_path_factory.mktemp("matrix")
    a = known_spectrum(*SHAPE, 50 * 0.9 ** np.arange(64), noise=1e-3, seed=3)
    src = write_zarr(root / "A.zarr", a, (1024, 1024))
    ref = root / "ref.lplr.zarr"
    kw = {**PARAMS, "block_shape": BLOCK}
    compress(src, ref, **kw)
    return src, group_digest(ref)


def _config(path: Path, src: str, out_dir: Path, address: str, **extra) -> Path:
    cfg = {
        "name": "test",
        "inputs": [src],
        "output_dir": str(out_dir),
        "compression": PARAMS,
        "cluster": {"kind": "address", "address": address},
        "resume": True,
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _flow_runs(server, name=None):
    body = {"sort": "START_TIME_DESC"}
    if name:
        body["flows"] = {"name": {"any_": [name]}}
    return server.post("/flow_runs/filter", body)


def _artifacts(server, flow_run_id):
    return server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


def _check_run_artifacts(server, run_id):
    arts = {a["key"]: a for a in _artifacts(server, run_id)}
    assert {"lplr-result", "lplr-report", "lplr-progress"} <= set(arts)
    table = arts["lplr-result"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert table[0]["method"] == "lplr" and table[0]["rank"] == 32
    assert 0 < table[0]["rel_fro_error"] < 0.5
    assert "dashboard" in arts["lplr-report"]["data"].lower()
    assert float(arts["lplr-progress"]["data"]) == pytest.approx(100.0)
    return table[0]


def _task_names(server, run_id):
    runs = server.post("/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state_type"] for r in runs}


def test_deployment_end_to_end(prefect_server, matrix, tmp_path):
    """prefect.yaml deployed to a process work pool, run by a real worker against a real Dask
    scheduler with two workers, triggered through the API; checked through the API."""
    src, reference = matrix
    dask = DaskProcesses(tmp_path / "dask", n_workers=2)
    env = {**prefect_server.env, "LPLR_PROJECT_DIR": str(ROOT)}
    worker = None
    try:

        def prefect(*args):
            subprocess.run(
                [str(BIN / "prefect"), *args],
                cwd=ROOT,
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )

        prefect("work-pool", "create", "lplr-process", "--type", "process")
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        deployments = {d["name"] for d in prefect_server.post("/deployments/filter", {})}
        assert {"demo-nightly", "cluster-nightly", "on-demand"} <= deployments
        worker = spawn(
            [str(BIN / "prefect"), "worker", "start", "--pool", "lplr-process"],
            tmp_path / "prefect-worker.log",
            env=env,
            cwd=tmp_path,
        )
        cfg = _config(tmp_path / "run.yaml", src, tmp_path / "out", dask.address)
        dep = next(
            d for d in prefect_server.post("/deployments/filter", {}) if d["name"] == "demo-nightly"
        )
        assert dep["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        run = prefect_server.post(
            f"/deployments/{dep['id']}/create_flow_run",
            {"parameters": {"config_path": str(cfg)}},
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            state = prefect_server.get(f"/flow_runs/{run['id']}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        log = (tmp_path / "prefect-worker.log").read_text()[-4000:]
        assert state == "COMPLETED", log
        child = next(
            r
            for r in _flow_runs(prefect_server, "compress-matrix")
            if r["parent_task_run_id"]
            and r["state_type"] == "COMPLETED"
            and r["parameters"]["source"] == src
        )
        _check_run_artifacts(prefect_server, child["id"])
        tasks = _task_names(prefect_server, child["id"])
        for stage in (
            "open-and-validate",
            "plan",
            "sketch",
            "basis",
            "project",
            "verify",
            "publish",
        ):
            assert tasks.get(stage) == "COMPLETED", tasks
        assert group_digest(tmp_path / "out" / "A.lplr.zarr") == reference
    finally:
        if worker is not None:
            stop(worker)
        dask.close()


def test_killed_worker_during_projection_same_codes(prefect_server, matrix, tmp_path):
    """SIGKILL one of two Dask worker processes while the projection stage runs: the flow
    still completes on the other worker, with codes identical to an undisturbed run."""
    from lplr_dask import CompressionOptions
    from pipelines.config import ClusterConfig
    from pipelines.flows import compress_matrix

    src, reference = matrix
    dask = DaskProcesses(tmp_path / "dask", n_workers=2)
    out = tmp_path / "killed.lplr.zarr"
    killed = {}

    def killer():
        # The projection writes R chunk by chunk: kill a worker once the first panels are on
        # disk and the stage is not finished.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and not killed:
            for work in tmp_path.glob(f".{out.name}.lplr-work-*"):
                chunks = list((work / "out" / "R" / "codes").rglob("c/*/*"))
                if chunks and not (work / "stages" / "project.json").exists():
                    victim = dask.workers[0]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.update(chunks=len(chunks), when=time.monotonic())
                    return
            time.sleep(0.001)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        result = compress_matrix(
            src,
            str(out),
            compression=CompressionOptions(**{**PARAMS, "block_shape": BLOCK}),
            cluster=ClusterConfig(kind="address", address=dask.address),
        )
        t.join(5)
        assert killed, "the projection finished before a worker could be killed"
        assert killed["chunks"] < SHAPE[1] // BLOCK[1]  # killed part-way through the panels
        assert dask.workers[0].wait(10) == -signal.SIGKILL
        assert dask.n_workers() == 1
        assert group_digest(out) == reference
        assert result["rel_fro_error"] < 0.5
    finally:
        dask.close()


def test_killed_flow_process_resumes_without_recomputing(prefect_server, matrix, tmp_path):
    """SIGKILL `lplr flow run` once the sketch stage is recorded; the rerun reuses the finished
    stages (their recorded timings come back unchanged) and writes identical codes."""
    src, reference = matrix
    dask = DaskProcesses(tmp_path / "dask", n_workers=2)
    try:
        cfg = _config(tmp_path / "run.yaml", src, tmp_path / "out", dask.address)
        out = tmp_path / "out" / "A.lplr.zarr"
        cmd = [str(BIN / "lplr"), "flow", "run", str(cfg), "--json"]
        env = {**prefect_server.env}
        first = spawn(cmd, tmp_path / "first.log", env=env)
        t0, record = time.monotonic(), None
        while time.monotonic() - t0 < 180 and first.poll() is None:
            found = list((tmp_path / "out").glob(f".{out.name}.lplr-work-*/stages/sketch.json"))
            if found:
                os.killpg(first.pid, signal.SIGKILL)
                record = json.loads(found[0].read_text())
                break
            time.sleep(0.01)
        first.wait(30)
        assert record is not None, (tmp_path / "first.log").read_text()[-3000:]
        assert not out.exists()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        res = json.loads(rerun.stdout.strip().splitlines()[-1])["results"][0]
        assert {"plan", "sketch"} <= set(res["reused_stages"])
        assert "project" not in res["reused_stages"]
        # A recomputed sketch would have a new timing; the reused record's comes back as is.
        assert res["stage_seconds"]["sketch"] == record["substages"]["sketch"]
        assert group_digest(out) == reference
        assert not list((tmp_path / "out").glob(".*lplr-work-*"))  # cleaned up on success
    finally:
        dask.close()


def test_flow_artifacts_and_stage_task_runs(prefect_server, matrix, tmp_path):
    """compress-matrix in this process on a LocalCluster of ONE single-threaded worker (the
    shape of LocalCUDACluster on one GPU, where get_dask_client() inside a task hangs): it
    completes, every stage is a task run and the three artifacts are published."""
    from lplr_dask import CompressionOptions
    from pipelines.config import ClusterConfig
    from pipelines.flows import compress_matrix

    src, reference = matrix
    out = tmp_path / "local.lplr.zarr"
    state = compress_matrix(
        src,
        str(out),
        compression=CompressionOptions(**{**PARAMS, "block_shape": BLOCK}),
        cluster=ClusterConfig(kind="local", n_workers=1, threads_per_worker=1),
        verify=True,
        return_state=True,
    )
    assert state.is_completed()
    run_id = str(state.state_details.flow_run_id)
    row = _check_run_artifacts(prefect_server, run_id)
    assert row["throughput_MB_per_s"] > 0
    assert group_digest(out) == reference
    tasks = _task_names(prefect_server, run_id)
    assert all(tasks.get(s) == "COMPLETED" for s in ("sketch", "basis", "project", "verify"))


def test_flow_run_reports_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [a.zarr]\noutput_dir: out\ncompresion: {budget: 1}\n")
    r = subprocess.run(
        [str(BIN / "lplr"), "flow", "run", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "unknown key 'compresion'. Did you mean 'compression'?" in r.stderr
    assert "Traceback" not in r.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))


def test_batch_over_a_zarr_group_compresses_all_and_names_the_failure(prefect_server, tmp_path):
    """compress-matrices fans out over a Zarr group (one subflow per 2-D array, one cluster);
    a matrix with a NaN fails alone, the others are published, the batch names the failure."""
    from pipelines.config import parse_config
    from pipelines.flows import BatchFailed, compress_matrices

    grp = tmp_path / "layers.zarr"
    g = zarr.open_group(str(grp), mode="w")
    for i, name in enumerate(("q", "k", "v")):
        a = known_spectrum(512, 384, 0.8 ** np.arange(20), noise=1e-3, seed=i)
        if name == "v":
            a[100, 7] = np.nan
        g.create_array(name, data=a, chunks=(256, 128))
    cfg = parse_config(
        {
            "inputs": {"group": str(grp)},
            "output_dir": str(tmp_path / "out"),
            "compression": {"method": "lplr", "rank": 16},
            "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 2},
        }
    )
    with pytest.raises(BatchFailed, match=r"1 of 3 matrices failed: .*layers.zarr/v .*NaN"):
        compress_matrices(config=cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("layers.*")) == [
        "layers.k.lplr.zarr",
        "layers.q.lplr.zarr",
    ]
    assert len(list(out.glob(".layers.v.lplr.zarr.lplr-work-*"))) == 1  # kept for a resume
    batch = prefect_server.post(
        "/artifacts/filter", {"artifacts": {"key": {"any_": ["lplr-batch"]}}}
    )
    rows = batch[0]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert sorted(r["output"].rsplit("/", 1)[-1] for r in rows) == [
        "layers.k.lplr.zarr",
        "layers.q.lplr.zarr",
    ]


def test_compress_checkpoint_flow_fans_out_over_tensors(prefect_server, tmp_path):
    """compress-checkpoint on a sharded safetensors checkpoint on a LocalCluster: one
    compress-tensors task run (one Dask task per tensor inside), the per-tensor table artifact,
    and a restorable result whose passthrough tensors are bit-identical."""
    from safetensors.numpy import load_file
    from test_checkpoint import make_tensors, write_checkpoint

    from lplr_dask.checkpoint import restore_checkpoint
    from pipelines.checkpoint import compress_checkpoint_flow
    from pipelines.config import ClusterConfig

    tensors = make_tensors("float32")
    src = write_checkpoint(tmp_path / "src", tensors, shards=2)
    dst = tmp_path / "dst"
    state = compress_checkpoint_flow(
        str(src),
        str(dst),
        budget=3.0,
        method="nq+lplr",  # one candidate per tensor; auto's choices are tested elsewhere
        cluster=ClusterConfig(kind="local", n_workers=1, threads_per_worker=2),
        return_state=True,
    )
    assert state.is_completed()
    result = state.result()
    run_id = str(state.state_details.flow_run_id)
    compressed = [t for t in result["tensors"] if t["storage"] == "compressed"]
    assert len(compressed) >= 2 and result["bits_per_parameter"] <= 3.0
    tasks = prefect_server.post(
        "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run_id]}}}
    )
    names = [t["name"].rsplit("-", 1)[0] for t in tasks]
    assert names.count("compress-tensors") == 1  # one Dask task per tensor inside it
    arts = {a["key"]: a for a in _artifacts(prefect_server, run_id)}
    table = arts["lplr-checkpoint-tensors"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {r["tensor"] for r in table} == set(tensors)
    assert float(arts["lplr-checkpoint-progress"]["data"]) == pytest.approx(100.0)
    restored = tmp_path / "restored"
    restore_checkpoint(dst, restored)
    back = {}
    for f in restored.glob("*.safetensors"):
        back.update(load_file(str(f)))
    assert set(back) == set(tensors)
    for t in result["tensors"]:
        if t["storage"] != "compressed":
            assert back[t["name"]].tobytes() == tensors[t["name"]].tobytes()
