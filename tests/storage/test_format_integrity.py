"""Checked storage (format version 2): a seeded fuzz of damage over real compressed outputs.

Every reader (open + to_dask, matvec, decompress, relative_error, and the `lplr` command for a
subset) must either refuse the damaged output with an IntegrityError / StorageFormatError
(CLI: exit 2, no traceback) or return exactly the undamaged result, and must leave every file
of the output byte-identical.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from conftest import tree_digest

from lplr_dask import compress
from lplr_dask.errors import InputError, IntegrityError, ParameterError, StorageFormatError
from lplr_dask.storage.format import CHECKSUM_BYTES, bytes_on_disk, check_group
from lplr_dask.storage.reader import decompress, open_compressed, relative_error, verify_compressed

SHAPE = (300, 200)
BLOCK = (128, 128)
OUTPUTS = {
    "lplr": dict(method="lplr", rank=8),  # group-wise R ranges
    "nq": dict(method="nq", bits_matrix=4),  # Q only
    "nq+lplr": dict(method="nq+lplr", rank=4, bits_matrix=2),
    "paper": dict(method="paper", rank=8),  # asymmetric per-tensor ranges (L/lo, R/lo)
    "lplr16": dict(method="lplr", rank=8, bits_left=16),  # float16 codes, no ranges
}
DAMAGE_KINDS = (
    "flip-chunk",
    "delete-chunk",
    "truncate-chunk",
    "edit-root-attr",
    "edit-factor-attr",
    "flip-array-json",
)


def _lplr(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "lplr_dask.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The input, five pristine compressed outputs and their undamaged readings."""
    base = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((SHAPE[0], 12)) @ rng.standard_normal((12, SHAPE[1]))).astype(
        np.float32
    ) + 0.01 * rng.standard_normal(SHAPE).astype(np.float32)
    src = base / "A.zarr"
    z = zarr.create_array(str(src), shape=SHAPE, chunks=(100, 100), dtype="float32")
    z[:] = a
    x = rng.standard_normal(SHAPE[1])
    out = {}
    with dask.config.set(scheduler="threads"):
        for name, kw in OUTPUTS.items():
            path = base / f"{name}.zarr"
            compress(src, path, block_shape=BLOCK, **kw)
            cm = open_compressed(path)
            out[name] = {
                "path": path,
                "dense": cm.to_dask().compute(),
                "matvec": cm.matvec(x),
                "error": relative_error(src, cm),
            }
    return {"src": src, "x": x, "base": base, "out": out}


def _chunk_files(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*") if f.is_file() and "c" in f.relative_to(root).parts)


def _edit_value(v, rng):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + int(rng.integers(1, 3))
    if isinstance(v, float):
        return v * 1.5 + 1.0
    if isinstance(v, str):
        return v + "x"
    if isinstance(v, list):
        return [_edit_value(v[0], rng), *v[1:]] if v else [1]
    if isinstance(v, dict):
        if not v:
            return {"x": 1}
        k = sorted(v)[int(rng.integers(len(v)))]
        return {**v, k: _edit_value(v[k], rng)}
    return 1  # None


def _damage(root: Path, kind: str, rng) -> str:
    """Apply one seeded damage of ``kind`` to the output at ``root``; describe it."""
    if kind in ("flip-chunk", "delete-chunk", "truncate-chunk"):
        files = _chunk_files(root)
        f = files[int(rng.integers(len(files)))]
        data = bytearray(f.read_bytes())
        if kind == "flip-chunk":
            i = int(rng.integers(len(data)))
            data[i] ^= int(rng.integers(1, 256))
            f.write_bytes(bytes(data))
        elif kind == "delete-chunk":
            f.unlink()
        else:
            f.write_bytes(bytes(data[: int(rng.integers(len(data)))]))
        return f"{kind} {f.relative_to(root)}"
    if kind == "edit-root-attr":
        doc = json.loads((root / "zarr.json").read_text())
        meta = doc["attributes"]["lplr_dask"]
        key = sorted(meta)[int(rng.integers(len(meta)))]
        meta[key] = _edit_value(meta[key], rng)
        (root / "zarr.json").write_text(json.dumps(doc, indent=2))
        return f"{kind} {key}"
    if kind == "edit-factor-attr":
        groups = sorted(p for p in root.iterdir() if p.is_dir())
        g = groups[int(rng.integers(len(groups)))]
        doc = json.loads((g / "zarr.json").read_text())
        key = ("quantizer", "shape")[int(rng.integers(2))]
        doc["attributes"][key] = _edit_value(doc["attributes"][key], rng)
        (g / "zarr.json").write_text(json.dumps(doc, indent=2))
        return f"{kind} {g.name}.{key}"
    if kind == "flip-array-json":
        files = sorted(p / "zarr.json" for p in root.glob("*/*") if (p / "zarr.json").is_file())
        f = files[int(rng.integers(len(files)))]
        data = bytearray(f.read_bytes())
        i = int(rng.integers(len(data)))
        data[i] ^= int(rng.integers(1, 256))
        f.write_bytes(bytes(data))
        return f"{kind} {f.relative_to(root)}@{i}"
    if kind == "root-not-utf8":
        f = root / "zarr.json"
        f.write_bytes(f.read_bytes()[:40] + b"\xff\xfe\x80" + f.read_bytes()[40:])
        return kind
    if kind == "root-truncated":
        f = root / "zarr.json"
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        return kind
    raise AssertionError(kind)


def _outcome(fn):
    """'ok' with the value, or 'refused' for a project storage error; anything else fails."""
    try:
        return "ok", fn()
    except StorageFormatError as exc:  # IntegrityError is one
        return "refused", exc


def _cases():
    rng = np.random.default_rng(2026)
    cases = []
    for name in OUTPUTS:
        for kind in DAMAGE_KINDS:
            for _ in range(2):
                cases.append((name, kind, int(rng.integers(2**31))))
    cases += [("lplr", "root-not-utf8", 0), ("nq", "root-truncated", 0)]
    return cases


CASES = _cases()


def test_fuzz_every_reader_refuses_damage_or_reads_exactly(outputs, tmp_path):
    """Seeded damage of each kind on each output; every reader, files unchanged."""
    src, x = outputs["src"], outputs["x"]
    report = []
    with dask.config.set(scheduler="threads"):
        for i, (name, kind, seed) in enumerate(CASES):
            base = outputs["out"][name]
            root = tmp_path / f"case{i}.zarr"
            shutil.copytree(base["path"], root)
            what = _damage(root, kind, np.random.default_rng(seed))
            before = tree_digest(root)

            dest = tmp_path / f"d{i}.zarr"
            readers = {
                "open+compute": (lambda r: open_compressed(r).to_dask().compute(), base["dense"]),
                "matvec": (lambda r: open_compressed(r).matvec(x), base["matvec"]),
                "relative_error": (lambda r: relative_error(src, r), base["error"]),
                "decompress": (
                    lambda r, d=dest: zarr.open_array(decompress(r, d), mode="r")[:],
                    base["dense"],
                ),
                "verify": (lambda r: verify_compressed(r)["chunks"], None),
            }
            results = {k: (_outcome(lambda f=f, r=root: f(r)), e) for k, (f, e) in readers.items()}
            for reader, ((status, value), expected) in results.items():
                if status == "ok" and expected is not None:
                    assert np.array_equal(value, expected), f"{what}: {reader} silently wrong"
                if status == "refused":
                    assert str(value).strip() and "\n" not in str(value), what
            statuses = {r: s for r, ((s, _), _e) in results.items()}
            # verify reads every chunk: whatever any reader refused, verify refuses too.
            if "refused" in statuses.values():
                assert statuses["verify"] == "refused", (what, statuses)
            assert tree_digest(root) == before, f"{what}: a reader changed the output"
            report.append((what, statuses["verify"]))
    # Chunk damage and attribute edits are all detected (format 2 checks everything).
    for what, verdict in report:
        if not what.startswith("flip-array-json"):
            assert verdict == "refused", what


def test_damage_names_the_array_and_chunk(outputs, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(outputs["out"]["lplr"]["path"], root)
    (root / "R" / "codes" / "c" / "0" / "1").unlink()
    with dask.config.set(scheduler="threads"):
        cm = open_compressed(root)  # metadata is intact: opening works
        with pytest.raises(IntegrityError, match=r"chunk R/codes/c/0/1 is missing"):
            cm.to_dask().compute()
        f = root / "L" / "codes" / "c" / "1" / "0"
        data = bytearray(f.read_bytes())
        data[5] ^= 0x10
        f.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=r"chunk L/codes/c/1/0 fails its crc32c checksum"):
            cm.factor("L").compute()
    with pytest.raises(IntegrityError, match="L/codes/c/1/0"):
        verify_compressed(root)


def test_edited_attribute_is_refused_with_its_fix(outputs, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(outputs["out"]["paper"]["path"], root)
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["lplr_dask"]["bits_left"] = 4
    doc["attributes"]["lplr_dask"]["factors"]["L"]["bits"] = 4
    (root / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=r"were changed after it was written.*recompress"):
        open_compressed(root)


def test_downgraded_format_version_is_refused(outputs, tmp_path):
    """Editing format_version 2 → 1 must not switch the checksums off."""
    root = tmp_path / "c.zarr"
    shutil.copytree(outputs["out"]["lplr"]["path"], root)
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["lplr_dask"]["format_version"] = 1
    (root / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="'format_version' was changed"):
        open_compressed(root)
    doc["attributes"]["lplr_dask"].pop("checksum")
    (root / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="carries crc32c checksums"):
        open_compressed(root)


def test_missing_lo_after_an_edit_is_named(outputs, tmp_path):
    root = tmp_path / "c.zarr"
    shutil.copytree(outputs["out"]["paper"]["path"], root)
    shutil.rmtree(root / "L" / "lo")
    with pytest.raises(IntegrityError, match="array L/lo is missing"):
        open_compressed(root)


def test_cli_refuses_damage_in_one_paragraph(outputs, tmp_path):
    """verify/info/decompress/error through the command line on damaged outputs: exit 2, one
    paragraph, no traceback, files unchanged; a clean output verifies with exit 0, and info
    (which reads only metadata) says its chunks are checksummed."""
    out = outputs["out"]
    damaged = {}
    for i, (name, kind) in enumerate(
        [
            ("lplr", "flip-chunk"),
            ("paper", "delete-chunk"),
            ("nq+lplr", "edit-root-attr"),
        ]
    ):
        root = tmp_path / f"{name}-{kind}.zarr"
        shutil.copytree(out[name]["path"], root)
        _damage(root, kind, np.random.default_rng(i))
        damaged[kind] = root
    before = {k: tree_digest(p) for k, p in damaged.items()}
    clean = out["nq+lplr"]["path"]
    clean_before = tree_digest(clean)
    cluster = ("--cluster", "local", "--workers", "1", "--threads", "1", "--no-progress")
    procs = {
        "clean verify": _lplr("verify", clean),
        "clean info": _lplr("info", clean),
        "verify flip": _lplr("verify", damaged["flip-chunk"]),
        "info edited": _lplr("info", damaged["edit-root-attr"]),
        "decompress flip": _lplr(
            "decompress", damaged["flip-chunk"], tmp_path / "dest.zarr", *cluster
        ),
        "error deleted": _lplr("error", outputs["src"], damaged["delete-chunk"], *cluster),
    }
    done = {k: (p, *p.communicate(timeout=120)) for k, p in procs.items()}
    for key, (p, stdout, stderr) in done.items():
        if key.startswith("clean"):
            assert p.returncode == 0, (key, stderr)
            continue
        assert p.returncode == 2, (key, stdout, stderr)
        assert "Traceback" not in stderr, (key, stderr)
        assert stderr.strip().splitlines()[-1].startswith(f"lplr {key.split()[0]}: error:")
        assert "damaged" in stderr or "changed after" in stderr, (key, stderr)
    assert (
        "chunk L/codes/c/" in done["decompress flip"][2] or "chunk " in done["decompress flip"][2]
    )
    assert "is missing" in done["error deleted"][2]
    _, stdout, _ = done["clean verify"]
    assert stdout.strip().endswith("checksums match"), stdout
    # L and R (lloyd): codes, hi, codebook; Q (normal-float): codes, hi
    assert f"{clean}: 8 arrays" in stdout
    assert "crc32c" in done["clean info"][1]
    assert not (tmp_path / "dest.zarr").exists()
    assert {k: tree_digest(p) for k, p in damaged.items()} == before
    assert tree_digest(clean) == clean_before


def _make_v1(src: Path, dst: Path) -> None:
    """A format-1 output as lplr-dask 1 wrote it: no checksum codec, zero chunks left out,
    format_version 1 and no checksum attribute."""
    shutil.copytree(src, dst)
    for arr_dir in sorted(p for p in dst.glob("*/*") if (p / "zarr.json").is_file()):
        data = zarr.open_array(str(arr_dir), mode="r")[:]
        chunks = zarr.open_array(str(arr_dir), mode="r").chunks
        shutil.rmtree(arr_dir)
        z = zarr.create_array(
            str(arr_dir),
            shape=data.shape,
            chunks=chunks,
            dtype=data.dtype,
            compressors=None,
            fill_value=0,
        )
        z[:] = data
    doc = json.loads((dst / "zarr.json").read_text())
    meta = doc["attributes"]["lplr_dask"]
    meta["format_version"] = 1
    meta.pop("checksum")
    (dst / "zarr.json").write_text(json.dumps(doc, indent=2))


def test_format_1_stays_readable_without_the_guarantee(outputs, tmp_path):
    for name in ("lplr", "nq+lplr"):
        v1 = tmp_path / f"{name}-v1.zarr"
        _make_v1(outputs["out"][name]["path"], v1)
        with dask.config.set(scheduler="threads"):
            cm = open_compressed(v1)
            assert cm.format_version == 1 and cm.checked is False
            assert np.array_equal(cm.to_dask().compute(), outputs["out"][name]["dense"])
            res = verify_compressed(v1)
        assert res["checked"] is False and "format version 1 has no checksums" in res["message"]
    procs = {c: _lplr(c, v1) for c in ("info", "verify")}
    for p in procs.values():
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        assert "damage cannot be detected; recompress to get them" in stdout, stdout


def test_every_chunk_is_on_disk_with_its_checksum(outputs):
    for name, o in outputs["out"].items():
        info = check_group(o["path"])
        assert info["checked"] and info["format_version"] == 2
        n_chunks = sum(
            lay.n_chunks for f in info["factors"].values() for lay in f["arrays"].values()
        )
        files = _chunk_files(Path(o["path"]))
        assert len(files) == n_chunks, name
        sizes = bytes_on_disk(o["path"])
        assert sizes["checksums"] == CHECKSUM_BYTES * n_chunks
        assert sizes["arrays"] == info["meta"]["stored_bytes"], name
        res = verify_compressed(o["path"])
        assert res["checked"] and res["chunks"] == n_chunks


def test_zero_panel_is_stored_and_verifies(tmp_path):
    """Issue case 5: an all-zero panel gives all-zero chunks; they are written, verified."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(SHAPE).astype(np.float32)
    a[:, 128:] = 0.0
    src = tmp_path / "A.npy"
    np.save(src, a)
    with dask.config.set(scheduler="threads"):
        compress(src, tmp_path / "q.zarr", method="nq", bits_matrix=4, block_shape=BLOCK)
        res = verify_compressed(tmp_path / "q.zarr")
        dense = open_compressed(tmp_path / "q.zarr").to_dask().compute()
    assert res["checked"]
    assert np.all(dense[:, 128:] == 0)


def test_decompress_marks_its_dest_and_checksums_it(outputs, tmp_path):
    o = outputs["out"]["nq"]
    with dask.config.set(scheduler="threads"):
        dest = decompress(o["path"], tmp_path / "d.zarr")
    z = zarr.open_array(dest, mode="r")
    meta = z.attrs["lplr_dask"]
    assert meta["format"] == "lplr-dask-dense" and meta["shape"] == list(SHAPE)
    assert Path(meta["source"]) == Path(o["path"]).resolve()
    assert [c.to_dict()["name"] for c in z.metadata.codecs] == ["bytes", "crc32c"]
    assert np.array_equal(z[:], o["dense"])


def test_reader_mistakes_are_project_errors(outputs, tmp_path):
    o = outputs["out"]["nq"]
    cm = open_compressed(o["path"])
    with pytest.raises(ParameterError, match="200 columns"):
        cm.matvec(np.ones(7))
    with pytest.raises(ParameterError, match="no factor 'L'"):
        cm.factor("L")
    other = tmp_path / "B.npy"
    np.save(other, np.ones((50, 40), np.float32))
    with pytest.raises(InputError, match=r"shape \(50, 40\)"):
        relative_error(other, cm)
