"""Every damaged-or-mistaken-input case of issue 8, run through the real `lplr` command.

Each case builds its own small input in a scratch folder, runs the command as a user would
(a subprocess of ``python -m lplr_dask.cli``), and records the exit status, the first line of
stderr, whether a traceback was printed, and whether every file the user had (inputs, an
existing OUTPUT, folders next to OUTPUT) is byte-identical afterwards. Prints a Markdown table.

    python benchmarks/integrity_cases.py [--workdir DIR] [--keep]

Not a test (tests/ asserts the same cases); this is the table of the closing note and README.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import zarr

from lplr_dask.datasets import low_rank_plus_noise

LPLR = [sys.executable, "-m", "lplr_dask.cli"]
LOCAL = ["--workers", "1", "--threads", "2", "--no-progress"]


def tree_digest(*roots) -> dict:
    """SHA-256 of every file below ``roots`` (and of each root that is a file)."""
    out = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            for f in sorted(root.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run(args, cwd=None, env=None):
    p = subprocess.run(
        [*LPLR, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    err = p.stderr.strip().splitlines()
    msg = next((ln for ln in err if "error" in ln.lower()), err[-1] if err else "")
    return p.returncode, msg, "Traceback" in p.stderr, p.stdout


def first_chunk(array_dir: Path) -> Path:
    return sorted(f for f in array_dir.rglob("*") if f.is_file() and f.name != "zarr.json")[0]


def write_plain(path, a, chunks):
    z = zarr.create_array(str(path), shape=a.shape, chunks=chunks, dtype=a.dtype)
    z[:] = a
    return path


def tiny_checkpoint(folder: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {
            "layer.weight": rng.standard_normal((128, 96)).astype(np.float32),
            "layer.bias": rng.standard_normal(96).astype(np.float32),
        },
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    opts = ap.parse_args()
    w = Path(opts.workdir or tempfile.mkdtemp(prefix="lplr-integrity-")).resolve()
    w.mkdir(parents=True, exist_ok=True)
    rows = []

    def case(name, args, *, keep=(), cwd=None, env=None, expect=2):
        before = tree_digest(*keep)
        code, msg, tb, out = run(args, cwd=cwd, env=env)
        after = tree_digest(*keep)
        ok = code == expect and not tb
        rows.append((name, " ".join(["lplr", *map(str, args)]), code, ok, before == after, msg))
        print(f"[{code}{'' if ok else ' UNEXPECTED'}] {name}", file=sys.stderr)
        return code, out

    good = w / "good.zarr"
    low_rank_plus_noise(good, (600, 400), rank=20, noise=0.05, chunks=(300, 200), seed=0)
    out = w / "out.zarr"
    code, _ = case("compress (reference)", ["compress", good, out, "--rank", 8, *LOCAL], expect=0)

    # 1. --overwrite of things lplr did not write
    proj = w / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("my notes")
    (proj / "data.npy").write_bytes(b"\x93NUMPY user data")
    case(
        "1 OUTPUT is a user folder",
        ["compress", good, proj, "--rank", 8, "--overwrite", *LOCAL],
        keep=[proj, good],
    )
    cwd = w / "cwd"
    cwd.mkdir()
    (cwd / "mine.txt").write_text("keep me")
    case(
        "1 OUTPUT is `.`",
        ["compress", good, ".", "--rank", 8, "--overwrite", *LOCAL],
        keep=[cwd],
        cwd=cwd,
    )
    case(
        "1 decompress DEST is a user folder",
        ["decompress", out, proj, "--overwrite", *LOCAL],
        keep=[proj, out],
    )
    ckpt = tiny_checkpoint(w / "ckpt")
    case(
        "1 checkpoint DST is a user folder",
        ["checkpoint", "compress", ckpt, proj, "--budget", 4, "--method", "nq", "--overwrite"],
        keep=[proj, ckpt],
    )
    cdst = w / "ckpt.lplr"
    case(
        "checkpoint compress (reference)",
        ["checkpoint", "compress", ckpt, cdst, "--budget", 4, "--method", "nq"],
        expect=0,
    )
    case(
        "1 checkpoint restore OUT is a user folder",
        ["checkpoint", "restore", cdst, proj, "--overwrite"],
        keep=[proj, cdst],
    )

    # 2. restore confined to OUT
    evil = w / "evil.lplr"
    subprocess.run(["cp", "-r", cdst, evil], check=True)
    index = json.loads((evil / "lplr_checkpoint.json").read_text())
    for t in index["tensors"]:
        t["shard"] = "../escaped.safetensors"
    (evil / "lplr_checkpoint.json").write_text(json.dumps(index))
    case(
        "2 restore with `../` in a shard name (index edited)",
        ["checkpoint", "restore", evil, w / "restored-evil"],
        keep=[w / "proj", evil],
    )
    # a crafted index: whoever edits it also recomputes its own checksum
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    index["index_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (evil / "lplr_checkpoint.json").write_text(json.dumps(index))
    case(
        "2 restore with `../` in a shard name (index resealed)",
        ["checkpoint", "restore", evil, w / "restored-evil"],
        keep=[w / "proj", evil],
    )
    rows[-1] = (
        *rows[-1][:4],
        rows[-1][4] and not (w / "escaped.safetensors").exists(),
        rows[-1][5],
    )

    # 3. damaged outputs
    def damaged(tag, mutate):
        d = w / f"dmg-{tag}.zarr"
        subprocess.run(["cp", "-r", out, d], check=True)
        mutate(d)
        return d

    def flip(d):
        f = first_chunk(d / "L" / "codes")
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))

    d = damaged("flip", flip)
    for cmd in (
        ["verify", d],
        ["decompress", d, w / "dense-flip", *LOCAL],
        ["error", good, d, *LOCAL],
    ):
        case(f"3 flipped byte in L/codes: {cmd[0]}", cmd, keep=[d, good])
    d = damaged("del", lambda d: first_chunk(d / "R" / "codes").unlink())
    for cmd in (["verify", d], ["decompress", d, w / "dense-del", *LOCAL]):
        case(f"3 deleted R/codes chunk: {cmd[0]}", cmd, keep=[d])
    d = damaged("delhi", lambda d: first_chunk(d / "R" / "hi").unlink())
    case("3 deleted R/hi chunk: error", ["error", good, d, *LOCAL], keep=[d, good])

    def edit_bits(d):
        meta = json.loads((d / "zarr.json").read_text())
        meta["attributes"]["lplr_dask"]["bits_left"] = 4
        (d / "zarr.json").write_text(json.dumps(meta))

    def edit_shape(d):
        meta = json.loads((d / "zarr.json").read_text())
        meta["attributes"]["lplr_dask"]["shape"] = [400, 600]
        (d / "zarr.json").write_text(json.dumps(meta))

    d = damaged("bits", edit_bits)
    case("3 edited `bits_left` attribute: info", ["info", d], keep=[d])
    d = damaged("shape", edit_shape)
    case(
        "3 edited `shape` attribute: decompress",
        ["decompress", d, w / "dense-shape", *LOCAL],
        keep=[d],
    )

    # 4. damaged inputs
    a = np.random.default_rng(1).standard_normal((600, 400)).astype(np.float32)
    holes = write_plain(w / "holes.zarr", a, (300, 200))
    first_chunk(holes).unlink()
    case(
        "4 INPUT chunk deleted",
        ["compress", holes, w / "o-holes", "--rank", 8, *LOCAL],
        keep=[holes],
    )
    case(
        "4 same, --allow-missing-chunks",
        ["compress", holes, w / "o-holes2", "--rank", 8, "--allow-missing-chunks", *LOCAL],
        keep=[holes],
        expect=0,
    )
    trunc = write_plain(w / "trunc.zarr", a, (300, 200))
    f = first_chunk(trunc)
    f.write_bytes(f.read_bytes()[:100])
    case(
        "4 INPUT chunk truncated",
        ["compress", trunc, w / "o-trunc", "--rank", 8, *LOCAL],
        keep=[trunc],
    )

    # 5. all-zero panel, every chunk written
    z = a.copy()
    z[:, :200] = 0
    zp = w / "zero.zarr"
    arr = zarr.create_array(
        str(zp),
        shape=z.shape,
        chunks=(300, 200),
        dtype=z.dtype,
        config={"write_empty_chunks": True},
    )
    arr[:] = z
    case(
        "5 all-zero panel",
        ["compress", zp, w / "o-zero", "--rank", 8, "--verify", *LOCAL],
        keep=[zp],
        expect=0,
    )

    # 8. other tracebacks of old
    other = write_plain(w / "other.zarr", a[:500], (250, 200))
    case("8 error: INPUT of another shape", ["error", other, out, *LOCAL], keep=[out, other])
    for tag, data in (("non-UTF-8", b"\xff\xfe{\x00"), ("truncated", b'{"shape": [6')):
        d = damaged(tag, lambda d, data=data: (d / "zarr.json").write_bytes(data))
        case(f"8 {tag} zarr.json: info", ["info", d], keep=[d])
    d = damaged("trunc-out", lambda d: first_chunk(d / "L" / "codes").write_bytes(b"\0" * 7))
    case("8 truncated output chunk: decompress", ["decompress", d, w / "dense-t", *LOCAL], keep=[d])
    blocker = w / "a-file"
    blocker.write_text("x")
    case(
        "8 OUTPUT under a regular file",
        ["compress", good, blocker / "o", "--rank", 8, *LOCAL],
        keep=[blocker],
    )

    # 9. honest bytes
    wide = w / "wide.zarr"
    low_rank_plus_noise(wide, (6000, 768), rank=40, noise=0.05, chunks=(1000, 768), seed=0)
    code, out_json = case(
        "9 6000×768 at --budget 1",
        ["compress", wide, w / "o-wide", "--budget", 1, "--json", *LOCAL],
        keep=[wide],
        expect=0,
    )
    if code == 0:
        r = json.loads(out_json.strip().splitlines()[-1])
        info = json.loads(run(["info", w / "o-wide", "--json"])[3].strip().splitlines()[-1])
        disk = info["bytes_on_disk"]
        note = (
            f"bits_per_entry {r['bits_per_entry']:.4f}; stored {r['stored_bytes']:,} B, "
            f"chunk payload on disk {disk['arrays']:,} B (+{disk.get('checksums', 0):,} B "
            f"checksums, +{disk['metadata']:,} B metadata)"
        )
        rows[-1] = (*rows[-1][:5], note)

    print("| case | command | exit | as expected, no traceback | user files intact | message |")
    print("|---|---|---|---|---|---|")
    for name, cmd, code, ok, same, msg in rows:
        cmd = cmd.replace(str(w) + "/", "")
        msg = msg.replace(str(w) + "/", "").replace("|", "\\|")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        print(
            f"| {name} | `{cmd}` | {code} | {'yes' if ok else 'NO'} | "
            f"{'yes' if same else 'NO'} | {msg} |"
        )
    if not opts.keep and not opts.workdir:
        subprocess.run(["rm", "-rf", str(w)], check=False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
