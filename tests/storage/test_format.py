"""The stored format of :mod:`lplr_dask.storage.format` on its own: one factor written block by
block through :func:`create_factor` has exactly the bytes :func:`layout_nbytes` counts, reads
back to the values its codes name, and its metadata round-trips under the checksum."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from lplr_dask.errors import IntegrityError
from lplr_dask.kernels.packing import encode_float
from lplr_dask.kernels.quantize import QuantizerSpec, block_range, dequantize, quantize
from lplr_dask.storage.format import (
    bytes_on_disk,
    create_factor,
    layout_nbytes,
    read_factor_block,
    read_metadata,
    remove_partial_writes,
    write_metadata,
)

SHAPE, CHUNKS = (50, 136), (20, 64)  # edge chunks in both directions

SPECS = [
    QuantizerSpec(bits=3, granularity="group", group_size=32),
    QuantizerSpec(bits=4, granularity="group", group_size=32, symmetric=False),
    QuantizerSpec(bits=5, granularity="row"),
    QuantizerSpec(bits=1, granularity="row", symmetric=False),
    QuantizerSpec(bits=16),
]


def _write(root, spec, x):
    """Write x block by block, as the engine does; group-wise ranges are local to a block,
    row ranges are reduced over the row first."""
    writer = create_factor(root, "R", SHAPE, spec, CHUNKS)
    row_ranges = None if spec.is_float or spec.granularity == "group" else block_range(x, spec=spec)
    if row_ranges is not None:
        writer.write_ranges(*row_ranges)
    values = np.zeros(SHAPE, np.float32)
    for r0 in range(0, SHAPE[0], CHUNKS[0]):
        for c0 in range(0, SHAPE[1], CHUNKS[1]):
            blk = x[r0 : r0 + CHUNKS[0], c0 : c0 + CHUNKS[1]]
            rows, cols = slice(r0, r0 + blk.shape[0]), slice(c0, c0 + blk.shape[1])
            if spec.is_float:
                writer.write(r0, c0, encode_float(blk, spec.float_format))
                values[rows, cols] = blk.astype(np.float16)
                continue
            if row_ranges is None:
                lo, hi = block_range(blk, spec=spec)
                codes = quantize(blk, lo, hi, spec=spec)
                writer.write(r0, c0, codes, lo, hi)
            else:
                lo, hi = (r[rows] for r in row_ranges)
                codes = quantize(blk, lo, hi, spec=spec)
                writer.write(r0, c0, codes)
            values[rows, cols] = dequantize(codes, lo, hi, spec=spec)
    return values


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_written_bytes_equal_the_layout_and_values_read_back(tmp_path, spec):
    x = np.random.default_rng(spec.bits).standard_normal(SHAPE).astype(np.float32)
    root = tmp_path / "g.zarr"
    zarr.open_group(str(root), mode="w")
    expected = _write(root, spec, x)
    assert bytes_on_disk(root)["arrays"] == layout_nbytes(SHAPE, spec, CHUNKS)
    got = read_factor_block(str(root / "R"), spec, SHAPE, slice(0, SHAPE[0]), slice(0, SHAPE[1]))
    np.testing.assert_array_equal(got, expected)
    # A block in the middle (byte-aligned, on a group boundary) reads the same values.
    part = read_factor_block(str(root / "R"), spec, SHAPE, slice(7, 33), slice(64, 136))
    np.testing.assert_array_equal(part, expected[7:33, 64:136])


def test_an_unfinished_chunk_write_is_removed_and_nothing_else(tmp_path):
    """A worker killed while Zarr writes a chunk leaves ``<key>.<uuid hex>.partial`` (the task
    is rerun and writes the chunk again): it counts in the bytes on disk until removed; other
    files, even ending in .partial, stay."""
    spec = SPECS[0]
    root = tmp_path / "g.zarr"
    zarr.open_group(str(root), mode="w")
    _write(root, spec, np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))
    chunk = next(f for f in (root / "R" / "codes").rglob("*") if f.is_file() and f.parent.name)
    stale = chunk.with_name(chunk.name + ".0123456789abcdef0123456789abcdef.partial")
    stale.write_bytes(chunk.read_bytes()[:100])
    kept = root / "notes.partial"
    kept.write_text("not a chunk write")
    assert bytes_on_disk(root)["arrays"] > layout_nbytes(SHAPE, spec, CHUNKS)
    assert remove_partial_writes(root) == [stale]
    assert bytes_on_disk(root)["arrays"] == layout_nbytes(SHAPE, spec, CHUNKS) + len(
        "not a chunk write"
    )
    assert kept.exists()


def test_metadata_round_trips_and_an_edit_is_detected(tmp_path):
    root = tmp_path / "g.zarr"
    zarr.open_group(str(root), mode="w")
    spec = SPECS[0]
    _write(root, spec, np.ones(SHAPE, np.float32))
    meta = {"method": "nq", "shape": list(SHAPE), "factors": {"R": spec.to_dict()}}
    write_metadata(root, meta)
    back = read_metadata(root)
    assert {k: back[k] for k in meta} == meta
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["lplr_dask"]["method"] = "lplr"  # an edit that keeps the JSON valid
    (root / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="checksum does not match"):
        read_metadata(root)
