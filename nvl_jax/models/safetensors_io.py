"""A minimal safetensors reader that reads one tensor at a time with plain file reads.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{dtype, shape, data_offsets}``, then the raw bytes. Reading with
``pread`` into a fresh buffer (instead of memory-mapping the whole file) keeps
host memory to the tensor being placed, so loading never holds a second copy
of the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as such."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """Header of one ``.safetensors`` file; ``read(name)`` returns a fresh numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        size = self.path.stat().st_size
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            begin, end = (data_start + o for o in entry["data_offsets"])
            info = TensorInfo(name, np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"]), begin, end)
            if end > size or info.nbytes != int(np.prod(info.shape)) * info.dtype.itemsize:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} bytes [{begin}, {end}) do not match shape {info.shape} "
                    f"{entry['dtype']} or lie past the end of the file ({size} bytes): truncated?")
            self.tensors[name] = info

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.begin)
            if f.readinto(buf) != info.nbytes:
                raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated")
        return np.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
