"""A synthetic LLM-shaped bfloat16 checkpoint of ≥ 10⁹ parameters, compressed at LLM scale.

Usage::

    python benchmarks/llm_checkpoint.py                      # 5 layers: 1.14 × 10⁹ parameters
    python benchmarks/llm_checkpoint.py --layers 2 --keep    # a small run (0.54 × 10⁹)
    python benchmarks/llm_checkpoint.py --layers 1 --hidden 512 --intermediate 1376 \\
        --vocab 4000                                         # a smoke test in seconds

What it does
------------
1. **Generates** a Llama-shaped sharded safetensors checkpoint in bfloat16 (tile by tile: one
   row slab of one tensor in memory at a time, streamed into the shard file): the embedding
   ``model.embed_tokens.weight`` (vocab × hidden, 32000 × 4096), and per decoder layer the
   attention projections ``q/k/v/o_proj`` (4096 × 4096), the MLP ``gate_proj`` and ``up_proj``
   (11008 × 4096) and ``down_proj`` (4096 × 11008), two RMSNorm weights (1-D, passed through),
   plus the final norm; one shard per ``--layers-per-shard`` layers, an index and a
   ``config.json``. The generator, per 2-D tensor W (n × d), with its own seeded streams:

   - a decaying spectrum: W_low = U · diag(σ) · Vᵀ with r = ``--spectrum-rank`` (256)
     directions, σ_k = k^(−0.7) (a power law, as measured on trained attention and MLP
     weights), U (n × r) drawn slab by slab, V (d × r) fixed for the tensor;
   - plus noise: i.i.d. Gaussian, carrying ``--noise-share`` (60 %) of the energy (trained
     LLM weights are far from low rank: their spectra decay slowly above a bulk);
   - heavy-tailed outlier channels: every input channel (column) j is scaled by c_j, with
     c_j = 1 for most and, for 1 % of channels, c_j ~ 1 + Pareto(α = 1.5) (capped at 50): the
     few large-magnitude input features of LLM activations show up as columns of large
     weights;
   - rescaled to a typical weight scale (entries of std 0.02) and cast to bfloat16.

2. **Compresses** it with :func:`lplr_dask.checkpoint.compress_checkpoint` at ``--budget``
   (4) bits per compressed parameter, ``--method auto``, on a LocalCluster of ``--workers``
   single-threaded processes with ``--memory-limit`` each: every tensor that fits a worker
   is one Dask task (its curve, then its one compression), read on the worker by name.

3. **Reports** wall time, compressed parameters per second, the peak RSS of every process
   (the driver, each worker and nanny: ``ru_maxrss``, the kernel's own high-water mark), the
   bits and errors, then **restores** the checkpoint and checks the round trip: every name,
   shape and dtype, passthrough tensors bit-identical, and every compressed tensor's error
   against the source equal to the recorded one (up to the bfloat16 cast).

Disk: about 2 GB per 10⁹ bfloat16 parameters for the source and as much for the restored copy,
plus the compressed checkpoint. The machine this was written on has 2 cores shared with other
work: run it once, and quote the load with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SLAB_ROWS = 512
PARETO_SHARE = 0.01


def _layer_shapes(hidden: int, intermediate: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden, hidden)),
        ("self_attn.v_proj.weight", (hidden, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("mlp.gate_proj.weight", (intermediate, hidden)),
        ("mlp.up_proj.weight", (intermediate, hidden)),
        ("mlp.down_proj.weight", (hidden, intermediate)),
        ("input_layernorm.weight", (hidden,)),
        ("post_attention_layernorm.weight", (hidden,)),
    ]


def _rng(seed: int, index: int, stream: int, slab: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, stream, slab)))


def tensor_writer(shape, *, seed: int, index: int, rank: int, noise_share: float):
    """A writer (``write(fh)``) that generates tensor ``index`` slab by slab in bfloat16."""
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    if len(shape) == 1:

        def write_1d(fh):
            v = 1.0 + 0.05 * _rng(seed, index, 0).standard_normal(shape[0])
            fh.write(v.astype(np.float32).astype(bf16).tobytes())

        return write_1d
    n, d = shape
    r = min(rank, n, d)
    sigma = np.arange(1, r + 1, dtype=np.float64) ** -0.7
    # Energy per row: low-rank part E‖u_i S Vᵀ‖² = Σσ² (U, V standard normal, V scaled by
    # 1/√d); noise std τ with d·τ² = share/(1 − share) · Σσ².
    low_energy = float(np.sum(sigma**2))
    tau = np.sqrt(noise_share / (1.0 - noise_share) * low_energy / d)
    rng = _rng(seed, index, 1)
    v = (rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32)
    svt = (sigma[:, None] * v.T).astype(np.float32)  # r × d
    cols = np.ones(d, np.float32)
    hot = rng.choice(d, size=max(1, int(PARETO_SHARE * d)), replace=False)
    cols[hot] = np.minimum(1.0 + rng.pareto(1.5, size=hot.size), 50.0)
    # Rescale so that entries have std ≈ 0.02 (channel scales included).
    scale = 0.02 / np.sqrt((low_energy / d + tau**2) * float(np.mean(cols**2)))

    def write(fh):
        for s, r0 in enumerate(range(0, n, SLAB_ROWS)):
            rows = min(SLAB_ROWS, n - r0)
            g = _rng(seed, index, 2, s)
            u = g.standard_normal((rows, r), dtype=np.float32)
            slab = u @ svt
            slab += tau * g.standard_normal((rows, d), dtype=np.float32)
            slab *= cols * scale
            fh.write(slab.astype(bf16).tobytes())

    return write


def generate(
    root: Path,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    layers_per_shard: int,
    seed: int,
    rank: int,
    noise_share: float,
) -> int:
    """Write the checkpoint under ``root``; returns the number of parameters."""
    from lplr_dask.checkpoint.safetensors_io import write_safetensors

    root.mkdir(parents=True)
    groups: list[list[tuple[str, tuple]]] = [[("model.embed_tokens.weight", (vocab, hidden))]]
    for i in range(layers):
        if i % layers_per_shard == 0 and i > 0:
            groups.append([])
        groups[-1] += [(f"model.layers.{i}.{k}", s) for k, s in _layer_shapes(hidden, intermediate)]
    groups[-1].append(("model.norm.weight", (hidden,)))
    total_bytes, params, index = 0, 0, 0
    weight_map = {}
    for g, items in enumerate(groups):
        shard = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        entries = []
        for name, shape in items:
            writer = tensor_writer(
                shape, seed=seed, index=index, rank=rank, noise_share=noise_share
            )
            entries.append((name, "BF16", list(shape), writer))
            weight_map[name] = shard
            params += int(np.prod(shape))
            total_bytes += 2 * int(np.prod(shape))
            index += 1
        t0 = time.perf_counter()
        write_safetensors(root / shard, entries, {"format": "pt"})
        print(f"  wrote {shard} ({len(items)} tensors) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)  # fmt: skip
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1)
    )
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": intermediate,
                "num_hidden_layers": layers,
                "vocab_size": vocab,
                "torch_dtype": "bfloat16",
                "note": "synthetic weights from benchmarks/llm_checkpoint.py",
            },
            indent=1,
        )
    )
    return params


def _maxrss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_round_trip(src: Path, restored: Path, rows: dict) -> dict:
    """Every tensor of ``restored`` against ``src``, one tensor at a time."""
    from safetensors import safe_open

    def tensors(root):
        out = {}
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), framework="np") as h:
                for k in h.keys():
                    out[k] = f
        return out

    a, b = tensors(src), tensors(restored)
    assert set(a) == set(b), "restored names differ"
    worst = 0.0
    for name, f in a.items():
        with safe_open(str(f), framework="np") as h, safe_open(str(b[name]), framework="np") as g:
            sa, sb = h.get_slice(name), g.get_slice(name)
            assert sa.get_shape() == sb.get_shape() and sa.get_dtype() == sb.get_dtype(), name
            x, y = h.get_tensor(name), g.get_tensor(name)
        row = rows[name]
        if row["storage"] != "compressed":
            assert x.tobytes() == y.tobytes(), f"{name}: passthrough is not bit-identical"
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        rel = float(np.linalg.norm(x64 - y64) / np.linalg.norm(x64))
        # The restored tensor is the float32 reconstruction cast to bfloat16: at most half an
        # ulp (2^-9 relative) per entry on top of the recorded error.
        gap = abs(rel - row["rel_fro_error"])
        worst = max(worst, gap)
        assert gap <= 2**-9 + 1e-3, (name, rel, row["rel_fro_error"])
    return {"tensors": len(a), "worst_error_gap": worst}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=5, help="decoder layers (5: 1.14e9 params)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers-per-shard", type=int, default=2)
    p.add_argument("--spectrum-rank", type=int, default=256)
    p.add_argument("--noise-share", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=4.0)
    p.add_argument("--method", default="auto")
    p.add_argument(
        "--candidate-budgets",
        type=float,
        nargs="+",
        help="auto: budgets of the low-rank points of each curve (default: --budget alone)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="6GiB", help="per worker")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--no-restore", action="store_true", help="skip the restore round trip")
    args = p.parse_args(argv)

    from lplr_dask.checkpoint import compress_checkpoint, restore_checkpoint
    from lplr_dask.cluster import dask_client
    from lplr_dask.core.params import DEFAULT_QUANTIZERS

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lplr-llm-"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst, out = work / "src", work / "compressed", work / "restored"
    figures: dict = {}
    stack = contextlib.ExitStack()
    try:
        if not src.exists():
            t0 = time.perf_counter()
            params = generate(
                src,
                layers=args.layers,
                hidden=args.hidden,
                intermediate=args.intermediate,
                vocab=args.vocab,
                layers_per_shard=args.layers_per_shard,
                seed=args.seed,
                rank=args.spectrum_rank,
                noise_share=args.noise_share,
            )
            figures["generate_seconds"] = time.perf_counter() - t0
            print(f"generated {params:,} parameters in {figures['generate_seconds']:.0f} s",
                  file=sys.stderr)  # fmt: skip
        client = stack.enter_context(
            dask_client(
                "local",
                n_workers=args.workers,
                threads_per_worker=1,
                memory_limit=args.memory_limit,
                dashboard_address=None,
            )
        )
        t_start = time.perf_counter()
        events = []

        def progress(ev):
            events.append(ev)
            print(
                f"[{time.perf_counter() - t_start:7.1f} s] {ev['step']} {ev['done']}/"
                f"{ev['total']} {ev['name']} ({ev['path']}, {ev['seconds']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

        with open("/proc/loadavg") as fh:
            load_before = fh.read().split()[:3]
        t0 = time.perf_counter()
        res = compress_checkpoint(
            src, dst, budget=args.budget, method=args.method, work_dir=work / "scratch",
            candidate_budgets=tuple(args.candidate_budgets or (args.budget,)),
            overwrite=True, on_tensor=progress,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        with open("/proc/loadavg") as fh:
            load_after = fh.read().split()[:3]
        rss = {"driver": _maxrss()}
        for addr, v in client.run(_maxrss).items():
            rss[f"worker {addr}"] = v
        with contextlib.suppress(Exception):
            for addr, v in client.run(_maxrss, nanny=True).items():
                rss[f"nanny {addr}"] = v
        shutil.rmtree(work / "scratch", ignore_errors=True)
        index = json.loads((dst / "lplr_checkpoint.json").read_text())
        rows = {r["name"]: r for r in res.tensors}
        paths: dict[str, int] = {}
        for ev in events:
            if ev["step"] == "compress":
                paths[ev["path"]] = paths.get(ev["path"], 0) + 1
        figures.update(
            parameters=res.total_parameters,
            compressed_parameters=res.compressed_parameters,
            wall_seconds=wall,
            params_per_second=res.compressed_parameters / wall,
            bits_per_parameter=res.bits_per_parameter,
            total_error2=res.total_error2,
            allocation=index.get("allocation"),
            peak_rss_bytes=rss,
            load_average_before=load_before,
            load_average_after=load_after,
            quantizers=DEFAULT_QUANTIZERS,
            paths=paths,
            step_seconds={
                step: sum(e["seconds"] for e in events if e["step"] == step)
                for step in ("estimate", "compress")
            },
        )
        if not args.no_restore:
            t0 = time.perf_counter()
            restore_checkpoint(dst, out, overwrite=True)
            figures["restore_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            figures["round_trip"] = check_round_trip(src, out, rows)
            figures["check_seconds"] = time.perf_counter() - t0
        print(f"\n## Synthetic LLM checkpoint: {args.layers} layers, bfloat16\n")
        print(
            f"{res.total_parameters:,} parameters ({res.compressed_parameters:,} compressed) "
            f"at budget {args.budget:g}, method {args.method}, LocalCluster of "
            f"{args.workers} single-threaded workers with {args.memory_limit} each"
        )
        print(f"load average before/after: {' '.join(load_before)} / {' '.join(load_after)}")
        print(f"- wall: {wall:.1f} s; {figures['params_per_second'] / 1e6:.2f} M parameters/s")
        print(
            f"- bits per compressed parameter {res.bits_per_parameter:.4f}; total relative "
            f"error {np.sqrt(res.total_error2 / sum(_norm2(r) for r in res.tensors)):.4f}"
        )
        methods: dict[str, int] = {}
        for r in res.tensors:
            if r["storage"] == "compressed":
                methods[r["method"]] = methods.get(r["method"], 0) + 1
        print(f"- methods chosen: {methods}; default quantizers {DEFAULT_QUANTIZERS}")
        print(
            f"- compressions per path: {paths}; task seconds summed over tensors: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in figures["step_seconds"].items())
        )
        if figures.get("allocation"):
            a = figures["allocation"]
            base = ", ".join(
                f"{m} {v['estimated_objective']:.4g}" for m, v in a["baselines"].items()
            )
            print(
                "- auto estimated mean squared relative error per parameter "
                f"{a['estimated_objective']:.4g} (real {res.mean_rel_error2:.4g}); single "
                f"methods estimated: {base}"
            )
        print("- peak RSS: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in rss.items()))
        if "round_trip" in figures:
            rt = figures["round_trip"]
            print(
                f"- restore {figures['restore_seconds']:.1f} s; round trip checked on "
                f"{rt['tensors']} tensors in {figures['check_seconds']:.1f} s (worst gap between "
                f"recorded and restored error {rt['worst_error_gap']:.2e})"
            )
        print("\n" + json.dumps(figures, default=str))
    finally:
        stack.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _norm2(row) -> float:
    if row["storage"] != "compressed" or row["rel_fro_error"] <= 0:
        return 0.0
    return row["error2"] / row["rel_fro_error"] ** 2


if __name__ == "__main__":
    sys.exit(main())
