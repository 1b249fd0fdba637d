"""Flow configurations: YAML files in ``configs/``, validated on load.

A configuration names the matrices to compress, where the results go, the compression
parameters and the Dask cluster::

    name: demo
    inputs:                       # a path, a list of paths, {glob: ...} or {group: ...}
      paths: ["${LPLR_DATA:-/tmp/lplr-demo}/A.zarr"]
    generate:                     # optional: write missing inputs (demo data)
      shape: [4096, 4096]
    output_dir: "${LPLR_DATA:-/tmp/lplr-demo}/out"
    compression: {method: lplr, budget: 1.0, seed: 0}   # CompressionOptions' fields
    cluster: {kind: local, n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB}
    resume: true
    verify: false

Strings may use ``${VAR}`` and ``${VAR:-default}`` and ``~``; relative paths are relative to
the working directory of the process that runs the flow. Every mistake raises
:class:`~lplr_dask.errors.ConfigError` naming the file, the key, the value and the fix.

The same dataclasses are the typed parameters of the Prefect flows in ``pipelines/``.
"""

from __future__ import annotations

import difflib
import glob as _glob
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from lplr_dask.cluster import DEVICE_SETTINGS, compute_device
from lplr_dask.core.params import CompressionOptions
from lplr_dask.errors import ConfigError, ParameterError

__all__ = [
    "ClusterConfig",
    "DatasetSpec",
    "FlowConfig",
    "InputsSpec",
    "load_config",
    "parse_config",
]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str) -> str:
    """``${VAR}``, ``${VAR:-default}`` and ``~`` expanded; an unset ``${VAR}`` is an error."""

    def sub(m):
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(
                f"environment variable {name} is not set (used as ${{{name}}}); set it, or "
                f"write ${{{name}:-DEFAULT}} to give a default."
            )
        return default

    return os.path.expanduser(_ENV.sub(sub, value))


@dataclass(frozen=True)
class ClusterConfig:
    """Which Dask cluster runs the work (one code path, :func:`lplr_dask.cluster.dask_client`).

    kind : {"local", "cuda", "address"}, default "local"
        A new LocalCluster of worker processes; a dask-cuda LocalCUDACluster (``gpu`` extra);
        or the running scheduler at ``address``.
    address : str, optional
        ``tcp://HOST:8786``; required for (and only for) ``kind: address``.
    n_workers, threads_per_worker : int, optional
        Local clusters only; default 2 workers sharing the cores.
    memory_limit : str, default "auto"
        Per worker, local clusters only (``"2GiB"``).
    device : {"auto", "cpu", "gpu"}, default "auto"
        Where A's tiles are computed (``compress(device=...)``): ``auto`` is ``gpu`` for
        ``kind: cuda`` and ``cpu`` otherwise; ``gpu`` with ``kind: address`` for a scheduler
        of ``dask cuda worker`` processes.
    """

    kind: str = "local"
    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if self.kind not in ("local", "cuda", "address"):
            raise ConfigError(f"cluster.kind={self.kind!r} is unknown; use local, cuda or address.")
        if self.device not in DEVICE_SETTINGS:
            raise ConfigError(
                f"cluster.device={self.device!r} is unknown; use one of "
                f"{', '.join(DEVICE_SETTINGS)}."
            )
        if (self.kind == "address") != (self.address is not None):
            raise ConfigError(
                "cluster.address is required with cluster.kind: address (tcp://HOST:8786), "
                f"and only then (kind is {self.kind!r}, address {self.address!r})."
            )
        for name in ("n_workers", "threads_per_worker"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"cluster.{name}={v} must be at least 1.")

    @property
    def compute_device(self) -> str:
        """``device`` with ``auto`` resolved (:func:`lplr_dask.cluster.compute_device`)."""
        return compute_device(self.device, self.kind)

    @property
    def target(self) -> str:
        """The ``cluster`` argument of :func:`lplr_dask.cluster.dask_client`."""
        return expand(self.address) if self.kind == "address" else self.kind

    def client(self):
        """A context manager yielding a ``distributed.Client`` on this cluster."""
        from lplr_dask.cluster import dask_client

        return dask_client(
            self.target,
            n_workers=self.n_workers,
            threads_per_worker=self.threads_per_worker,
            memory_limit=self.memory_limit,
        )


@dataclass(frozen=True)
class DatasetSpec:
    """A synthetic low-rank-plus-noise matrix written where an input is missing (demos).

    See :func:`lplr_dask.datasets.low_rank_plus_noise`.
    """

    shape: tuple[int, int] = (4096, 4096)
    rank: int = 64
    decay: float = 0.95
    noise: float = 0.05
    chunks: tuple[int, int] = (1024, 1024)
    seed: int = 0

    def __post_init__(self):
        if min(self.shape) < 2 or min(self.chunks) < 1 or not 0 <= self.noise < 1:
            raise ConfigError(
                f"generate: shape {self.shape} (≥ 2 each), chunks {self.chunks} (≥ 1) and "
                f"noise {self.noise} (in [0, 1)) are out of range."
            )

    def ensure(self, path: str) -> bool:
        """Write the matrix at ``path`` unless something is there; True if it was written.
        Written under a temporary name and renamed, so a crash leaves no half matrix."""
        from lplr_dask.datasets import low_rank_plus_noise
        from lplr_dask.storage.fs import publish, temporary_output

        dest = Path(path)
        if dest.exists():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        with temporary_output(dest) as tmp:
            low_rank_plus_noise(
                tmp,
                self.shape,
                rank=self.rank,
                decay=self.decay,
                noise=self.noise,
                chunks=self.chunks,
                seed=self.seed,
            )
            publish(tmp, dest)
        return True


@dataclass(frozen=True)
class InputsSpec:
    """The matrices of a batch: explicit ``paths``, a ``glob``, and/or every 2-D array of a
    Zarr ``group`` (as ``group.zarr/NAME``)."""

    paths: tuple[str, ...] = ()
    glob: str | None = None
    group: str | None = None

    def __post_init__(self):
        if not (self.paths or self.glob or self.group):
            raise ConfigError(
                "inputs is empty: give a path, a list of paths, {glob: PATTERN} or "
                "{group: GROUP.zarr}."
            )

    def resolve(self) -> list[str]:
        """Every input path, in a stable order; raises ConfigError if a pattern or group
        matches nothing."""
        out = [expand(p) for p in self.paths]
        if self.glob:
            pattern = expand(self.glob)
            found = sorted(_glob.glob(pattern))
            if not found:
                raise ConfigError(f"inputs.glob={pattern!r} matches no file or directory.")
            out += found
        if self.group:
            import zarr

            path = expand(self.group)
            try:
                grp = zarr.open_group(path, mode="r")
            except (FileNotFoundError, ValueError, TypeError) as exc:
                raise ConfigError(f"inputs.group={path!r} is not a Zarr group ({exc}).") from exc
            names = sorted(n for n, a in grp.arrays() if a.ndim == 2)
            if not names:
                raise ConfigError(f"inputs.group={path!r} holds no 2-D array.")
            out += [f"{path.rstrip('/')}/{n}" for n in names]
        return out


@dataclass(frozen=True)
class FlowConfig:
    """A whole batch: inputs, outputs, compression parameters and cluster."""

    inputs: InputsSpec
    output_dir: str
    compression: CompressionOptions = field(default_factory=lambda: CompressionOptions(budget=1.0))
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    generate: DatasetSpec | None = None
    name: str = "lplr"
    resume: bool = True
    verify: bool = False
    overwrite: bool = False
    allow_missing_chunks: bool = False

    def jobs(self) -> list[tuple[str, str]]:
        """(input, output) pairs: OUTPUT is ``output_dir/NAME.lplr.zarr``; group members are
        named ``GROUP.MEMBER``."""
        out_dir = Path(expand(self.output_dir))
        pairs, seen = [], set()
        for src in self.inputs.resolve():
            p = Path(src)
            stem = p.stem if p.suffix in (".zarr", ".npy") else p.name
            if p.parent.suffix == ".zarr":
                stem = f"{p.parent.stem}.{stem}"
            if stem in seen:
                raise ConfigError(
                    f"two inputs would both write {out_dir / stem}.lplr.zarr; give them "
                    "different names."
                )
            seen.add(stem)
            pairs.append((src, str(out_dir / f"{stem}.lplr.zarr")))
        return pairs


# ----------------------------------------------------------------------------- parsing


def _convert(value, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number.")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be a string.")
        return str(value)
    if origin is tuple:
        if isinstance(value, str) and args and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list.")
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{where}={value!r} must have {len(args)} entries.")
        item = args[0] if args else str
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        return _build(hint, value, where)
    raise TypeError(f"unsupported annotation {hint!r} at {where}")  # a bug, not a user error


def _build(cls, value, where: str):
    if cls is InputsSpec and isinstance(value, (str, list, tuple)):
        value = {"paths": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where or 'the configuration'} must be a mapping, got {value!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown key {'.'.join(filter(None, [where, str(k)]))!r}.{hint} Known keys: "
            f"{', '.join(names)}."
        )
    kwargs = {
        k: _convert(v, hints[k], ".".join(filter(None, [where, k]))) for k, v in value.items()
    }
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'the configuration'} needs {', '.join(missing)}.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ParameterError as exc:  # CompressionOptions validates its own fields
        raise ConfigError(f"{where or 'the configuration'}: {exc}") from None


def parse_config(mapping, *, source: str = "<config>") -> FlowConfig:
    """A validated :class:`FlowConfig` from a mapping (a parsed YAML document)."""
    try:
        return _build(FlowConfig, mapping, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path) -> FlowConfig:
    """Read and validate a YAML flow configuration."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - the flows extra brings it
        raise ConfigError(
            "reading YAML configurations needs PyYAML: pip install 'lplr-dask[flows]'."
        ) from exc
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(data, source=str(path))
