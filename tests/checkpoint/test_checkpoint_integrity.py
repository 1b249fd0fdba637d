"""Compressed checkpoints that were damaged, edited or crafted, and damaged sources.

Every case ends in a one-paragraph error of the project's hierarchy (exit status 2 through the
``lplr`` command, no traceback) or in a correct result, and no file outside OUT is written:
every folder involved is hashed before and after. Real safetensors files, real Zarr groups,
real ``lplr`` subprocesses where the command line is what is tested.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("ml_dtypes")

from conftest import tree_digest
from test_checkpoint import load_all, make_tensors, write_checkpoint

from lplr_dask.checkpoint import (
    checkpoint_info,
    compress_checkpoint,
    compress_tensor,
    plan_checkpoint,
    restore_checkpoint,
)
from lplr_dask.checkpoint import measure as ck
from lplr_dask.checkpoint.policy import TensorPolicy
from lplr_dask.errors import (
    InputError,
    IntegrityError,
    LPLRError,
    StorageFormatError,
    UnsafePathError,
)

INDEX = "lplr_checkpoint.json"
LPLR_TENSOR = "model.layers.0.mlp.up.weight"
LPLR_GROUP = f"tensors/{LPLR_TENSOR}.zarr"


# ------------------------------------------------------------------------------- helpers


def lplr(*args, cwd=None) -> subprocess.CompletedProcess:
    """The real ``lplr`` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "lplr_dask.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def lplr_in_process(capsys, *args) -> tuple[int, str]:
    """``lplr_dask.cli.main`` in this process (a traceback would escape as an exception)."""
    from lplr_dask.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def canonical_sha256(index: dict) -> str:
    """The documented seal: sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of
    the index without its ``index_sha256`` field."""
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def edit_index(dst: Path, fn, *, reseal: bool = True) -> None:
    """Edit DST's index; ``reseal`` recomputes its own checksum (a crafted index)."""
    p = dst / INDEX
    index = json.loads(p.read_text())
    fn(index)
    if reseal:
        index["index_sha256"] = canonical_sha256(index)
    p.write_text(json.dumps(index, indent=1))


def flip_byte(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if offset is None else offset
    raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def downgrade_to_v1(dst: Path) -> None:
    """What lplr-dask wrote before checksums: format version 1, no seal, no checksums."""

    def fn(index):
        index["format_version"] = 1
        index.pop("checksums")
        index.pop("index_sha256")

    edit_index(dst, fn, reseal=False)


def assert_refused(tmp_path: Path, out: Path, before: dict) -> None:
    """Nothing outside OUT changed, OUT was not created, no temporary sibling left."""
    assert not out.exists() and not out.is_symlink()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    assert tree_digest(tmp_path) == before


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 2-shard source and its compressed checkpoint: nq tensors, one lplr tensor (L and R
    codes), passthrough tensors and copied files (config, tokenizer, 1_Pooling/config.json)."""
    root = tmp_path_factory.mktemp("integrity")
    src = write_checkpoint(root / "src", make_tensors("float32"), shards=2)
    policy = TensorPolicy(
        overrides={"*mlp.up.weight": {"method": "lplr", "rank": 8, "bits_left": 4, "bits_right": 4}}
    )
    compress_checkpoint(src, root / "dst", budget=4.0, method="nq", policy=policy)
    return src, root / "dst"


@pytest.fixture
def dst(tmp_path, built):
    """A fresh copy of the compressed checkpoint, to damage."""
    return Path(shutil.copytree(built[1], tmp_path / "dst", symlinks=True))


# --------------------------------------------------------------------- confined restore


def _set_shard(value):
    def fn(index):
        index["tensors"][0]["shard"] = value

    return fn


def _add_file(value):
    def fn(index):
        index["files"].append(value)

    return fn


def _set_group(value):
    def fn(index):
        next(t for t in index["tensors"] if t["storage"] == "compressed")["group"] = value

    return fn


def _set_passthrough(value):
    def fn(index):
        next(t for t in index["tensors"] if t["storage"] == "passthrough")["file"] = value

    return fn


@pytest.mark.parametrize(
    ("edit", "value", "cli"),
    [
        (_set_shard, "../evil.safetensors", True),
        (_set_shard, "{abs}/evil.safetensors", True),
        (_add_file, "a/../../x", True),
        (_add_file, "{abs}/x", False),
        (_add_file, "..", False),
        (_add_file, "sub\\..\\..\\x", False),
        (_add_file, "a//b", False),
        (_add_file, "model-00001-of-00002.safetensors", False),  # would replace a shard
        (_set_shard, "sub/model.safetensors", False),
        (_set_group, "tensors/../../x.zarr", False),
        (_set_group, "{abs}/g.zarr", False),
        (_set_passthrough, "../passthrough.safetensors", False),
    ],
)
def test_restore_refuses_paths_leading_out(tmp_path, dst, capsys, edit, value, cli):
    """A crafted index (resealed, so only the path check can catch it) is refused before
    anything is read or written, by `restore` and by `info`."""
    value = value.format(abs=tmp_path / "outside")
    edit_index(dst, edit(value))
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    if cli:
        r = lplr("checkpoint", "restore", dst, out)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert repr(value) in r.stderr and "crafted" in r.stderr, r.stderr
    else:
        with pytest.raises(UnsafePathError, match="crafted"):
            restore_checkpoint(dst, out)
        code, err = lplr_in_process(capsys, "checkpoint", "info", dst)
        assert code == 2 and "crafted" in err
    assert_refused(tmp_path, out, before)


def test_restore_refuses_a_symlinked_folder_leading_out(tmp_path, dst, capsys):
    """DST/1_Pooling replaced by a link to a folder outside DST holding the very same file
    (so its checksum matches): refused as leading out of DST."""
    outside = tmp_path / "outside"
    shutil.move(dst / "1_Pooling", outside)
    (dst / "1_Pooling").symlink_to(outside, target_is_directory=True)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    r = lplr("checkpoint", "restore", dst, out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "1_Pooling/config.json" in r.stderr and "outside" in r.stderr
    code, err = lplr_in_process(capsys, "checkpoint", "info", dst)
    assert code == 2 and "symbolic link" in err
    assert_refused(tmp_path, out, before)


def test_restore_refuses_a_symlinked_chunk(tmp_path, dst):
    """A chunk of a compressed group replaced by a link: leading out → UnsafePathError; a
    link that stays inside DST is refused too (lplr-dask never writes links)."""
    chunk = dst / LPLR_GROUP / "L/codes/c/0/0"
    copy = tmp_path / "stolen-chunk"
    shutil.copy(chunk, copy)
    chunk.unlink()
    chunk.symlink_to(copy)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    with pytest.raises(UnsafePathError, match="outside"):
        restore_checkpoint(dst, out)
    chunk.unlink()
    shutil.copy(copy, dst / "inside-copy")
    chunk.symlink_to(dst / "inside-copy")
    before = tree_digest(tmp_path)
    with pytest.raises(IntegrityError, match="symbolic link"):
        restore_checkpoint(dst, out)
    assert_refused(tmp_path, out, before)


# ------------------------------------------------------------------------ checked index


def _group_files(dst: Path) -> list[str]:
    g = dst / LPLR_GROUP
    return sorted(str(p.relative_to(dst)) for p in g.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("edit-index", "lplr_checkpoint.json does not match its own recorded sha256"),
        ("flip:passthrough.safetensors", "passthrough.safetensors does not match the sha256"),
        ("flip:config.json", "config.json does not match the sha256"),
        ("flip:1_Pooling/config.json", "1_Pooling/config.json does not match"),
        ("delete:tokenizer.json", "tokenizer.json, listed in .* is missing"),
        ("delete:passthrough.safetensors", "passthrough.safetensors, listed in .* is missing"),
        (f"delete:{LPLR_GROUP}/R/codes/c/0/0", "R/codes/c/0/0 is missing"),
        (f"delete:{LPLR_GROUP}/R/hi/c/0/0", "R/hi/c/0/0 is missing"),
        (f"add:{LPLR_GROUP}/L/codes/c/1/0", "L/codes/c/1/0 was not written by lplr-dask"),
        (f"delete-dir:{LPLR_GROUP}", "is missing, not a folder"),
    ],
)
def test_damage_is_refused_by_info_and_restore(tmp_path, dst, damage, match):
    kind, _, rel = damage.partition(":")
    if kind == "edit-index":
        edit_index(dst, lambda i: i["tensors"][1].update(rel_fro_error=0.001), reseal=False)
    elif kind == "flip":
        flip_byte(dst / rel)
    elif kind == "delete":
        (dst / rel).unlink()
    elif kind == "delete-dir":
        shutil.rmtree(dst / rel)
    elif kind == "add":
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(b"\x00" * 16)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    with pytest.raises(IntegrityError, match=match):
        checkpoint_info(dst)
    with pytest.raises(IntegrityError, match=match):
        restore_checkpoint(dst, out)
    assert_refused(tmp_path, out, before)


def test_every_byte_flip_in_a_group_is_refused(tmp_path, dst):
    """Fuzz: one flipped byte in each file of the lplr group (codes and scales of L and R,
    every zarr.json) → IntegrityError naming that file."""
    files = _group_files(dst)
    assert any("L/codes/c/" in f for f in files) and any("R/hi/c/" in f for f in files)
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    for rel in files:
        original = (dst / rel).read_bytes()
        flip_byte(dst / rel, int(rng.integers(len(original))))
        with pytest.raises(IntegrityError, match=rel.replace(".", r"\.")):
            restore_checkpoint(dst, out)
        (dst / rel).write_bytes(original)
        assert not out.exists()
    restore_checkpoint(dst, out)  # the undamaged checkpoint still restores


def test_flipped_L_codes_chunk_fails_restore_through_the_cli(tmp_path, dst):
    chunk = dst / LPLR_GROUP / "L/codes/c/0/0"
    flip_byte(chunk)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    r = lplr("checkpoint", "restore", dst, out)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "L/codes/c/0/0" in r.stderr
    assert "changed after it was written" in r.stderr
    assert_refused(tmp_path, out, before)


def test_unchecked_v1_index_damage_is_caught_by_the_reader(tmp_path, dst):
    """An old (version 1) index has no checksums: a flipped L/codes byte must then be caught
    by lplr_dask.storage.reader's own chunk checks (helper S's checked storage)."""
    downgrade_to_v1(dst)
    flip_byte(dst / LPLR_GROUP / "L/codes/c/0/0")
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    with pytest.raises(IntegrityError):
        restore_checkpoint(dst, out)
    assert_refused(tmp_path, out, before)


def test_unchecked_v1_index_still_reads_and_says_so(tmp_path, dst, built, capsys):
    reference = load_all(Path(restore_checkpoint(built[1], tmp_path / "ref")))
    downgrade_to_v1(dst)
    info = checkpoint_info(dst)
    assert info["format_version"] == 1 and info["checked"] is False
    from lplr_dask.cli import main

    assert main(["checkpoint", "restore", str(dst), str(tmp_path / "out")]) == 0
    assert "without checksums: its files were not checked" in capsys.readouterr().out
    assert load_all(tmp_path / "out") == reference
    assert checkpoint_info(built[1])["checked"] is True


def test_cli_info_says_checked_or_unchecked(tmp_path, dst, capsys):
    from lplr_dask.cli import main

    assert main(["checkpoint", "info", str(dst)]) == 0
    assert "integrity: every file matches the sha256" in capsys.readouterr().out
    downgrade_to_v1(dst)
    assert main(["checkpoint", "info", str(dst)]) == 0
    assert "without checksums" in capsys.readouterr().out


# ----------------------------------------------------------------- damaged index JSON


def _write_raw_index(data: bytes):
    def damage(dst):
        (dst / INDEX).write_bytes(data)

    return damage


def _reseal(fn):
    def damage(dst):
        edit_index(dst, fn)

    return damage


def _truncate_index(dst):
    raw = (dst / INDEX).read_bytes()
    (dst / INDEX).write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize(
    ("damage", "exc", "match"),
    [
        (_write_raw_index(b'{"format": "lplr-dask-checkpoint\xff\xfe"}'), IntegrityError, "UTF-8"),
        (_truncate_index, IntegrityError, "damaged"),
        (_write_raw_index(b"[1, 2, 3]"), StorageFormatError, "not an lplr-dask checkpoint"),
        (_reseal(lambda i: i.update(format_version=3)), StorageFormatError, "version 3"),
        (_reseal(lambda i: i.update(format_version="2")), StorageFormatError, "version '2'"),
        (_reseal(lambda i: i.update(tensors={})), StorageFormatError, "'tensors' must be"),
        (_reseal(lambda i: i.update(files="config.json")), StorageFormatError, "'files' must"),
        (_reseal(lambda i: i["tensors"][0].update(shape="big")), StorageFormatError, "shape"),
        (_reseal(lambda i: i["tensors"][0].update(dtype="C64")), StorageFormatError, "dtype"),
        (_reseal(lambda i: i["tensors"][0].pop("name")), StorageFormatError, "with a name"),
        (_reseal(lambda i: i["tensors"].append(i["tensors"][0])), StorageFormatError, "twice"),
        (_reseal(lambda i: i["summary"].pop("seconds")), StorageFormatError, "seconds"),
        (_reseal(lambda i: i["checksums"].pop("groups")), StorageFormatError, "checksums"),
        (_reseal(lambda i: i["files"].append(7)), UnsafePathError, "files"),
    ],
)
def test_damaged_or_mistyped_index_is_one_error(tmp_path, dst, capsys, damage, exc, match):
    damage(dst)
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    with pytest.raises(exc, match=match):
        restore_checkpoint(dst, out)
    for cmd in (["info", dst], ["restore", dst, out]):
        code, err = lplr_in_process(capsys, "checkpoint", *cmd)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert_refused(tmp_path, out, before)


def test_non_utf8_index_through_the_cli(tmp_path, dst):
    (dst / INDEX).write_bytes(b"\xff\xfe not json")
    before = tree_digest(tmp_path)
    r = lplr("checkpoint", "info", dst)
    assert r.returncode == 2 and "Traceback" not in r.stderr and INDEX in r.stderr, r.stderr
    assert tree_digest(tmp_path) == before


# ------------------------------------------------------------------- the restored marker


def test_restore_writes_its_marker_and_can_be_replaced(tmp_path, built):
    src, dst = built
    out = tmp_path / "out"
    restore_checkpoint(dst, out)
    marker = json.loads((out / "lplr_restored.json").read_text())
    assert marker["format"] == "lplr-dask-restored"
    assert marker["source"] == str(dst.resolve())
    assert datetime.fromisoformat(marker["created"]).tzinfo is not None
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    src_files = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
    assert files == src_files | {"lplr_restored.json"}
    # The marker makes OUT ours: --overwrite replaces it (through the real command).
    r = lplr("checkpoint", "restore", dst, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert load_all(out) == load_all(Path(restore_checkpoint(dst, tmp_path / "again")))
    # Compressing a restored checkpoint does not carry the old marker along as a model file.
    res = compress_checkpoint(out, tmp_path / "dst2", budget=4.0, method="nq")
    assert "lplr_restored.json" not in checkpoint_info(res.output)["files"]


# -------------------------------------------------------------- staging writes every chunk


def test_staging_writes_all_zero_slabs(tmp_path, monkeypatch):
    """A tensor whose first slabs are all zero, staged into Zarr (every tensor staged, slabs of
    40 rows): the zero chunks are written, so the staged input has no missing chunk and the
    codes equal those of compressing it from memory."""
    from conftest import group_digest

    tensors = make_tensors("float32")
    tensors["model.embed_tokens.weight"][:120] = 0
    src = write_checkpoint(tmp_path / "src", tensors)
    entry = plan_checkpoint(src, budget=4.0, method="nq").entry("model.embed_tokens.weight")
    compress_tensor(entry, work_dir=tmp_path / "mem")
    monkeypatch.setattr(ck, "SLAB_BYTES", 40 * 64 * 4)
    compress_tensor(entry, work_dir=tmp_path / "staged", stage_threshold_bytes=0)
    key = entry.candidates[0]["key"]
    tdir = "tensors/model.embed_tokens.weight"
    assert group_digest(tmp_path / "mem" / tdir / f"{key}.zarr") == group_digest(
        tmp_path / "staged" / tdir / f"{key}.zarr"
    )


# ---------------------------------------------------------------- damaged source files


def st_file(header: dict, data: bytes, *, pad: bool = True) -> bytes:
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


GOOD = {"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 64 * 64 * 4]}}
DATA = np.ones((64, 64), np.float32).tobytes()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x10\x00\x00", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 4096) + b'{"w": {"dtype"', "exceeds the file"),
        (struct.pack("<Q", 24) + b'{"w": {"dtype": "F32"   ' + DATA, "not a readable"),
        (struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8" + DATA, "not a readable"),
        (st_file({"w": 5}, DATA), "no dtype/shape/data_offsets record"),
        (st_file({"w": {**GOOD["w"], "data_offsets": "0-16384"}}, DATA), "invalid data_offsets"),
        (st_file({"w": {**GOOD["w"], "dtype": ["F32"]}}, DATA), "dtype"),
        (st_file({"w": {**GOOD["w"], "shape": [True, 64]}}, DATA), "invalid shape"),
        (st_file({**GOOD, "__metadata__": {"format": 1}}, DATA), "__metadata__"),
        (st_file(GOOD, DATA + b"trailing"), "trailing bytes"),
        (st_file(GOOD, DATA[:-100]), "truncated"),
        (
            st_file(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                    "w": {**GOOD["w"], "data_offsets": [16, 16 + 64 * 64 * 4]},
                },
                bytes(16) + DATA,
            ),
            "gap or an overlap",
        ),
    ],
)
def test_damaged_safetensors_source_is_one_error(tmp_path, raw, match):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(raw)
    (src / "config.json").write_text("{}")
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match=match):
        compress_checkpoint(src, tmp_path / "dst", budget=4.0, method="nq")
    assert tree_digest(tmp_path) == before


def test_truncated_safetensors_through_the_cli(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(st_file(GOOD, DATA)[:200])
    before = tree_digest(tmp_path)
    r = lplr("checkpoint", "compress", src, tmp_path / "dst", "--budget", 4)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "model.safetensors" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert tree_digest(tmp_path) == before


def _hf_index(fn):
    def damage(src):
        p = src / "model.safetensors.index.json"
        index = json.loads(p.read_text())
        fn(index)
        p.write_text(json.dumps(index))

    return damage


def _first_shard(index):
    return next(iter(index["weight_map"]))


@pytest.mark.parametrize(
    ("damage", "exc", "match"),
    [
        (
            lambda s: (s / "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xff"}'),
            InputError,
            "not a valid safetensors index",
        ),
        (_hf_index(lambda i: i.update(metadata=[1, 2])), InputError, "metadata"),
        (_hf_index(lambda i: i.update(weight_map=[1, 2])), InputError, "weight_map"),
        (
            _hf_index(lambda i: i["weight_map"].update({_first_shard(i): 3})),
            InputError,
            "not a shard file name",
        ),
        (
            _hf_index(lambda i: i["metadata"].update(total_size="big")),
            InputError,
            "total_size",
        ),
        (
            _hf_index(lambda i: i["weight_map"].update({_first_shard(i): "../x.safetensors"})),
            UnsafePathError,
            "not a plain shard file name",
        ),
    ],
)
def test_damaged_source_index_is_one_error(tmp_path, damage, exc, match):
    src = write_checkpoint(tmp_path / "src", make_tensors("float32"), shards=2)
    damage(src)
    before = tree_digest(tmp_path)
    with pytest.raises(exc, match=match):
        compress_checkpoint(src, tmp_path / "dst", budget=4.0, method="nq")
    assert tree_digest(tmp_path) == before
    assert issubclass(exc, LPLRError)


# ------------------------------------------------------------------- the work directory


def test_damaged_measurement_is_not_sealed_into_the_checkpoint(tmp_path):
    """A measured group in --work-dir with a flipped byte: finalize verifies every chosen
    group chunk by chunk before copying and sealing it, so DST is never created."""
    src = write_checkpoint(tmp_path / "src", make_tensors("float32"))
    work = tmp_path / "work"
    compress_checkpoint(src, tmp_path / "first", budget=4.0, method="nq", work_dir=work)
    chunk = next(p for p in sorted(work.rglob("*.zarr/Q/codes/c/*/*")) if p.is_file())
    flip_byte(chunk)
    before = tree_digest(tmp_path)
    with pytest.raises(IntegrityError, match="work_dir is damaged"):
        compress_checkpoint(src, tmp_path / "dst", budget=4.0, method="nq", work_dir=work)
    assert_refused(tmp_path, tmp_path / "dst", before)


def test_damaged_curve_json_is_measured_again(tmp_path):
    src = write_checkpoint(tmp_path / "src", make_tensors("float32"))
    work = tmp_path / "work"
    first = compress_checkpoint(src, tmp_path / "a", budget=4.0, method="nq", work_dir=work)
    for curve in work.rglob("curve.json"):
        curve.write_bytes(b'{"points": [tru')
    again = compress_checkpoint(src, tmp_path / "b", budget=4.0, method="nq", work_dir=work)
    assert again.total_error2 == first.total_error2


def test_compress_overwrite_replaces_an_existing_checkpoint(tmp_path, built):
    """A compressed checkpoint is an lplr-dask output: `checkpoint compress --overwrite`
    replaces it (and only it)."""
    src, _ = built
    dst = tmp_path / "dst"
    compress_checkpoint(src, dst, budget=4.0, method="nq")
    r = lplr("checkpoint", "compress", src, dst, "--budget", 3, "--method", "nq", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert checkpoint_info(dst)["summary"]["budget"] == 3.0
