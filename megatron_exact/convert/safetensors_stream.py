"""Tensor-at-a-time safetensors reading and writing, so conversion holds one model copy, not two.

The ``safetensors`` package reads through a memory map (every page read stays
resident while the file is open) and writes a file from a dict of all its
tensors, converting each to bytes first, which doubles the memory of a shard.
The format is simple (8-byte little-endian header length, a JSON header of
``dtype``/``shape``/``data_offsets``, then the raw bytes), so here it is read
with ``readinto`` one tensor at a time and written from a header computed
up front followed by each tensor's bytes as it is produced. The files are
plain safetensors: tests read ours with the ``safetensors`` package and
transformers, and read transformers' files with ours.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Union

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_ALIGNMENT = 8
_MAX_HEADER_BYTES = 100_000_000


def _raw_bytes(tensor: torch.Tensor):
    """A buffer over the tensor's bytes (no copy for contiguous CPU tensors)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


class SafetensorsReader:
    """One ``.safetensors`` file: its tensor names, shapes and dtypes, and reading a tensor."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"missing safetensors file {self.path}") from None
        size = self.path.stat().st_size
        prefix = self._file.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{self.path}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.path}: corrupt safetensors header ({err})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            if self._data_start + end > size:
                raise ValueError(f"{self.path}: truncated file, tensor {name} ends past the end of the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        if tensor.numel() * tensor.element_size() != end - begin:
            raise ValueError(f"{self.path}: tensor {name} has {end - begin} bytes, its shape/dtype need a different size")
        self._file.seek(self._data_start + begin)
        if tensor.numel() and self._file.readinto(_raw_bytes(tensor)) != end - begin:
            raise ValueError(f"{self.path}: truncated file while reading tensor {name}")
        return tensor

    def close(self) -> None:
        self._file.close()


class SafetensorsWriter:
    """Writes one ``.safetensors`` file whose tensors are announced up front and then written in order."""

    def __init__(self, path: Union[str, Path], layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._pending: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        offset = 0
        for name, shape, dtype in layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._pending.append((name, tuple(shape), dtype))
            offset += nbytes
        self.total_bytes = offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % _HEADER_ALIGNMENT)  # tensors start 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape, dtype = self._pending[self._next]
        if name != expected_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{self.path}: expected {expected_name} {shape} {dtype} next, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._file.write(_raw_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._pending):
            missing = [name for name, _, _ in self._pending[self._next :]]
            self._file.close()
            raise ValueError(f"{self.path}: closed before writing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self._file.flush()
        self._file.close()
