"""Model checkpoints: safetensors I/O, the plan and per-tensor policy, the budget allocation,
the run, the report and restore.

The entry points are :func:`plan_checkpoint`, :func:`compress_checkpoint`,
:func:`restore_checkpoint` and :func:`checkpoint_info`.
"""

from lplr_dask.checkpoint.policy import TensorPolicy
from lplr_dask.checkpoint.run import (
    CheckpointPlan,
    checkpoint_info,
    compress_checkpoint,
    compress_tensor,
    finalize_checkpoint,
    plan_checkpoint,
    restore_checkpoint,
    shard_checkpoint,
    tensor_rows,
    tensor_table,
)

__all__ = [
    "CheckpointPlan",
    "TensorPolicy",
    "checkpoint_info",
    "compress_checkpoint",
    "compress_tensor",
    "finalize_checkpoint",
    "plan_checkpoint",
    "restore_checkpoint",
    "shard_checkpoint",
    "tensor_rows",
    "tensor_table",
]
