"""Compare every compression method of lplr_dask at a fixed budget of bits per entry.

Usage::

    /work/venv/bin/python benchmarks/compare_methods.py                 # 2048×1024, seed 0
    /work/venv/bin/python benchmarks/compare_methods.py --sizes 1024x512,2048x1024 --seed 3

Test matrices
-------------
Both are float32, written as Zarr v3 arrays (default chunks 512 × 512) under ``--workdir``
and fully determined by ``--seed`` and the size n × d.

``low-rank+noise``
    A = U diag(s) Vᵀ + E with U (n × 64), V (d × 64) random orthonormal (QR of Gaussian
    matrices), a geometrically decaying spectrum s_i = 10 · 0.9^i (i = 0 … 63), and Gaussian
    noise E rescaled so that ‖E‖_F = 5 % of ‖A‖_F exactly. The best rank-m approximation
    therefore has a relative error of at least about 0.05 for every m ≤ 64.

``outlier-heavy``
    The same construction (new random draws), then, in this order: 0.1 % of the entries
    (chosen at random) get an added Student-t (df = 2) value times the RMS entry of the
    matrix (heavy-tailed spikes); 1 % of the columns are multiplied by 50 and 1 % of the rows
    by 10 (outlier channels, as in LLM weight matrices). The scaled columns dominate ‖A‖_F.

Methods and budgets
-------------------
For each budget b ∈ {1, 2, 4} bits per entry every method below runs
``compress(A, out, method=..., budget=b)``, which picks its own rank and bit widths so that
the stored bits per entry (codes plus float32 scales) are ≤ b:

- ``lplr``: the package's LPLR (orthonormalized sketch, B and B′ searched in 1–8);
- ``paper``: the reference Algorithm 1 (B = B′ = 8, per-matrix min–max, largest rank);
- ``nq``: A quantized directly, group-wise scales (group_size 128);
- ``nq-tensor``: A quantized directly, one scale for the whole matrix (group_size 0);
- ``dsvd``: quantized randomized SVD factors;
- ``lplr-svd``: the SVD-based LPLR of the paper.

A configuration that cannot fit the budget is reported as ``infeasible`` with the minimum
bits per entry it needs (for nq: 1-bit codes plus scales, from the library's own bit
accounting; otherwise as stated by the library's ParameterError). ``nq-tensor`` at b = 1 is
infeasible under the strict rule (1-bit codes plus one scale exceed 1 bit per entry), so it
is also run once with ``bits_matrix=1`` and no budget, and shown as a separate row
``nq-tensor@1bit (out of budget)`` with its actual bits per entry. That row never wins.

Every reported error is cross-checked against ``lplr_dask.storage.reader.relative_error`` (an
independent reconstruction of every tile from the stored factors); the largest relative
discrepancy is printed and must stay below 1e-4.

Reading the tables
------------------
One markdown table per matrix: rows are methods, columns are budgets, and each cell is
``err (m=rank, B/B′, bpe)``: the relative Frobenius error ‖A − Â‖_F / ‖A‖_F, the rank, the
bit widths of L and R (for ``nq`` methods ``Q=bits`` of the quantized matrix), and the bits
per entry actually stored. Lower err is better; the best in-budget cell of each column is in
bold. After the tables the winner at each budget and the lplr-versus-paper comparison are
stated; the last line of the output is one JSON object with every number.

Exit status: 0 when everything ran, all checks agree and lplr beats paper everywhere;
1 when lplr does not beat paper somewhere; 2 when a method crashed or a cross-check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import traceback
from pathlib import Path

import dask
import numpy as np
import zarr

from lplr_dask import ParameterError, compress
from lplr_dask.core.params import CompressionOptions
from lplr_dask.storage.reader import relative_error

BUDGETS = (1.0, 2.0, 4.0)
# (label, method, extra keyword arguments of compress)
METHODS = (
    ("lplr", "lplr", {}),
    ("paper", "paper", {}),
    ("nq", "nq", {"group_size": 128}),
    ("nq-tensor", "nq", {"group_size": 0}),
    ("dsvd", "dsvd", {}),
    ("lplr-svd", "lplr-svd", {}),
)
REFERENCE_LABEL = "nq-tensor@1bit (out of budget)"
CHECK_RTOL = 1e-4
RANK = 64
NOISE_FRACTION = 0.05


# ----------------------------------------------------------------------------- test matrices


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))[None, :]


def low_rank_plus_noise(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """U diag(10·0.9^i) Vᵀ (rank 64) plus Gaussian noise with ‖E‖_F = 5 % of ‖A‖_F."""
    k = min(RANK, n, d)
    s = 10.0 * 0.9 ** np.arange(k)
    low = (_orthonormal(rng, n, k) * s[None, :]) @ _orthonormal(rng, d, k).T
    noise = rng.standard_normal((n, d))
    # ‖A‖² ≈ ‖low‖² + ‖E‖² (independent), so ‖E‖ = f‖A‖ needs ‖E‖² = f²/(1 − f²)·‖low‖².
    target = NOISE_FRACTION / math.sqrt(1.0 - NOISE_FRACTION**2) * np.linalg.norm(low)
    noise *= target / np.linalg.norm(noise)
    return low + noise


def outlier_heavy(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """low_rank_plus_noise, plus Student-t spikes in 0.1 % of entries, 1 % of the columns ×50
    and 1 % of the rows ×10."""
    a = low_rank_plus_noise(rng, n, d)
    rms = float(np.sqrt(np.mean(a * a)))
    n_spikes = max(1, (n * d) // 1000)
    flat = rng.choice(n * d, size=n_spikes, replace=False)
    a.reshape(-1)[flat] += rms * rng.standard_t(2.0, size=n_spikes)
    cols = rng.choice(d, size=max(1, d // 100), replace=False)
    rows = rng.choice(n, size=max(1, n // 100), replace=False)
    a[:, cols] *= 50.0
    a[rows, :] *= 10.0
    return a


MATRICES = (("low-rank+noise", low_rank_plus_noise), ("outlier-heavy", outlier_heavy))


def write_matrix(path: Path, a: np.ndarray, chunks: tuple[int, int]) -> None:
    arr = zarr.create_array(
        store=str(path),
        shape=a.shape,
        chunks=chunks,
        dtype="float32",
        overwrite=True,
        zarr_format=3,
    )
    arr[...] = a.astype(np.float32)


# ----------------------------------------------------------------------------- running


def _min_bits(message: str, src: Path, method: str, kwargs: dict) -> float | None:
    """Smallest bits per entry of ``method``: exact for nq (1-bit codes plus scales, from the
    library's own accounting), otherwise parsed from the error message (4 decimals)."""
    if method == "nq":
        shape = zarr.open_array(str(src), mode="r").shape
        opts = CompressionOptions(
            method="nq", bits_matrix=1, group_size=kwargs.get("group_size", 128)
        )
        cfg = opts.resolve(shape)
        return cfg.bits_per_entry(shape)
    m = re.search(r"needs ([0-9.]+) bits per entry", message)
    return float(m.group(1)) if m else None


def run_one(src: Path, out: Path, *, label, method, kwargs, budget, seed) -> dict:
    """One compress call plus the independent error check; never raises."""
    row = {"method": label, "budget": budget}
    t0 = time.perf_counter()
    try:
        if budget is None:
            res = compress(str(src), str(out), method=method, seed=seed, overwrite=True, **kwargs)
        else:
            res = compress(
                str(src),
                str(out),
                method=method,
                budget=budget,
                seed=seed,
                overwrite=True,
                **kwargs,
            )
    except ParameterError as exc:
        row.update(
            status="infeasible",
            reason=str(exc),
            min_bits_per_entry=_min_bits(str(exc), src, method, kwargs),
            seconds=time.perf_counter() - t0,
        )
        return row
    except Exception as exc:
        row.update(
            status="crashed",
            reason=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            seconds=time.perf_counter() - t0,
        )
        return row
    seconds = time.perf_counter() - t0
    row.update(
        status="ok",
        rank=res.rank,
        bits_left=res.bits_left,
        bits_right=res.bits_right,
        bits_matrix=res.bits_matrix,
        bits_per_entry=res.bits_per_entry,
        stored_bytes=res.stored_bytes,
        rel_fro_error=res.rel_fro_error,
        seconds=seconds,
    )
    try:
        independent = relative_error(str(src), str(out))
    except Exception as exc:
        row.update(
            status="crashed",
            reason=f"relative_error: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
        )
        return row
    disc = abs(independent - res.rel_fro_error) / max(abs(independent), 1e-300)
    row.update(independent_rel_error=independent, check_discrepancy=disc)
    if budget is not None and res.bits_per_entry > budget:
        row["budget_violation"] = True
    return row


def run_matrix(src: Path, outdir: Path, seed: int, log) -> list[dict]:
    rows = []
    for budget in BUDGETS:
        for label, method, kwargs in METHODS:
            out = outdir / f"{label}-b{budget:g}.zarr"
            row = run_one(
                src, out, label=label, method=method, kwargs=kwargs, budget=budget, seed=seed
            )
            log(_log_line(row))
            rows.append(row)
    ref = run_one(
        src,
        outdir / "nq-tensor-ref1.zarr",
        label=REFERENCE_LABEL,
        method="nq",
        kwargs={"group_size": 0, "bits_matrix": 1},
        budget=None,
        seed=seed,
    )
    ref["budget"] = 1.0  # shown in the budget-1 column, out of budget
    ref["out_of_budget_reference"] = True
    log(_log_line(ref))
    rows.append(ref)
    return rows


def _log_line(row: dict) -> str:
    head = f"  {row['method']:<32} budget {row['budget']:g}: "
    if row["status"] == "ok":
        return (
            head + f"err {row['rel_fro_error']:.5f} rank {row['rank']} bpe "
            f"{row['bits_per_entry']:.4f} check {row['check_discrepancy']:.1e} "
            f"({row['seconds']:.1f} s)"
        )
    return head + f"{row['status']}: {row['reason'].splitlines()[0][:160]}"


# ----------------------------------------------------------------------------- reporting


def _cell(row: dict | None, bold: bool) -> str:
    if row is None:
        return "–"
    if row["status"] == "infeasible":
        mb = row.get("min_bits_per_entry")
        return f"infeasible (needs ≥ {mb:.6g} bpe)" if mb is not None else "infeasible"
    if row["status"] == "crashed":
        return f"CRASHED ({row['reason'].splitlines()[0][:60]})"
    if row["rank"] is None:
        bits = f"Q={row['bits_matrix']}"
        rank = "m=–"
    else:
        bits = f"{row['bits_left']}/{row['bits_right']}"
        rank = f"m={row['rank']}"
    err = f"{row['rel_fro_error']:.4f}"
    if bold:
        err = f"**{err}**"
    flag = " ⚠ over budget" if row.get("budget_violation") else ""
    return f"{err} ({rank}, {bits}, {row['bits_per_entry']:.3f}){flag}"


def _in_budget_ok(row: dict) -> bool:
    return (
        row["status"] == "ok"
        and not row.get("out_of_budget_reference")
        and not row.get("budget_violation")
    )


def winners(rows: list[dict]) -> dict[float, dict]:
    best = {}
    for b in BUDGETS:
        ok = [r for r in rows if r["budget"] == b and _in_budget_ok(r)]
        if ok:
            best[b] = min(ok, key=lambda r: r["rel_fro_error"])
    return best


def table(name: str, rows: list[dict]) -> str:
    best = winners(rows)
    labels = [m[0] for m in METHODS] + [REFERENCE_LABEL]
    lines = [
        f"### {name}",
        "",
        "| method | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |",
        "|---|" + "---|" * len(BUDGETS),
    ]
    for label in labels:
        cells = []
        for b in BUDGETS:
            row = next((r for r in rows if r["method"] == label and r["budget"] == b), None)
            cells.append(_cell(row, bold=row is not None and best.get(b) is row))
        if label == REFERENCE_LABEL:
            cells[1:] = ["–"] * (len(BUDGETS) - 1)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(name: str, rows: list[dict]) -> tuple[list[str], bool]:
    """Sentences on the winners and on lplr versus paper; second value: lplr < paper at all b."""
    out, lplr_wins_all = [], True
    best = winners(rows)
    for b in BUDGETS:
        w = best.get(b)
        if w is None:
            out.append(f"- {name}, budget {b:g}: no method produced an in-budget result.")
        else:
            ranked = sorted(
                (r for r in rows if r["budget"] == b and _in_budget_ok(r)),
                key=lambda r: r["rel_fro_error"],
            )
            runner = (
                f"; runner-up {ranked[1]['method']} ({ranked[1]['rel_fro_error']:.4f})"
                if len(ranked) > 1
                else ""
            )
            out.append(
                f"- {name}, budget {b:g}: winner **{w['method']}** "
                f"(err {w['rel_fro_error']:.4f}){runner}."
            )
        lp = next(r for r in rows if r["method"] == "lplr" and r["budget"] == b)
        pa = next(r for r in rows if r["method"] == "paper" and r["budget"] == b)
        if lp["status"] == "ok" and pa["status"] == "ok":
            ratio = lp["rel_fro_error"] / pa["rel_fro_error"]
            beats = lp["rel_fro_error"] < pa["rel_fro_error"]
            out.append(
                f"  lplr {lp['rel_fro_error']:.4f} vs paper {pa['rel_fro_error']:.4f}: "
                f"{'lplr beats paper' if beats else 'lplr does NOT beat paper'} "
                f"(ratio {ratio:.3f})."
            )
        else:
            beats = lp["status"] == "ok" and pa["status"] == "infeasible"
            out.append(
                f"  lplr {lp['status']} vs paper {pa['status']}: "
                f"{'lplr beats paper (paper infeasible)' if beats else 'no comparison'}."
            )
        lplr_wins_all &= beats
    return out, lplr_wins_all


def parse_size(text: str) -> tuple[int, int]:
    try:
        n, d = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size {text!r} is not NxD (e.g. 2048x1024)") from exc
    if n < 2 or d < 2:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small")
    return n, d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Compare lplr, paper, nq (group-wise and per-tensor), dsvd and lplr-svd "
        "at budgets of 1, 2 and 4 bits per entry on two seeded test matrices.",
        epilog="See the module docstring for the matrices and how to read the tables.",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/lplr-compare"),
        help="where test matrices and outputs are written (default: %(default)s)",
    )
    p.add_argument(
        "--sizes",
        default="2048x1024",
        help="comma-separated matrix sizes NxD (default: %(default)s)",
    )
    p.add_argument(
        "--chunks",
        type=parse_size,
        default=(512, 512),
        help="Zarr chunk shape RxC of the test matrices (default: 512x512)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the test matrices and of compress (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads of the Dask scheduler (default: %(default)s)",
    )
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t_total = time.perf_counter()
    report = {
        "seed": args.seed,
        "budgets": list(BUDGETS),
        "chunks": list(args.chunks),
        "check_rtol": CHECK_RTOL,
        "results": [],
    }
    tables, sentences = [], []
    lplr_all, failures, max_disc = True, [], 0.0
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        for n, d in sizes:
            for idx, (name, build) in enumerate(MATRICES):
                rng = np.random.default_rng(np.random.SeedSequence(args.seed, spawn_key=(idx,)))
                wd = args.workdir / f"{n}x{d}-seed{args.seed}" / name
                wd.mkdir(parents=True, exist_ok=True)
                src = wd / "A.zarr"
                a = build(rng, n, d)
                write_matrix(src, a, args.chunks)
                del a
                title = f"{name} ({n}×{d}, seed {args.seed})"
                log(f"{title}:")
                t0 = time.perf_counter()
                rows = run_matrix(src, wd, args.seed, log)
                for r in rows:
                    if r["status"] == "crashed":
                        failures.append(f"{title} {r['method']} b={r['budget']:g}: {r['reason']}")
                    if "check_discrepancy" in r:
                        max_disc = max(max_disc, r["check_discrepancy"])
                        if r["check_discrepancy"] > CHECK_RTOL:
                            failures.append(
                                f"{title} {r['method']} b={r['budget']:g}: check "
                                f"discrepancy {r['check_discrepancy']:.2e}"
                            )
                    if r.get("budget_violation"):
                        failures.append(
                            f"{title} {r['method']} b={r['budget']:g}: "
                            f"bits_per_entry {r['bits_per_entry']} over budget"
                        )
                tables.append(table(title, rows))
                s, ok = verdicts(title, rows)
                sentences += s
                lplr_all &= ok
                report["results"].append(
                    {
                        "matrix": name,
                        "shape": [n, d],
                        "rows": rows,
                        "seconds": time.perf_counter() - t0,
                    }
                )
    total = time.perf_counter() - t_total

    print("\n\n".join(tables))
    print()
    print("Winners (lowest in-budget relative Frobenius error) and lplr versus paper:")
    print("\n".join(sentences))
    print()
    print(
        f"Independent check (reader.relative_error vs CompressionResult.rel_fro_error): "
        f"max relative discrepancy {max_disc:.2e} (tolerance {CHECK_RTOL:g})."
    )
    print(f"lplr beats paper at every budget and matrix: {'yes' if lplr_all else 'NO'}.")
    for f in failures:
        print(f"FAILURE: {f}")
    for res in report["results"]:
        for r in res["rows"]:
            if r["status"] == "crashed":
                print(r.get("traceback", ""), file=sys.stderr)
    print(f"Total runtime {total:.1f} s.")
    report.update(
        max_check_discrepancy=max_disc,
        lplr_beats_paper_everywhere=lplr_all,
        failures=failures,
        seconds=total,
    )
    print(json.dumps(report, separators=(",", ":"), default=float))
    if failures:
        return 2
    return 0 if lplr_all else 1


if __name__ == "__main__":
    sys.exit(main())
