"""Reader for the idx format of MNIST and Fashion-MNIST (raw or gzip-compressed), with checked headers.

An idx file starts with two zero bytes, a type code, the number of dimensions and one big-endian
uint32 size per dimension, followed by the values in row-major order.
"""

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetFormatError

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetFormatError(f"'{path}' is a damaged gzip file ({err}). Download it again.") from err


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an idx file into an array; ``ndim`` (3 for images, 1 for labels) is checked when given."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetFormatError(f"'{path}' is too short to be an idx file ({len(data)} bytes).")
    zero, code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _TYPES:
        raise DatasetFormatError(
            f"'{path}' is not an idx file: bad magic number 0x{data[:4].hex()} (expected 0x0000 followed by a "
            f"type code such as 08 and the number of dimensions). Is it the right file, fully downloaded?")
    if ndim is not None and dims != ndim:
        raise DatasetFormatError(f"'{path}' holds a {dims}-dimensional array, expected {ndim} dimensions "
                                 f"({'images' if ndim == 3 else 'labels'}); are the file names swapped?")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DatasetFormatError(f"'{path}' is truncated inside its header.")
    shape = struct.unpack(f">{dims}I", data[4:header])
    dtype = np.dtype(_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetFormatError(f"'{path}' declares shape {tuple(shape)} ({expected} bytes of data) but holds "
                                 f"{len(data) - header} bytes; the file is truncated or damaged. Download it again.")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
