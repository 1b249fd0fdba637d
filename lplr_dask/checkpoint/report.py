"""What a compressed checkpoint holds: the result object, the per-tensor table and
:func:`checkpoint_info` (the checked index)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lplr_dask.checkpoint.index import (
    read_index,
)

__all__ = [
    "CheckpointResult",
    "checkpoint_info",
    "mean_rel_error2",
    "tensor_rows",
    "tensor_table",
]


@dataclass(frozen=True)
class CheckpointResult:
    """What :func:`compress_checkpoint` / :func:`finalize_checkpoint` wrote and measured.

    ``tensors`` is the per-tensor table: one dict per original tensor (name, shape, dtype,
    storage, and for compressed tensors method, rank, bits, bits_per_entry, rel_fro_error,
    error2 = absolute squared Frobenius error).
    """

    output: str
    method: str
    budget: float
    bits_per_parameter: float
    """8 × stored bytes of the compressed tensors / their parameters (the budget's measure)."""
    overall_bits_per_parameter: float
    """The same over every tensor, passthrough tensors at their own width."""
    compressed_parameters: int
    total_parameters: int
    total_error2: float
    seconds: float
    tensors: list

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mean_rel_error2(self) -> float:
        """:func:`mean_rel_error2` of :attr:`tensors`, the objective ``auto`` minimises."""
        return mean_rel_error2(self.tensors)

    def table(self) -> str:
        """The per-tensor table as Markdown (compressed tensors, then a passthrough count)."""
        return tensor_table(self.tensors)


def mean_rel_error2(tensors: Sequence[Mapping]) -> float:
    """Σ_t n_t·ε_t² / Σ_t n_t over the compressed tensors of an index or result, with
    ε_t = ‖W_t − Ŵ_t‖_F / ‖W_t‖_F: the parameter-weighted mean squared relative error (0 when
    nothing is compressed)."""
    done = [
        (math.prod(t["shape"]), t["rel_fro_error"]) for t in tensors if t["storage"] == "compressed"
    ]
    n = sum(k for k, _ in done)
    return sum(k * e**2 for k, e in done) / n if n else 0.0


BITS_COLUMN = "bits (B/B'/B_nq)"


def tensor_rows(tensors: Sequence[Mapping]) -> list[dict]:
    """One flat, display-ready dict per tensor of an index or result (every tensor; "-" where
    a field does not apply): the per-tensor table of the CLI and the flow's artifact."""
    rows = []
    for t in tensors:
        done = t["storage"] == "compressed"
        rows.append(
            {
                "tensor": t["name"],
                "shape": "×".join(map(str, t["shape"])),
                "dtype": t["dtype"],
                "storage": t["storage"],
                "method": t.get("method") or "-",
                "rank": t.get("rank") or "-",
                BITS_COLUMN: "/".join(
                    "-" if t.get(k) is None else str(t[k])
                    for k in ("bits_left", "bits_right", "bits_matrix")
                )
                if done
                else "-",
                "bits_per_entry": round(t["bits_per_entry"], 4) if done else "-",
                "rel_fro_error": round(t["rel_fro_error"], 5) if done else "-",
            }
        )
    return rows


def tensor_table(tensors: Sequence[Mapping]) -> str:
    """A Markdown table of the compressed tensors of an index or result."""
    lines = [
        "| tensor | shape | method | rank | bits (B/B′/B_nq) | bits/entry | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    passthrough = 0
    for t, r in zip(tensors, tensor_rows(tensors), strict=True):
        if t["storage"] != "compressed":
            passthrough += 1
            continue
        bits = r[BITS_COLUMN]
        lines.append(
            f"| {r['tensor']} | {r['shape']} | {r['method']} | {r['rank']} | {bits} | "
            f"{t['bits_per_entry']:.3f} | {t['rel_fro_error']:.4f} |"
        )
    lines.append(f"\n{passthrough} tensors passed through unchanged.")
    return "\n".join(lines)


def checkpoint_info(dst) -> dict:
    """The index of a compressed checkpoint: summary, per-tensor table, files.

    The index, the passthrough file, every copied file and every compressed group's files are
    checked against their recorded sha256 first (format version 2); paths read from the index
    are confined to ``dst``.

    Returns
    -------
    dict
        ``summary`` (bits per parameter, total error, ...), ``tensors`` (one row per original
        tensor), ``files`` (copied non-weight files), the plan's settings, ``format_version``
        and ``checked`` (False for a version-1 index, written before checksums).

    Raises
    ------
    StorageFormatError
        Not a checkpoint index, an unknown version, or wrong types in the index.
    IntegrityError
        A file or the index itself was changed after it was written, or is missing.
    UnsafePathError
        A path in the index leads outside ``dst``.
    """
    index = read_index(dst)
    return {
        "path": str(Path(dst).resolve()),
        "format_version": index["format_version"],
        "checked": index["checked"],
        "summary": index["summary"],
        "plan": index["plan"],
        "files": index["files"],
        "tensors": index["tensors"],
    }
