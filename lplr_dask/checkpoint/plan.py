"""The checkpoint plan: scan the source (headers only), classify every tensor and choose its
candidate configurations. JSON-serialisable, no tensor data read."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lplr_dask.checkpoint.index import (
    DTYPES,
    HF_INDEX,
    check_shard_name,
)
from lplr_dask.checkpoint.policy import (
    AUTO,
    CHECKPOINT_METHODS,
    DEFAULT_CANDIDATE_BUDGETS,
    TensorPolicy,
    candidate_set,
    classify,
    min_bits,
    override_candidate,
)
from lplr_dask.checkpoint.restore import RESTORED_MARKER
from lplr_dask.checkpoint.safetensors_io import is_pickle, read_header
from lplr_dask.errors import (
    InputError,
    ParameterError,
)

__all__ = ["CheckpointPlan", "TensorEntry", "plan_checkpoint"]


def _scan_source(src) -> dict:
    """Validate a checkpoint directory and read every header. No output is created.

    Returns {"dir", "files": {shard: Header}, "weight_map": {name: shard}, "index_metadata",
    "extra_files": [relative paths]}.
    """
    root = Path(src)
    if not root.exists():
        raise InputError(f"SRC {src} does not exist. Give a checkpoint directory.")
    if root.is_file():
        raise InputError(
            f"SRC {src} is a file; give the checkpoint directory that holds it (with config.json "
            "and the tokenizer files)."
        )
    top = sorted(p for p in root.iterdir() if p.is_file())
    st_files = [p for p in top if p.suffix == ".safetensors"]
    pickles = [p.name for p in top if is_pickle(p)]
    if not st_files:
        if pickles:
            raise InputError(
                f"SRC {src} holds only pickle-based weights ({', '.join(pickles[:3])}); lplr-dask "
                "reads safetensors only (pickles can run code when loaded). Convert once with "
                "transformers: AutoModel.from_pretrained(SRC).save_pretrained(NEW_DIR, "
                "safe_serialization=True), then compress NEW_DIR."
            )
        raise InputError(
            f"SRC {src} holds no .safetensors file; give a Hugging Face-style checkpoint "
            "directory (model.safetensors, or shards with model.safetensors.index.json)."
        )
    index_path = root / HF_INDEX
    index_metadata: dict = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
            index_metadata = dict(index.get("metadata") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(
                f"{index_path} is not a valid safetensors index (it needs a 'weight_map' of "
                f"tensor name → shard file, and an optional 'metadata' object): {exc}"
            ) from exc
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InputError(
                    f"{index_path}: weight_map[{name!r}] is {shard!r}, not a shard file name. "
                    "Fix the index."
                )
            check_shard_name(
                shard,
                where=f"{index_path}: weight_map[{name!r}]",
                fix="Fix the index: shards are files beside it, named by their file name only.",
            )
        total = index_metadata.get("total_size")
        if total is not None:
            try:
                ok = not isinstance(total, bool) and int(total) == float(total)
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise InputError(
                    f"{index_path}: metadata.total_size is {total!r}, not an integer number of "
                    "bytes. Fix the index."
                )
            total = int(total)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise InputError(
                f"{index_path} names shard file(s) that do not exist: {', '.join(missing)}. "
                "Copy the missing shards into SRC or fix the index."
            )
        unlisted = [p.name for p in st_files if p.name not in shards]
        if unlisted:
            raise InputError(
                f"SRC {src} holds safetensors file(s) the index does not reference: "
                f"{', '.join(unlisted)}. Remove them or add their tensors to {HF_INDEX}."
            )
    else:
        if len(st_files) > 1:
            raise InputError(
                f"SRC {src} holds {len(st_files)} safetensors files but no {HF_INDEX}; a sharded "
                "checkpoint needs its index. Write the index (weight_map: tensor → file) or "
                "keep one model.safetensors."
            )
        weight_map = None
        shards = [st_files[0].name]
    headers = {s: read_header(root / s) for s in shards}
    found: dict[str, str] = {}
    for s, h in headers.items():
        for name in h.tensors:
            if name in found:
                raise InputError(
                    f"tensor {name!r} is stored twice, in {found[name]} and {s}; keep one copy."
                )
            found[name] = s
    if weight_map is not None:
        unlisted = sorted(n for n in found if n not in weight_map)
        if unlisted:
            raise InputError(
                f"shard {found[unlisted[0]]} holds tensor(s) the index does not list: "
                f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}. Fix "
                f"{HF_INDEX} (its weight_map must name every tensor)."
            )
        wrong = sorted(n for n, s in weight_map.items() if found.get(n) != s)
        if wrong:
            n = wrong[0]
            where = f"it is in {found[n]}" if n in found else "no shard holds it"
            raise InputError(
                f"{HF_INDEX} lists tensor {n!r} in {weight_map[n]}, but {where} "
                f"({len(wrong)} such tensor(s)). Fix the index or restore the missing shard."
            )
        actual = sum(
            math.prod(i["shape"]) * DTYPES[i["dtype"]][0]
            for h in headers.values()
            for i in h.tensors.values()
        )
        if total is not None and total != actual:
            raise InputError(
                f"{HF_INDEX} says total_size={total} bytes but the shards' headers add up to "
                f"{actual}: the index does not describe these shards (shapes or dtypes "
                "disagree). Re-export the checkpoint or fix the index."
            )
    else:
        weight_map = dict(found)
    extra = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        hidden = rel.parts[0].startswith(".") and rel.parts[0] != ".gitattributes"
        weights = (p.suffix == ".safetensors" and len(rel.parts) == 1) or str(rel) == HF_INDEX
        if not p.is_file() or hidden or weights:
            continue
        if is_pickle(p):
            continue  # stale pickled weights are not carried over
        if str(rel) == RESTORED_MARKER:
            continue  # the marker of an earlier restore describes that restore, not the model
        extra.append(str(rel))
    return {
        "dir": root.resolve(),
        "files": headers,
        "weight_map": weight_map,
        "index_metadata": index_metadata,
        "extra_files": extra,
        "sharded": index_path.is_file(),
    }


@dataclass
class TensorEntry:
    """The decision for one tensor of the source checkpoint (JSON-serialisable).

    ``action`` is ``"compress"`` or ``"passthrough"`` (``reason`` says why). A compressed
    tensor of a single method or an override has one candidate; under ``auto`` it has none:
    its candidates are the planner's curve (:func:`~lplr_dask.checkpoint.measure.estimate_tensor`)
    and the allocation picks one.
    """

    name: str
    shape: list
    dtype: str
    shard: str
    file: str
    action: str
    reason: str
    candidates: list = field(default_factory=list)
    seed: int = 0
    baselines: dict = field(default_factory=dict)
    """Unused since the planner's curves (kept for plans written by earlier versions)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckpointPlan:
    """Per-tensor decisions for compressing one checkpoint; :meth:`to_dict` is JSON."""

    source: str
    budget: float
    method: str
    seed: int
    group_size: int
    policy: dict
    candidate_budgets: list
    sharded: bool
    index_metadata: dict
    shard_metadata: dict
    extra_files: list
    entries: list

    def to_dict(self) -> dict:
        d = asdict(self)
        d["entries"] = [e.to_dict() if isinstance(e, TensorEntry) else e for e in self.entries]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> CheckpointPlan:
        d = dict(d)
        d["entries"] = [e if isinstance(e, TensorEntry) else TensorEntry(**e) for e in d["entries"]]
        return cls(**d)

    def entry(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def compressed(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.action == "compress"]


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ParameterError(
            f"budget={budget!r} must be a positive number of bits per compressed parameter, "
            "such as 3 or 4."
        )


def plan_checkpoint(
    src,
    *,
    budget: float,
    method: str = AUTO,
    policy: TensorPolicy | None = None,
    candidate_budgets: Sequence[float] = DEFAULT_CANDIDATE_BUDGETS,
    seed: int = 0,
    group_size: int = 128,
) -> CheckpointPlan:
    """Validate a checkpoint and decide, per tensor, what to measure or pass through.

    Reads only the safetensors headers and the index.

    Parameters
    ----------
    src : str or path
        The checkpoint directory.
    budget : float
        Bits per compressed parameter, over all compressed tensors together (``auto``
        spreads them; a single method uses this budget on every tensor).
    method : {"auto", "lplr", "paper", "nq", "nq+lplr", "dsvd", "lplr-svd"}, default "auto"
    policy : TensorPolicy, optional
        Which tensors are compressed and per-tensor overrides (default ``TensorPolicy()``).
    candidate_budgets : sequence of float, default (2, 3, 4)
        ``auto`` asks the planner for each tensor's curve at these budgets and ``budget``
        (``nq`` at 1–8 bits besides). Keep them fixed across runs that share a work directory
        so estimates are reused.
    seed : int, default 0
    group_size : int, default 128
        Group size of the group-wise quantizers.

    Returns
    -------
    CheckpointPlan

    Raises
    ------
    InputError
        Missing shard files, tensors missing from the index or from the shards, shapes that
        disagree with the data or the index, pickle checkpoints, unknown dtypes.
    ParameterError
        An unknown method, a bad policy, or a budget too small for the cheapest candidates.
    """
    _check_budget(budget)
    if method not in CHECKPOINT_METHODS:
        raise ParameterError(
            f"method={method!r} is unknown; use one of {', '.join(CHECKPOINT_METHODS)}."
        )
    if not candidate_budgets or any(
        isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 for b in candidate_budgets
    ):
        raise ParameterError(
            f"candidate_budgets={candidate_budgets!r} must be positive numbers of bits per entry."
        )
    policy = policy or TensorPolicy()
    scan = _scan_source(src)
    entries = []
    need_bits = 0.0
    total_numel = 0
    for shard, header in scan["files"].items():
        for name, info in header.tensors.items():
            shape, dtype = list(info["shape"]), info["dtype"]
            ok, reason = classify(name, shape, dtype, policy)
            entry = TensorEntry(
                name=name,
                shape=shape,
                dtype=dtype,
                shard=shard,
                file=str(header.path.resolve()),
                action="compress" if ok else "passthrough",
                reason=reason,
                seed=int(seed),
            )
            if ok:
                override = policy.override_for(name)
                if isinstance(override, dict):
                    cand = override_candidate(override, shape, budget=budget, group_size=group_size)
                    cands = [cand]
                    need = 0.0
                elif method == AUTO:
                    cands = []  # auto: the planner's curve, estimated when the tensor is read
                    need = min_bits(method, shape, group_size=group_size, seed=seed)
                else:
                    cands = candidate_set(
                        shape,
                        method=method,
                        budget=budget,
                        candidate_budgets=candidate_budgets,
                        group_size=group_size,
                        seed=seed,
                    )
                    need = min_bits(method, shape, group_size=group_size, seed=seed)
                    if not cands:
                        raise ParameterError(
                            f"budget={budget} bits per parameter is too small for method "
                            f"{method!r} on tensor {name} {shape[0]}×{shape[1]}: it needs at "
                            f"least {need:.4f}. Raise the budget, or use method='auto'."
                        )
                entry.candidates = [c.to_dict() for c in cands]
                need_bits += need * entry.numel
                total_numel += entry.numel
            entries.append(entry)
    if total_numel and need_bits > budget * total_numel * (1 + 1e-12):
        raise ParameterError(
            f"budget={budget} bits per parameter is too small: the cheapest configurations of "
            f"the {len([e for e in entries if e.action == 'compress'])} compressed tensors need "
            f"{need_bits / total_numel:.4f} bits per parameter. Raise the budget."
        )
    return CheckpointPlan(
        source=str(scan["dir"]),
        budget=float(budget),
        method=method,
        seed=int(seed),
        group_size=int(group_size),
        policy=policy.to_dict(),
        candidate_budgets=[float(b) for b in candidate_budgets],
        sharded=scan["sharded"],
        index_metadata=scan["index_metadata"],
        shard_metadata={s: h.metadata for s, h in scan["files"].items()},
        extra_files=scan["extra_files"],
        entries=entries,
    )
