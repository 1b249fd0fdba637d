"""Compress sharded safetensors checkpoints tensor by tensor, and restore them.

A checkpoint directory in the Hugging Face layout (``model.safetensors``, or shards
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``; float32, float16 and
bfloat16) becomes a compressed checkpoint directory::

    DST/
      lplr_checkpoint.json      the index: every original tensor → its compressed group or its
                                passthrough location; source dtype, shape, shard, method, rank,
                                bits, measured error, bits per entry; the source shards' metadata;
                                (format version 2) the sha256 of every other file of DST
                                ("checksums") and of its own canonical JSON ("index_sha256")
      tensors/NAME.zarr         one Zarr group per compressed tensor, written by
                                :func:`lplr_dask.compress` (format ``lplr-dask``)
      passthrough.safetensors   every other tensor, bytes copied unchanged
      config.json, tokenizer files, 1_Pooling/, ...   every non-weight file, copied

:func:`restore_checkpoint` writes a standard checkpoint back (the source's shard layout, the
original names, shapes and dtypes), loadable by transformers and sentence-transformers, plus
the marker ``lplr_restored.json``.

Reading a compressed checkpoint (:func:`checkpoint_info`, :func:`restore_checkpoint`) checks
the index's own sha256, then every file against its recorded sha256, before anything else;
every path read from the index must be a plain relative path that stays inside DST once links
are resolved (:class:`~lplr_dask.errors.UnsafePathError` otherwise). Damage is an
:class:`~lplr_dask.errors.IntegrityError` naming the file. Version-1 indexes (written before
checksums) are read unchecked, and say so.

The work is split so that a flow can fan out over tensors, and :func:`compress_checkpoint` is
built from the same pieces (one module each: ``plan``, ``measure``, ``run``; with
``safetensors_io``, ``policy``, ``index``, ``report`` and ``restore``):

1. :func:`plan_checkpoint` reads only headers, validates everything and decides per tensor
   (compress with which candidate configurations, or pass through); JSON-serialisable;
2. :func:`run_tensors`: for ``auto``, every tensor's rate–distortion curve from the planner
   (:func:`estimate_tensor`: estimates, no compression), the allocation over those curves
   (:func:`choose_candidates`), then exactly one compression per tensor
   (:func:`compress_tensor`, the real engine, into a work directory); tensors that fit a
   worker's memory run as one Dask task each, read on the worker by name;
3. :func:`finalize_checkpoint` copies the chosen groups, the passthrough tensors and the other
   files into a temporary sibling of DST and publishes it.

Tensors are read lazily (``safe_open``/``get_slice``): a tensor larger than
``stage_threshold_bytes`` is staged into a tiled Zarr array row slab by row slab and compressed
out of core from there; smaller ones are compressed from memory.
"""

from lplr_dask.checkpoint.measure import compress_tensor, estimate_tensor
from lplr_dask.checkpoint.plan import CheckpointPlan, TensorEntry, plan_checkpoint
from lplr_dask.checkpoint.policy import TensorPolicy
from lplr_dask.checkpoint.report import (
    CheckpointResult,
    checkpoint_info,
    mean_rel_error2,
    tensor_rows,
    tensor_table,
)
from lplr_dask.checkpoint.restore import restore_checkpoint
from lplr_dask.checkpoint.run import (
    choose_candidates,
    compress_checkpoint,
    finalize_checkpoint,
    run_tensors,
)
from lplr_dask.checkpoint.safetensors_io import shard_checkpoint

__all__ = [
    "CheckpointPlan",
    "CheckpointResult",
    "TensorEntry",
    "TensorPolicy",
    "checkpoint_info",
    "choose_candidates",
    "compress_checkpoint",
    "compress_tensor",
    "estimate_tensor",
    "finalize_checkpoint",
    "mean_rel_error2",
    "plan_checkpoint",
    "restore_checkpoint",
    "run_tensors",
    "shard_checkpoint",
    "tensor_rows",
    "tensor_table",
]
