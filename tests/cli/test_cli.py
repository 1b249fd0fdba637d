"""The `lplr` command line, run in-process against a real cluster and once as a console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from lplr_dask.cli import main

REQUIRED = {
    "shape",
    "method",
    "rank",
    "bits_left",
    "bits_right",
    "rel_fro_error",
    "bits_per_entry",
    "stored_bytes",
    "seconds",
}


@pytest.fixture
def address(cluster):
    return cluster.scheduler_address


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_info_error_decompress(tmp_path, capsys, decaying_zarr, decaying, address):
    out = tmp_path / "c.zarr"
    code, stdout, _ = run(
        capsys,
        "compress",
        decaying_zarr,
        out,
        "--rank",
        12,
        "--bits-left",
        4,
        "--bits-right",
        4,
        "--block-shape",
        256,
        128,
        "--cluster",
        address,
        "--json",
    )
    assert code == 0
    record = json.loads(stdout.strip().splitlines()[-1])
    assert REQUIRED <= record.keys()
    assert record["shape"] == [1200, 700] and record["rank"] == 12

    code, stdout, _ = run(capsys, "info", out, "--json")
    info = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and info["rel_fro_error"] == record["rel_fro_error"]
    assert info["bytes_on_disk"]["arrays"] >= record["stored_bytes"]
    code, stdout, _ = run(capsys, "info", out)
    assert "relative Frobenius error" in stdout and "L: 4-bit column" in stdout

    code, stdout, _ = run(capsys, "error", decaying_zarr, out, "--cluster", address, "--json")
    check = json.loads(stdout.strip().splitlines()[-1])
    assert check["rel_fro_error"] == pytest.approx(record["rel_fro_error"], rel=1e-3)

    dest = tmp_path / "dense.zarr"
    code, stdout, _ = run(capsys, "decompress", out, dest, "--cluster", address)
    assert code == 0
    dense = zarr.open_array(str(dest), mode="r")[:]
    err = np.linalg.norm(dense - decaying) / np.linalg.norm(decaying)
    assert err == pytest.approx(record["rel_fro_error"], rel=1e-3)


def test_budget_summary_names_the_family_auto_chose(tmp_path, capsys, decaying_zarr, address):
    """With --budget and no --method the planner chooses the method (auto); the summary's
    first line names the family it ran (``lplr+power`` rather than ``lplr``), as stored."""
    out = tmp_path / "b.zarr"
    code, stdout, _ = run(
        capsys, "compress", decaying_zarr, out, "--budget", 2, "--cluster", address
    )
    assert code == 0
    code, info, _ = run(capsys, "info", out, "--json")
    chosen = json.loads(info.strip().splitlines()[-1])["plan"]["method"]
    assert stdout.startswith(f"{chosen}: 1200×700 → rank ")
    assert ("power iterations" in stdout.splitlines()[0]) == (
        chosen == "lplr+power" or "svd" in chosen
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "{tmp}/missing.zarr", "{tmp}/o.zarr", "--rank", "4"], "does not exist"),
        (["compress", "{src}", "{tmp}/o.zarr", "--rank", "5000"], "rank=5000 is out of range"),
        (["compress", "{src}", "{tmp}/o.zarr", "--rank", "4", "--bits-left", "9"], "bits_left=9"),
        (["compress", "{src}", "{tmp}/o.zarr", "--budget", "0.0001"], "too small"),
        (["compress", "{src}", "{src}/inner.zarr", "--rank", "4"], "overlaps INPUT"),
        (
            ["compress", "{src}", "{tmp}/o.zarr", "--cluster", "127.0.0.1:1", "--rank", "4"],
            "Cannot reach a Dask scheduler",
        ),
        (["info", "{src}"], "not an lplr-dask result"),
    ],
    ids=["missing", "rank", "bits", "budget", "inside", "scheduler", "info-not-ours"],
)
def test_user_errors_are_one_paragraph(tmp_path, capsys, decaying_zarr, address, argv, message):
    argv = [a.format(tmp=tmp_path, src=decaying_zarr) for a in argv]
    if argv[0] == "compress" and "--cluster" not in argv:
        argv += ["--cluster", address]
    code, _stdout, stderr = run(capsys, *argv)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert stderr.startswith(f"lplr {argv[0]}: error:")
    assert not (tmp_path / "o.zarr").exists()


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys, decaying_zarr, address):
    out = tmp_path / "c.zarr"
    assert run(capsys, "compress", decaying_zarr, out, "--rank", 4, "--cluster", address)[0] == 0
    before = (out / "zarr.json").read_text()
    code, _, err = run(capsys, "compress", decaying_zarr, out, "--rank", 8, "--cluster", address)
    assert code == 2 and "--overwrite" in err
    assert (out / "zarr.json").read_text() == before


def test_console_script_and_demo(tmp_path):
    """The installed entry point, with its own LocalCluster (the embedded default)."""
    beside = Path(sys.executable).with_name("lplr")
    exe = str(beside) if beside.exists() else shutil.which("lplr")
    assert exe, "the `lplr` console script is not installed (pip install -e .)"
    proc = subprocess.run(
        [
            exe,
            "demo",
            "--shape",
            "1024",
            "512",
            "--true-rank",
            "128",
            "--budget",
            "1",
            "--workdir",
            str(tmp_path),
            "--workers",
            "1",
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    by_method = {r["method"]: r for r in record["results"]}
    assert set(by_method) == {"lplr", "paper", "nq"}
    assert "infeasible" in by_method["nq"]  # 1-bit codes plus any scale exceed 1 bit per entry
    assert all(r["bits_per_entry"] <= 1.0 for r in record["results"] if "infeasible" not in r)
    assert by_method["lplr"]["rel_fro_error"] < by_method["paper"]["rel_fro_error"]


def test_device_gpu_without_cupy_fails_before_a_cluster(tmp_path, capsys, decaying_zarr):
    """``--device gpu`` where CuPy is missing: one paragraph naming the extra, exit 2, no
    OUTPUT (and no cluster started: ``--cluster`` names an address nobody listens on)."""
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    out = tmp_path / "c.zarr"
    argv = ["compress", decaying_zarr, out, "--rank", 4, "--device", "gpu"]
    code, _, err = run(capsys, *argv, "--cluster", "tcp://127.0.0.1:9")
    assert code == 2 and "needs CuPy" in err and "lplr-dask[gpu]" in err
    assert not out.exists()
