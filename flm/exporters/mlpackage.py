"""A saved `.mlpackage` as flm writes it, read back from disk: its model spec (protobuf) and the
batch range its input declares. Used by the Core ML exporter (`flm.exporters.coreml`, to open a
package for the parity check) and by the reference evaluator (`flm.exporters.mil_eval`).

A tensor input declares its batch range in Core ML's own shape range; an image input has no
batch field in Core ML, so flm's packages also declare it in their user metadata
(BATCH_RANGE_KEY, for both kinds).
"""

from __future__ import annotations

import json
from pathlib import Path

from flm.coreml_io import import_coremltools
from flm.errors import ModelFileError
from flm.spec import INPUT

MODEL_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"
BATCH_RANGE_KEY = "flm.coreml.batch_range"  # user metadata: JSON [lowest, highest] batch the input takes


def read_package(path):
    """Parse a saved .mlpackage's model spec (protobuf) from disk; clear errors for bad packages."""
    import_coremltools()  # registers the proto modules
    from google.protobuf.message import DecodeError

    from coremltools.proto import Model_pb2

    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "Core ML package not found")
    if not path.is_dir() or not (path / MODEL_FILE).is_file():
        raise ModelFileError(path, f"not a Core ML package: expected a directory holding {MODEL_FILE}")
    model = Model_pb2.Model()
    try:
        model.ParseFromString((path / MODEL_FILE).read_bytes())
    except DecodeError as e:
        raise ModelFileError(path, f"{MODEL_FILE} is not a readable Core ML model ({e})") from None
    if model.WhichOneof("Type") != "mlProgram":
        raise ModelFileError(path, f"not an ML program (model type {model.WhichOneof('Type')!r})")
    return model


def declared_batch_range(proto, path, name: str = INPUT) -> tuple[int, int | None]:
    """(lowest, highest) batch input `name` of a package takes; highest None: unbounded.

    A tensor input declares it in its shape range (or a fixed shape); the user metadata key
    BATCH_RANGE_KEY declares it for any input (the only place for an image input). Where both
    are there they must agree; a package that declares neither is refused.
    """
    found = []
    meta = dict(proto.description.metadata.userDefined)
    if BATCH_RANGE_KEY in meta:
        found.append(_parse_batch_range(meta[BATCH_RANGE_KEY], path))
    feature = next((f for f in proto.description.input if f.name == name), None)
    if feature is not None and feature.type.WhichOneof("Type") == "multiArrayType":
        array = feature.type.multiArrayType
        flexibility = array.WhichOneof("ShapeFlexibility")
        if flexibility == "shapeRange" and array.shapeRange.sizeRanges:
            r = array.shapeRange.sizeRanges[0]
            found.append((int(r.lowerBound), int(r.upperBound) if r.upperBound >= 0 else None))
        elif flexibility is None and array.shape:
            found.append((int(array.shape[0]), int(array.shape[0])))
    if not found:
        raise ModelFileError(path, f"input {name!r} declares no batch range (no shape range and no "
                                   f"{BATCH_RANGE_KEY!r} metadata); re-export it with `flm export`")
    if len(set(found)) > 1:
        raise ModelFileError(path, f"input {name!r} declares two batch ranges: {found[0]} in "
                                   f"{BATCH_RANGE_KEY!r} and {found[1]} in its shape range")
    return found[0]


def _parse_batch_range(text: str, path) -> tuple[int, int | None]:
    try:
        lo, hi = json.loads(text)
        if not isinstance(lo, int) or lo < 1 or not (hi is None or (isinstance(hi, int) and hi >= lo)):
            raise ValueError
    except (ValueError, TypeError):
        raise ModelFileError(path, f"metadata {BATCH_RANGE_KEY!r} is {text!r}; expected [lowest, highest], "
                                   "e.g. [1, 16]") from None
    return lo, hi
