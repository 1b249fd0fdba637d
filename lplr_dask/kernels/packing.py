"""Bit packing of integer codes into uint8, and the 16-bit float passthrough.

Layout (recorded in every compressed group as ``bit_order = "lsb-first-rows"``): codes are
packed along the last axis, row by row. Code ``j`` of a row occupies bits
``[j*bits, (j+1)*bits)`` of that row's bit stream, least significant bit first, and bit ``i``
of the stream is bit ``i % 8`` of byte ``i // 8``. Each row is padded with zero bits to a whole
byte, so rows (and column panels whose width is a multiple of 8) pack independently.

Pure kernels for NumPy and CuPy; no Dask imports.
"""

from __future__ import annotations

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.xp import array_namespace

__all__ = [
    "BIT_ORDER",
    "decode_float",
    "encode_float",
    "pack_codes",
    "packed_width",
    "unpack_codes",
]

BIT_ORDER = "lsb-first-rows"


def packed_width(n_cols: int, bits: int) -> int:
    """Bytes per packed row of ``n_cols`` codes of ``bits`` bits."""
    return -(-n_cols * bits // 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ParameterError(f"bits={bits} cannot be packed: integer codes have 1 to 8 bits.")


def pack_codes(codes, bits: int):
    """Pack uint8 codes (each < 2^bits) of shape (rows, cols) into (rows, packed_width) uint8."""
    _check_bits(bits)
    xp = array_namespace(codes)
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    rows, cols = codes.shape
    shifts = xp.arange(bits, dtype=np.uint8)
    stream = ((codes[:, :, None] >> shifts) & 1).reshape(rows, cols * bits)
    nbytes = packed_width(cols, bits)
    pad = nbytes * 8 - cols * bits
    if pad:
        stream = xp.concatenate([stream, xp.zeros((rows, pad), dtype=np.uint8)], axis=1)
    weights = (1 << xp.arange(8, dtype=np.uint16)).astype(np.uint16)
    packed = (stream.reshape(rows, nbytes, 8).astype(np.uint16) * weights).sum(axis=2)
    return packed.astype(np.uint8)


def unpack_codes(packed, bits: int, n_cols: int):
    """Inverse of :func:`pack_codes`: uint8 codes of shape (rows, n_cols)."""
    _check_bits(bits)
    xp = array_namespace(packed)
    rows, nbytes = packed.shape
    if nbytes != packed_width(n_cols, bits):
        raise ParameterError(
            f"{nbytes} packed bytes per row cannot hold {n_cols} codes of {bits} bits "
            f"(expected {packed_width(n_cols, bits)})."
        )
    if bits == 8:
        return packed
    shifts = xp.arange(8, dtype=np.uint8)
    stream = ((packed[:, :, None] >> shifts) & 1).reshape(rows, nbytes * 8)
    stream = stream[:, : n_cols * bits].reshape(rows, n_cols, bits)
    weights = (1 << xp.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.astype(np.uint16) * weights).sum(axis=2).astype(np.uint8)


def encode_float(x, float_format: str):
    """Bit patterns (uint16) of ``x`` rounded to float16 or bfloat16 (round to nearest even)."""
    xp = array_namespace(x)
    if float_format == "float16":
        return x.astype(np.float16).view(np.uint16)
    if float_format == "bfloat16":
        u = x.astype(np.float32).view(np.uint32)
        rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        nan = xp.isnan(x)
        return xp.where(nan, 0x7FC0, rounded).astype(np.uint16)
    raise ParameterError(f"float_format={float_format!r} is unknown; use float16 or bfloat16.")


def decode_float(u16, float_format: str, dtype=np.float32):
    """Values of float16/bfloat16 bit patterns, as ``dtype``."""
    if float_format == "float16":
        return u16.view(np.float16).astype(dtype)
    if float_format == "bfloat16":
        return (u16.astype(np.uint32) << 16).view(np.float32).astype(dtype)
    raise ParameterError(f"float_format={float_format!r} is unknown; use float16 or bfloat16.")
