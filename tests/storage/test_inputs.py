"""Checked input and honest bytes (issue 8, cases 4, 5 and 9), on real Zarr stores.

A Zarr INPUT with a missing chunk is refused unless ``--allow-missing-chunks``; a chunk that
cannot be decoded is an error naming its key; a damaged ``zarr.json`` is an InputError. The
bytes the bit accounting reports are the chunk payloads on disk, for every shape, and
``--budget`` holds for them. All-zero panels compress correctly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import known_spectrum, tree_digest

from lplr_dask import CompressionOptions, compress
from lplr_dask.core.job import CompressionJob
from lplr_dask.errors import DamagedInputError, InputError, VerificationError
from lplr_dask.storage.format import bytes_on_disk
from lplr_dask.storage.inputs import canonical_block_shape, missing_chunk_keys, open_input
from lplr_dask.storage.reader import open_compressed, relative_error

SHAPE, CHUNKS = (300, 200), (100, 64)


def write_input(path, a, chunks=CHUNKS, **kw) -> str:
    """``a`` as a Zarr v3 array with every chunk on disk (all-zero ones included)."""
    z = zarr.create_array(
        str(path),
        shape=a.shape,
        chunks=chunks,
        dtype=a.dtype,
        config={"write_empty_chunks": True},
        **kw,
    )
    z[:] = a
    return str(path)


def lplr(*argv, cwd=None):
    """The ``lplr`` command line in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lplr_dask.cli", *(str(a) for a in argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def assert_refused(proc, *needles):
    """Exit 2, one paragraph on stderr naming each needle, no traceback, nothing on stdout."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.fixture(scope="module")
def matrix():
    return known_spectrum(*SHAPE, 10 * 0.8 ** np.arange(20), noise=1e-3, seed=4)


@pytest.fixture
def address(cluster):
    return cluster.scheduler_address


# ----------------------------------------------------------------------------- block grid


@pytest.mark.parametrize(
    "shape, group, expected",
    [
        ((6000, 768), 128, (3000, 768)),  # two 3000-row blocks, not 4096 + 1904
        ((4097, 130), 128, (2049, 130)),  # one column block: bc = d, any d
        ((1009, 997), 0, (1009, 997)),
        ((8192, 8192), 128, (4096, 4096)),
        ((12289, 9000), 128, (3073, 3072)),  # 3000 columns rounded up to 128
        ((12289, 9000), 0, (3073, 3000)),  # ... or to 8
        ((100, 8193), 96, (100, 2784)),  # 2049 rounded up to lcm(8, 96) = 96
    ],
)
def test_default_block_grid_is_balanced(shape, group, expected):
    block = canonical_block_shape(shape, group_size=group)
    assert block == expected
    n, d = shape
    assert -(-n // block[0]) == -(-n // 4096)
    if block[1] < d:
        assert block[1] % math.lcm(8, group or 8) == 0
    # a given block shape stays as given (clipped to the matrix)
    assert canonical_block_shape(shape, block_shape=(512, 384), group_size=128) == (
        min(512, n),
        min(384, d),
    )


# ----------------------------------------------------------------------------- missing chunks


def test_deleted_input_chunk_is_refused_naming_it(tmp_path, matrix, address):
    src = write_input(tmp_path / "A.zarr", matrix)
    good = tmp_path / "good.zarr"
    compress(src, good, rank=8)  # compressed while the input was whole
    (Path(src) / "c" / "1" / "2").unlink()
    before = tree_digest(tmp_path)
    proc = lplr("compress", src, tmp_path / "o.zarr", "--rank", 8)
    assert_refused(proc, "c/1/2", "--allow-missing-chunks", "missing 1 of its 12 chunks")
    assert "write_empty_chunks" in proc.stderr
    assert tree_digest(tmp_path) == before  # nothing written, nothing removed
    # the same from Python, and from `lplr error` (relative_error reads INPUT the same way)
    with pytest.raises(DamagedInputError, match=r"missing 1 of its 12 chunks \(c/1/2\)"):
        compress(src, tmp_path / "o.zarr", rank=8)
    with pytest.raises(DamagedInputError, match="c/1/2"):
        relative_error(src, good)
    assert_refused(lplr("error", src, good, "--cluster", address), "c/1/2")
    assert tree_digest(tmp_path) == before


def test_missing_chunks_accepted_with_the_flag_match_numpy(tmp_path, matrix, address):
    src = write_input(tmp_path / "A.zarr", matrix)
    for key in ("c/0/1", "c/2/3"):
        (Path(src) / key).unlink()
    zero_filled = matrix.copy()
    zero_filled[0:100, 64:128] = 0
    zero_filled[200:300, 192:200] = 0
    before = tree_digest(src)
    out = tmp_path / "o.zarr"
    proc = lplr(
        "compress",
        src,
        out,
        "--rank",
        12,
        "--allow-missing-chunks",
        "--cluster",
        address,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    ahat = open_compressed(out).to_dask().compute()
    expected = np.linalg.norm(zero_filled - ahat) / np.linalg.norm(zero_filled)
    assert record["rel_fro_error"] == pytest.approx(expected, rel=1e-3)
    # `lplr error` needs the same flag to read that input
    assert_refused(lplr("error", src, out, "--cluster", address), "c/0/1")
    check = lplr("error", src, out, "--allow-missing-chunks", "--cluster", address, "--json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout.strip().splitlines()[-1])["rel_fro_error"] == pytest.approx(
        expected, rel=1e-3
    )
    assert tree_digest(src) == before


def test_missing_chunk_check_covers_other_stores_and_shards(tmp_path, matrix):
    # an in-memory store, listed through the store API
    z = zarr.create_array(zarr.storage.MemoryStore(), shape=SHAPE, chunks=CHUNKS, dtype="f4")
    z[:100] = matrix[:100]  # rows 100:300 never written
    assert missing_chunk_keys(z)[:2] == ["c/1/0", "c/1/1"]
    with pytest.raises(DamagedInputError, match=r"missing 8 of its 12 chunks"):
        open_input(z)
    assert open_input(z, allow_missing_chunks=True).shape == SHAPE
    # a sharded array: the shard is the unit, and its key is named
    src = write_input(tmp_path / "S.zarr", matrix, chunks=(50, 32), shards=(100, 64))
    (Path(src) / "c" / "2" / "0").unlink()
    with pytest.raises(DamagedInputError, match=r"missing 1 of its 12 chunks \(c/2/0\)"):
        open_input(src)
    # a Zarr group holding one array is checked the same way
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    arr = g.create_array("w", shape=SHAPE, chunks=CHUNKS, dtype="f4")
    arr[:] = matrix
    (tmp_path / "g.zarr" / "w" / "c" / "0" / "0").unlink()
    with pytest.raises(DamagedInputError, match=r"g\.zarr.*c/0/0"):
        open_input(tmp_path / "g.zarr")


def test_allow_missing_chunks_is_part_of_the_job_key(tmp_path, matrix):
    src = write_input(tmp_path / "A.zarr", matrix)
    keys = {
        CompressionJob.create(
            src, tmp_path / "o.zarr", CompressionOptions(rank=4), allow_missing_chunks=flag
        ).key
        for flag in (False, True)
    }
    assert len(keys) == 2


# ----------------------------------------------------------------------------- damaged chunks


@pytest.mark.parametrize("compressed", [True, False], ids=["zstd", "raw"])
def test_truncated_input_chunk_names_its_key(tmp_path, matrix, compressed, address):
    kw = {} if compressed else {"compressors": None}
    src = write_input(tmp_path / "A.zarr", matrix, **kw)
    chunk = Path(src) / "c" / "2" / "1"
    chunk.write_bytes(chunk.read_bytes()[:100])
    before = tree_digest(tmp_path)
    with pytest.raises(
        DamagedInputError, match=r"chunk c/2/1 \(.*A\.zarr/c/2/1\) cannot be decoded"
    ):
        compress(src, tmp_path / "o.zarr", rank=8)
    assert tree_digest(tmp_path) == before  # no OUTPUT, no work directory left
    if compressed:  # once through the command line and a cluster of worker processes
        proc = lplr("compress", src, tmp_path / "o.zarr", "--rank", 8, "--cluster", address)
        assert_refused(proc, "chunk c/2/1 (", "cannot be decoded", "restore it")
        assert tree_digest(tmp_path) == before


def test_checksum_failure_in_a_sharded_input_names_the_shard(tmp_path, matrix):
    # sharded arrays carry a CRC-32C over their index: a flipped index byte fails it
    src = write_input(tmp_path / "S.zarr", matrix, chunks=(50, 32), shards=(100, 64))
    good = tmp_path / "good.zarr"
    compress(src, good, rank=8)
    shard = Path(src) / "c" / "1" / "1"
    raw = bytearray(shard.read_bytes())
    raw[-6] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DamagedInputError, match=r"chunk c/1/1 \(.*\) cannot be decoded"):
        relative_error(src, good)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"\xff\xfe" + b[2:],  # not UTF-8
        lambda b: b[: len(b) // 2],  # truncated JSON
        lambda b: b"[]",  # JSON, but not array metadata
    ],
    ids=["non-utf8", "truncated", "not-metadata"],
)
def test_damaged_input_metadata_is_an_input_error(tmp_path, matrix, damage):
    src = write_input(tmp_path / "A.zarr", matrix)
    meta = Path(src) / "zarr.json"
    meta.write_bytes(damage(meta.read_bytes()))
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match=r"A\.zarr is not a readable Zarr v3 array"):
        compress(src, tmp_path / "o.zarr", rank=8)
    proc = lplr("compress", src, tmp_path / "o.zarr", "--rank", 8)
    assert_refused(proc, "not a readable Zarr v3 array", "zarr.json")
    assert tree_digest(tmp_path) == before


# ----------------------------------------------------------------------------- zero chunks


@pytest.mark.parametrize(
    "method, kw",
    [
        ("lplr", dict(rank=8, bits_left=4, bits_right=4)),
        ("lplr", dict(rank=8, bits_left=4, bits_right=3, group_size=0)),
        ("nq", dict(bits_matrix=3)),
        ("nq", dict(bits_matrix=2, group_size=0)),
        ("nq+lplr", dict(rank=4, bits_matrix=2)),
        ("paper", dict(rank=8)),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{w}" for k, w in v.items()),
)
def test_all_zero_panels_compress_correctly(tmp_path, matrix, method, kw):
    """A zero column panel (a zero panel of R, zero Q tiles) and a zero row block."""
    a = matrix.copy()
    a[:, 64:128] = 0
    a[100:200, :] = 0
    src = write_input(tmp_path / "A.zarr", a)
    out = tmp_path / "o.zarr"
    kw.setdefault("group_size", 64)
    res = compress(src, out, method=method, block_shape=(100, 64), **kw)
    ahat = open_compressed(out).to_dask().compute()
    expected = np.linalg.norm(a - ahat) / np.linalg.norm(a)
    assert res.rel_fro_error == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert bytes_on_disk(out)["arrays"] == res.stored_bytes
    if method != "paper" and kw["group_size"]:  # a zero group has a zero scale: exact zeros
        assert np.all(ahat[:, 64:128] == 0)


# ----------------------------------------------------------------------------- honest bytes


HONEST = [
    # shape, method, kwargs; budgets are checked on disk too
    ((6000, 768), "lplr", dict(budget=1.0)),  # the case: 35% over before
    ((1009, 997), "lplr", dict(rank=16, bits_left=3, bits_right=5, group_size=0)),
    ((4097, 130), "nq", dict(budget=2.5)),
    ((4097, 130), "nq+lplr", dict(rank=4, bits_matrix=2, bits_left=8, bits_right=4)),
    ((1031, 1013), "paper", dict(budget=2.0)),
    ((1031, 1013), "lplr", dict(rank=8, bits_left=16, bits_right=16)),
    # multiples of 4096 scaled down: a 16384 × 12288 on 4096² blocks, as 512 × 384 on 128²
    ((512, 384), "lplr", dict(rank=40, bits_left=5, bits_right=3, block_shape=(128, 128))),
    ((520, 392), "nq", dict(bits_matrix=4, block_shape=(128, 128))),  # edge chunks padded
    # 5 × 4 blocks of 128² store 640 × 512 entries for 520 × 392: the budget counts them
    ((520, 392), "nq+lplr", dict(budget=4.5, block_shape=(128, 128), group_size=64)),
]


@pytest.mark.parametrize(
    "shape, method, kw",
    HONEST,
    ids=[f"{s[0]}x{s[1]}-{m}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for s, m, kw in HONEST],
)
def test_bytes_on_disk_are_the_reported_bytes(tmp_path, shape, method, kw):
    rng = np.random.default_rng(sum(shape))
    k = 12
    a = (rng.standard_normal((shape[0], k)) @ rng.standard_normal((k, shape[1]))).astype(
        np.float32
    ) + 0.01 * rng.standard_normal(shape).astype(np.float32)
    src = write_input(tmp_path / "A.zarr", a, chunks=(1000, 512))
    out = tmp_path / "o.zarr"
    res = compress(src, out, method=method, **kw)
    on_disk = bytes_on_disk(out)
    n, d = shape
    assert on_disk["arrays"] == res.stored_bytes
    assert res.bits_per_entry == 8 * res.stored_bytes / (n * d)
    if "budget" in kw:
        assert res.bits_per_entry <= kw["budget"]
        assert 8 * on_disk["arrays"] / (n * d) <= kw["budget"]
        assert all(r["bits_per_entry"] <= kw["budget"] for r in res.budget_search)
    assert open_compressed(out).meta["stored_bytes"] == res.stored_bytes


def test_checkpoint_policy_counts_the_honest_bytes():
    """The policy's exact bits are the stored ones: on 4097 × 130, 2-bit group-wise codes
    take 33 bytes per row (130 codes) plus two scales, over 4098 stored rows (float32 for
    minmax; bfloat16 and a 4-level float32 codebook for lloyd, the default)."""
    from lplr_dask.checkpoint.policy import nq_bits_for_budget

    shape = (4097, 130)
    mm = CompressionOptions(method="nq", bits_matrix=2, quantizer="minmax").resolve(shape)
    assert mm.block_shape == (2049, 130)
    assert mm.nbytes(shape) == 4098 * (33 + 2 * 4)
    cfg = CompressionOptions(method="nq", bits_matrix=2, group_size=128).resolve(shape)
    assert cfg.block_shape == (2049, 130)
    assert cfg.nbytes(shape) == 4098 * (33 + 2 * 2) + 4 * 4
    exact = cfg.bits_per_entry(shape)
    assert nq_bits_for_budget(shape, budget=exact - 1e-9, group_size=128) == 1
    assert nq_bits_for_budget(shape, budget=exact, group_size=128) == 2


def test_verify_stage_refuses_missing_and_extra_chunks(tmp_path, matrix):
    """Fewer bytes than accounted (a chunk missing) and more (an accounting bug) both stop
    the job before publish."""
    src = write_input(tmp_path / "A.zarr", matrix)
    for damage, match in (
        (lambda root: (root / "R" / "codes" / "c" / "0" / "1").unlink(), r"R/codes/c/0/1"),
        (
            lambda root: (
                (root / "L" / "codes" / "c" / "9" / "0").parent.mkdir(parents=True)
                or (root / "L" / "codes" / "c" / "9" / "0").write_bytes(b"\0" * 64)
            ),
            "more than",
        ),
    ):
        out = tmp_path / "o.zarr"
        job = CompressionJob.create(
            src, out, CompressionOptions(rank=8, block_shape=(100, 64), group_size=64)
        )
        job.open()
        for name in job.stages[: job.stages.index("verify")]:
            job.run_stage(name)
        damage(job.out_tmp)
        with pytest.raises(VerificationError, match=match):
            job.run_stage("verify")
        job.close(failed=True)
        assert not out.exists()


# ----------------------------------------------------------------------------- raw chunks


@pytest.fixture(params=[False, True], ids=["buffered", "direct"])
def direct(request, monkeypatch):
    """Raw chunks read through the page cache, or with O_DIRECT (as inputs larger than
    memory are)."""
    from lplr_dask.storage import inputs

    monkeypatch.setattr(inputs, "DIRECT_READ_BYTES", 0 if request.param else 1 << 62)
    return request.param


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_raw_chunks_are_read_straight_from_their_files(
    tmp_path, matrix, dtype, direct, monkeypatch
):
    """An uncompressed Zarr v3 input (codec ``bytes`` only) is read from its chunk files,
    edge chunks included (300 × 200 in 100 × 64 chunks), to exactly Zarr's values and
    without Zarr's decode path."""
    a = matrix.astype(dtype)
    src = write_input(tmp_path / "A.zarr", a, compressors=None)
    data = open_input(src, block_shape=CHUNKS).data
    monkeypatch.setattr(zarr.Array, "__getitem__", _zarr_must_not_decode)
    got = data.compute(scheduler="synchronous")
    np.testing.assert_array_equal(got, a.astype(data.dtype))


def _zarr_must_not_decode(self, index):
    raise AssertionError("a raw chunk went through Zarr's decode path")


@pytest.mark.parametrize("extra", [-100, 1, 4096], ids=["truncated", "one-byte-more", "padded"])
def test_raw_chunk_of_the_wrong_size_is_damaged(tmp_path, matrix, direct, extra):
    src = write_input(tmp_path / "A.zarr", matrix, compressors=None)
    chunk = Path(src) / "c" / "1" / "2"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[:extra] if extra < 0 else raw + b"\0" * extra)
    word = "fewer" if extra < 0 else "more"
    with pytest.raises(DamagedInputError, match=rf"chunk c/1/2 \(.*\) cannot be decoded: .*{word}"):
        open_input(src, block_shape=CHUNKS).data.compute(scheduler="synchronous")


def test_big_endian_and_compressed_chunks_go_through_zarr(tmp_path, matrix, direct):
    from zarr.codecs import BytesCodec

    big = write_input(
        tmp_path / "B.zarr", matrix, serializer=BytesCodec(endian="big"), compressors=None
    )
    packed = write_input(tmp_path / "Z.zarr", matrix)
    for src in (big, packed):
        got = open_input(src, block_shape=CHUNKS).data.compute(scheduler="synchronous")
        np.testing.assert_array_equal(got, matrix)
