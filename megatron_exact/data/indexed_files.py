"""A Megatron indexed dataset's two files (``{prefix}.idx``, ``{prefix}.bin``): checked, and identified by content.

:func:`check_indexed_files` reads the ``.idx`` header (Megatron-Core's
``MMIDIDX`` layout) and compares what it describes with the sizes of both
files, so an empty, truncated or foreign ``.idx`` and a ``.bin`` shorter than
its index says are refused with a message naming the file, before
Megatron-Core asserts or reads past the end.

:func:`data_fingerprint` identifies the content the sample indices are built
from (the index bytes, which fix every sequence length and document boundary,
and the ``.bin`` size): the dataset's index cache is keyed by it, so a cache
built for other data under the same prefix is never used.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Dict, Tuple

from megatron_exact.errors import BadInputError

INDEX_HEADER = b"MMIDIDX\x00\x00"
# header, version <Q, dtype code <B, sequence count <Q, document count <Q
_FIXED_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
# Megatron-Core's DType codes -> item size in bytes
_ITEM_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
_REMEDY = "re-run tools/preprocess_data.py for this prefix"


def check_indexed_files(prefix: str) -> Tuple[int, int]:
    """Refuse ``prefix``'s ``.idx``/``.bin`` unless they are complete and agree; returns
    ``(sequences, documents)``."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise BadInputError(f"{path} does not exist (give the prefix without suffix, as written by "
                                "tools/preprocess_data.py)")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_FIXED_BYTES)
        if len(head) < _FIXED_BYTES or not head.startswith(INDEX_HEADER):
            what = "empty" if not head else "truncated" if INDEX_HEADER.startswith(head[:9]) else "not a Megatron index"
            raise BadInputError(f"{idx_path}: {what} ({idx_size} bytes, no complete MMIDIDX header); {_REMEDY}")
        version, = struct.unpack_from("<Q", head, 9)
        code, = struct.unpack_from("<B", head, 17)
        sequences, documents = struct.unpack_from("<QQ", head, 18)
        if version != 1 or code not in _ITEM_SIZE:
            raise BadInputError(f"{idx_path}: unsupported index (version {version}, dtype code {code}); {_REMEDY}")
        expected = _FIXED_BYTES + 12 * sequences + 8 * documents
        if idx_size < expected or documents < 1:
            raise BadInputError(f"{idx_path}: truncated ({idx_size} bytes; its header describes {sequences} "
                                f"sequences and {documents - 1 if documents else 0} documents, {expected} bytes); "
                                f"{_REMEDY}")
        bin_bytes = 0
        if sequences:
            f.seek(_FIXED_BYTES + 4 * (sequences - 1))
            last_length, = struct.unpack("<i", f.read(4))
            f.seek(_FIXED_BYTES + 4 * sequences + 8 * (sequences - 1))
            last_pointer, = struct.unpack("<q", f.read(8))
            bin_bytes = last_pointer + last_length * _ITEM_SIZE[code]
    bin_size = os.path.getsize(bin_path)
    if bin_size < bin_bytes:
        raise BadInputError(f"{bin_path}: truncated ({bin_size} bytes, but {idx_path} describes {bin_bytes}); "
                            f"{_REMEDY}")
    return int(sequences), int(documents) - 1


_FINGERPRINTS: Dict[tuple, str] = {}


def data_fingerprint(prefix: str) -> str:
    """``sha256:<hex>`` of the ``.idx`` bytes and the ``.bin`` size (memoised per file identity)."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    idx_stat, bin_stat = os.stat(idx_path), os.stat(bin_path)
    key = (os.path.abspath(idx_path), idx_stat.st_ino, idx_stat.st_size, idx_stat.st_mtime_ns, bin_stat.st_size)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        digest.update(f"bin_bytes={bin_stat.st_size};".encode())
        with open(idx_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _FINGERPRINTS[key] = "sha256:" + digest.hexdigest()
    return _FINGERPRINTS[key]
