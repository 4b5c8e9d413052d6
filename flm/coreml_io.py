"""Core ML files read without torch, for check-budget (`flm.budgets`) and the Core ML exporter
and its reference evaluator (`flm.exporters`): coremltools imported without its noise, and MIL
weight files (an ML program's `weights/*.bin`) parsed.

Needs coremltools only for `import_coremltools`; the weight-file parser is plain Python.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from pathlib import Path

from flm.errors import ModelFileError

# MILBlob BlobDataType (coremltools mlmodel/src/MILBlob/Blob/BlobDataType.hpp): name, bits per value.
BLOB_DTYPES = {1: ("float16", 16), 2: ("float32", 32), 3: ("uint8", 8), 4: ("int8", 8), 5: ("bfloat16", 16),
               6: ("int16", 16), 7: ("uint16", 16), 8: ("int4", 4), 9: ("uint1", 1), 10: ("uint2", 2),
               11: ("uint4", 4), 12: ("uint3", 3), 13: ("uint6", 6), 14: ("int32", 32), 15: ("uint32", 32),
               16: ("float8e4m3fn", 8), 17: ("float8e5m2", 8)}
BLOB_SENTINEL = 0xDEADBEEF
BLOB_ALIGNMENT = 64


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools' logger at ERROR while the block runs: on import it warns about untested torch
    versions and the macOS-only libraries it cannot load here, and it logs every conversion pass."""
    ct_log = logging.getLogger("coremltools")
    level = ct_log.level
    ct_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ct_log.setLevel(level)


def import_coremltools():
    """coremltools, without its Linux-only noise (it cannot load the macOS predictor here)."""
    with quiet_coremltools():
        import coremltools as ct
    return ct


def read_blob_file(path: Path, model_path) -> dict[int, tuple[str, int, bytes]]:
    """Every blob of a MIL weight file: {metadata offset: (dtype, values, data)}.

    Layout (MILBlob StorageFormat.hpp): a 64-byte header (uint32 count, uint32 version), then per
    blob a 64-byte metadata record (uint32 sentinel 0xDEADBEEF, uint32 dtype, uint64 size in bytes,
    uint64 data offset, reserved) and its data, each 64-byte aligned. A program refers to a blob by
    the offset of its metadata record. Errors name `model_path`, the model the file belongs to.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 64:
        raise ModelFileError(model_path, f"weight file {path.name} is truncated ({len(data)} bytes)")
    count, version = struct.unpack_from("<II", data, 0)
    if version != 2:
        raise ModelFileError(model_path, f"weight file {path.name}: blob storage version {version}, expected 2")
    blobs, pos = {}, BLOB_ALIGNMENT
    for i in range(count):
        if pos + 64 > len(data):
            raise ModelFileError(model_path, f"weight file {path.name} is truncated: blob {i} of {count} lies "
                                             f"beyond its end ({len(data)} bytes)")
        sentinel, code, size, offset = struct.unpack_from("<IIQQ", data, pos)
        if sentinel != BLOB_SENTINEL:
            raise ModelFileError(model_path, f"weight file {path.name}: corrupt blob record at byte {pos}")
        if offset + size > len(data):
            raise ModelFileError(model_path, f"weight file {path.name} is truncated or corrupt: the blob record "
                                             f"at byte {pos} needs {offset + size} bytes, the file has {len(data)}")
        if code not in BLOB_DTYPES:
            raise ModelFileError(model_path, f"weight file {path.name}: unknown blob dtype code {code} at byte {pos}")
        name, bits = BLOB_DTYPES[code]
        blobs[pos] = (name, size * 8 // bits, data[offset:offset + size])
        pos = -(-(offset + size) // BLOB_ALIGNMENT) * BLOB_ALIGNMENT
    return blobs


def blob_at(blobs: dict, offset: int, declared: str, file_name: str, model_path) -> tuple[str, int, bytes]:
    """The blob of a parsed weight file (`read_blob_file`) that a program refers to, checked: one
    stands at `offset`, and it holds the dtype the program declares (`declared`, e.g. "float32")."""
    if offset not in blobs:
        raise ModelFileError(model_path, f"MIL program refers to blob at offset {offset} of {file_name}, "
                                         "which holds none")
    if blobs[offset][0] != declared:
        raise ModelFileError(model_path, f"blob at offset {offset} of {file_name} holds {blobs[offset][0]} "
                                         f"but the program declares {declared}")
    return blobs[offset]
