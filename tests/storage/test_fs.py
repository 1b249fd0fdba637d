"""File-system transactions: what --overwrite may replace, atomic publish under a kill and its
recovery, loopback-only servers, and OSErrors as one paragraph.

Everything runs on real files; the CLI and the kills run in real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import known_spectrum, tree_digest, write_zarr

from lplr_dask import compress
from lplr_dask.cli.common import os_error_message
from lplr_dask.errors import ForeignOutputError, OutputExistsError
from lplr_dask.storage.fs import (
    check_output_path,
    exchange_paths,
    lplr_output_kind,
    publish,
    recover_publish,
    temporary_output,
)

ROOT = Path(__file__).resolve().parents[2]


def lplr(*argv, cwd=None, env=None):
    """Run the `lplr` CLI in a subprocess; (exit code, stdout, stderr)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "lplr_dask.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=e,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


def hidden_siblings(path) -> list[str]:
    p = Path(path)
    return sorted(s for s in os.listdir(p.parent) if s.startswith(f".{p.name}.lplr-"))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A 300 × 200 float32 Zarr matrix of rank 12 plus noise."""
    a = known_spectrum(300, 200, 10 * 0.7 ** np.arange(12), noise=1e-3, seed=3)
    return write_zarr(tmp_path_factory.mktemp("in") / "good.zarr", a, (150, 100))


def small_compress(src, out, rank, **kw):
    return compress(src, out, rank=rank, bits_left=4, bits_right=4, **kw)


@pytest.fixture
def user_folder(tmp_path):
    proj = tmp_path / "proj"
    (proj / "b").mkdir(parents=True)
    (proj / "a.txt").write_text("my notes\n")
    (proj / "b" / "data.csv").write_text("1,2,3\n")
    np.save(proj / "c.npy", np.arange(5))
    return proj


# ------------------------------------------------------------------ overwrite: refusals


def test_cli_refuses_to_overwrite_a_user_folder(tmp_path, good, user_folder):
    before = tree_digest(user_folder)
    code, _, err = lplr("compress", good, user_folder, "--rank", 8, "--overwrite")
    assert code == 2, err
    assert "Traceback" not in err
    assert (
        "did not write" in err and "an ordinary folder, holding 3 entries: a.txt, b/, c.npy" in err
    )
    assert len(err.strip().splitlines()) == 1
    assert tree_digest(user_folder) == before
    assert hidden_siblings(user_folder) == []


@pytest.mark.parametrize("case", ["cwd", "parent-of-cwd", "home", "symlink", "file", "dangling"])
def test_cli_refuses_protected_outputs(tmp_path, good, case):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("keep me\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1\n")
    env = {"HOME": str(home)}
    target = tmp_path / "target"
    if case == "cwd":
        output, expect = ".", "current working directory"
    elif case == "parent-of-cwd":
        output, expect = "..", "a parent of the current working directory"
    elif case == "home":
        output, expect = home, "your home directory"
    elif case == "symlink":
        # even a link to a real lplr-dask result is refused: it says where it points
        small_compress(good, target, 4)
        output = tmp_path / "link"
        output.symlink_to(target)
        expect = f"symbolic link to {target}"
    elif case == "dangling":
        output = tmp_path / "link"
        output.symlink_to(tmp_path / "nowhere")
        expect = f"symbolic link to {tmp_path / 'nowhere'}"
    else:
        output = tmp_path / "notes.txt"
        output.write_text("twelve bytes")
        expect = "a file of 12 bytes"
    watched = [tmp_path]
    before = {str(p): tree_digest(p) for p in watched}
    code, _, err = lplr("compress", good, output, "--rank", 8, "--overwrite", cwd=work, env=env)
    assert code == 2, err
    assert "Traceback" not in err
    assert expect in err, err
    assert {str(p): tree_digest(p) for p in watched} == before
    with pytest.raises(ForeignOutputError, match=expect.split(" to ")[0]):
        cwd = os.getcwd()
        home_env = os.environ.get("HOME")
        try:
            os.chdir(work)
            os.environ["HOME"] = str(home)
            check_output_path(output, overwrite=True)
        finally:
            os.chdir(cwd)
            if home_env is None:
                os.environ.pop("HOME")
            else:
                os.environ["HOME"] = home_env


def test_overlapping_input_and_existing_output_without_overwrite(tmp_path, good):
    with pytest.raises(OutputExistsError, match="overlaps INPUT"):
        check_output_path(Path(good) / "inner", overwrite=True, inputs=[good])
    out = tmp_path / "r.zarr"
    small_compress(good, out, 4)
    with pytest.raises(OutputExistsError, match="already exists") as info:
        check_output_path(out, overwrite=False)
    assert not isinstance(info.value, ForeignOutputError)


def test_foreign_zarr_store_and_empty_folder_are_refused(tmp_path, good):
    with pytest.raises(ForeignOutputError, match="a Zarr store that lplr-dask did not write"):
        check_output_path(good, overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForeignOutputError, match="an empty folder"):
        check_output_path(tmp_path / "empty", overwrite=True)
    # an edited marker is not ours either
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "zarr.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ForeignOutputError):
        check_output_path(fake, overwrite=True)


# ------------------------------------------------------------- overwrite: our own outputs


def test_overwrite_of_our_own_outputs_works(tmp_path, good):
    out = tmp_path / "r.zarr"
    small_compress(good, out, 4)
    assert lplr_output_kind(out) == "compressed"
    res = small_compress(good, out, 8, overwrite=True)
    assert res.rank == 8
    assert json.loads((out / "zarr.json").read_text())["attributes"]["lplr_dask"]["rank"] == 8
    assert hidden_siblings(out) == []
    for marker, content, kind in [
        ("lplr_checkpoint.json", {"format": "lplr-dask-checkpoint", "tensors": []}, "checkpoint"),
        ("lplr_restored.json", {"format": "lplr-dask-restored"}, "restored"),
    ]:
        d = tmp_path / kind
        d.mkdir()
        (d / marker).write_text(json.dumps(content))
        assert lplr_output_kind(d) == kind
        assert check_output_path(d, overwrite=True) == d.resolve()


def test_overwrite_of_a_decompressed_array_works(tmp_path, good):
    from lplr_dask.storage.reader import decompress

    src = tmp_path / "r.zarr"
    small_compress(good, src, 6)
    dest = tmp_path / "dense.zarr"
    decompress(src, dest)
    assert lplr_output_kind(dest) == "dense"
    decompress(src, dest, overwrite=True)
    assert hidden_siblings(dest) == []


# ------------------------------------------------------------------------ atomic publish


def _two_versions(tmp_path, good):
    """OUTPUT (rank 4) in place, and a complete new tree (rank 8) under a temporary name."""
    out = tmp_path / "r.zarr"
    small_compress(good, out, 4)
    small_compress(good, tmp_path / "staging.zarr", 8)
    tmp = tmp_path / ".r.zarr.lplr-tmp-0123456789ab"
    (tmp_path / "staging.zarr").rename(tmp)
    return out, tmp, tree_digest(out), tree_digest(tmp)


KILL_SCRIPT = """
import os, sys
from pathlib import Path
import lplr_dask.storage.fs as fs

mode, tmp, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
exchange = fs.exchange_paths
rename = os.rename
if mode == "after-exchange":
    def exchange_then_die(a, b):
        assert exchange(a, b), "renameat2(RENAME_EXCHANGE) is not available here"
        os._exit(9)
    fs.exchange_paths = exchange_then_die
elif mode == "before-exchange":
    def die(a, b):
        os._exit(9)
    fs.exchange_paths = die
elif mode == "between-renames":
    fs.USE_RENAME_EXCHANGE = False
    def rename_then_die(src, dst):
        rename(src, dst)
        if Path(src) == out:
            os._exit(9)
    os.rename = rename_then_die
fs.publish(tmp, out)
print("published without being killed")
"""


@pytest.mark.parametrize("mode", ["after-exchange", "before-exchange", "between-renames"])
def test_kill_during_publish_keeps_old_or_new_and_recovers(tmp_path, good, mode):
    out, tmp, old, new = _two_versions(tmp_path, good)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(tmp), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 9, proc.stdout + proc.stderr
    left = hidden_siblings(out)
    if mode == "after-exchange":  # the new OUTPUT is in place, the old one beside it
        assert tree_digest(out) == new
        assert len(left) == 1 and ".lplr-swap-" in left[0]
        assert tree_digest(out.parent / left[0]) == old
    elif mode == "before-exchange":  # the old OUTPUT is in place, the new one beside it
        assert tree_digest(out) == old
        assert len(left) == 1 and ".lplr-swap-" in left[0]
        assert tree_digest(out.parent / left[0]) == new
    else:  # journal mode: OUTPUT renamed away; the journal names both complete trees
        assert not out.exists()
        journal = json.loads((out.parent / ".r.zarr.lplr-publish.json").read_text())
        assert tree_digest(out.parent / journal["old"]) == old
        assert tree_digest(out.parent / journal["new"]) == new
    # the next lplr command recovers: OUTPUT in place, complete, no hidden folders left
    code, stdout, err = lplr("info", out, "--json")
    assert code == 0, err
    assert "interrupted publish" in err
    expect = old if mode == "before-exchange" else new
    assert tree_digest(out) == expect
    assert json.loads(stdout.strip().splitlines()[-1])["rank"] == (
        4 if mode == "before-exchange" else 8
    )
    assert hidden_siblings(out) == []
    assert recover_publish(out) == []


def test_next_writer_recovers_a_killed_publish(tmp_path, good):
    out, tmp, old, _ = _two_versions(tmp_path, good)
    # the state the issue observed: OUTPUT renamed to an old folder, nothing in its place
    legacy = tmp_path / ".r.zarr.lplr-old-aaaaaaaaaaaa"
    out.rename(legacy)
    shutil.rmtree(tmp)
    # a writer killed while it filled its temporary tree, and a resumable job's work folder
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from pathlib import Path; import lplr_dask.storage.fs as fs\n"
            "with fs.temporary_output(Path(sys.argv[1])) as t:\n"
            "    (t / 'part').write_text('half')\n"
            "    os._exit(9)\n",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert killed.returncode == 9
    assert len(hidden_siblings(out)) == 2
    job_work = tmp_path / ".r.zarr.lplr-work-0123456789abcdef"
    job_work.mkdir()
    assert check_output_path(out, overwrite=True) == out.resolve()
    assert tree_digest(out) == old
    assert hidden_siblings(out) == [job_work.name]


def test_publish_is_a_plain_rename_without_output_and_refuses_a_foreign_one(tmp_path, good):
    out = tmp_path / "r.zarr"
    with temporary_output(out) as tmp:
        (tmp / "zarr.json").write_text(
            json.dumps({"node_type": "group", "attributes": {"lplr_dask": {"format": "lplr-dask"}}})
        )
        publish(tmp, out)
    assert lplr_output_kind(out) == "compressed" and hidden_siblings(out) == []
    # a user's folder that appears under OUTPUT while the job runs is never replaced
    user = tmp_path / "u"
    user.mkdir()
    (user / "mine.txt").write_text("mine")
    before = tree_digest(user)
    with pytest.raises(ForeignOutputError, match="appeared"):
        with temporary_output(user) as tmp:
            publish(tmp, user)
    assert tree_digest(user) == before and hidden_siblings(user) == []


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "y").write_text("b")
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    assert exchange_paths(a, b)
    assert os.listdir(a) == ["y"] and os.listdir(b) == ["x"]


# ---------------------------------------------------------------------- loopback servers

SOCKETS_SCRIPT = """
import json
import psutil
from lplr_dask.cluster import dask_client

if __name__ == "__main__":
    with dask_client("local", n_workers=1, threads_per_worker=1, memory_limit="1GiB") as c:
        assert c.submit(sum, [1, 2]).result() == 3
        me = psutil.Process()
        found = [
            [p.pid, conn.laddr.ip, conn.laddr.port]
            for p in [me, *me.children(recursive=True)]
            for conn in p.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        ]
        print(json.dumps({"dashboard": c.dashboard_link, "listening": found}))
"""


def test_local_cluster_listens_on_loopback_only(tmp_path):
    script = tmp_path / "sockets.py"
    script.write_text(SOCKETS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    ports = {port for _, _, port in rec["listening"]}
    dashboard_port = int(rec["dashboard"].split(":")[2].split("/")[0])
    # scheduler, dashboard, nanny and worker: all found, all on the loopback interface
    assert dashboard_port in ports and len(ports) >= 4, rec
    assert {ip for _, ip, _ in rec["listening"]} == {"127.0.0.1"}, rec


# ------------------------------------------------------------------ OSError: one paragraph


def test_oserror_is_one_paragraph_with_exit_2(tmp_path, good):
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = tree_digest(tmp_path)
    # a demo work folder under a regular file: NotADirectoryError from mkdir
    code, _, err = lplr("demo", "--workdir", afile / "sub", "--shape", 64, 64)
    assert code == 2, err
    assert "Traceback" not in err
    assert "lplr demo: error: cannot access" in err and "not a folder" in err
    # an OUTPUT under a regular file is refused by the output check, before any work
    code, _, err = lplr("compress", good, afile / "out.zarr", "--rank", 8)
    assert code == 2 and "Traceback" not in err, err
    assert f"{afile} is a file of 1 bytes, not a folder" in err
    assert tree_digest(tmp_path) == before


def test_os_error_message_covers_file_system_errors_only():
    import errno

    msg = os_error_message(PermissionError(errno.EACCES, "Permission denied", "/x/y"))
    assert msg.startswith("cannot access /x/y: Permission denied.") and "permissions" in msg
    msg = os_error_message(OSError(errno.ENOSPC, "No space left on device", "/x/y"))
    assert msg.startswith("cannot write /x/y") and "Nothing was published" in msg
    assert "read-only" in os_error_message(OSError(errno.EROFS, "Read-only file system", "/x"))
    # not a file-system condition: the CLI keeps the traceback (exit 1)
    assert os_error_message(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None
    assert os_error_message(OSError("no errno")) is None


def _as_unprivileged_user() -> list[str]:
    """A command prefix that runs without root's right to ignore permissions."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions are not enforced")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_permission_errors_are_one_paragraph(good):
    """A read-only OUTPUT folder is refused before any work; an unreadable INPUT or OUTPUT is
    one paragraph (exit 2), not a traceback."""
    prefix = _as_unprivileged_user()
    base = Path(tempfile.mkdtemp(prefix="lplr-perm-"))  # tmp_path is private to root
    try:
        base.chmod(0o755)
        shutil.copytree(good, base / "good.zarr")
        small_compress(base / "good.zarr", base / "r.zarr", 4)
        for p in [base / "good.zarr", base / "r.zarr", *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (base / "ro").mkdir(mode=0o555)
        (base / "ro").chmod(0o555)
        shutil.copytree(base / "good.zarr", base / "secret.zarr")
        (base / "secret.zarr").chmod(0o700)
        shutil.copytree(base / "r.zarr", base / "secret-r.zarr")
        (base / "secret-r.zarr").chmod(0o700)
        before = tree_digest(base)
        cases = [
            (
                ["compress", base / "good.zarr", base / "ro" / "out.zarr", "--rank", 8],
                "not writable",
            ),
            (["compress", base / "secret.zarr", base / "new.zarr", "--rank", 8], "secret.zarr"),
            (["info", base / "secret-r.zarr"], "secret-r.zarr"),
        ]
        for argv, expect in cases:
            proc = subprocess.run(
                [*prefix, sys.executable, "-m", "lplr_dask.cli", *map(str, argv)],
                capture_output=True,
                text=True,
                cwd=base,
                env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(base)},
                timeout=120,
            )
            assert proc.returncode == 2, proc.stderr
            assert "Traceback" not in proc.stderr
            assert f"lplr {argv[0]}: error:" in proc.stderr and expect in proc.stderr
        assert tree_digest(base) == before
        assert not (base / "new.zarr").exists()
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base)
