"""Opening an exported flm ONNX file: its onnxruntime session and the spec stored inside it.

Below both the landmarker (which runs the model) and `flm.runtime.shipped` (which lists the
models flm ships), so the two read a file's spec the same way.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from flm.errors import FlmError, ModelFileError, UsageError
from flm.spec import SPEC_METADATA_KEY, ModelSpec

MODEL_EXAMPLE = "runs/export/model.onnx, as written by flm export runs/train/best.pt --out runs/export"


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def check_providers(providers) -> list[str]:
    """The onnxruntime execution providers to use (default: CPU); UsageError naming those missing."""
    wanted = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise UsageError(f"onnxruntime provider(s) {missing} are not available here; available: {available}",
                         example="FaceLandmarkerOptions(providers=('CPUExecutionProvider',))")
    return wanted


def open_session(path, threads: int = 0, providers=None) -> ort.InferenceSession:
    """An onnxruntime session for the ONNX file at `path`, or a `ModelFileError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "model file not found", example=MODEL_EXAMPLE)
    if path.stat().st_size == 0:
        raise ModelFileError(path, "model file is empty (0 bytes)")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=check_providers(providers))
    except FlmError:
        raise
    except Exception as e:  # onnxruntime raises several types for foreign / truncated files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelFileError(path, f"onnxruntime cannot load it as an ONNX model ({first})") from None


def read_spec(session, source: str) -> ModelSpec:
    """The `ModelSpec` stored in an ONNX file's metadata, or a typed error naming `source`."""
    meta = session.get_modelmeta().custom_metadata_map or {}
    if SPEC_METADATA_KEY not in meta:
        raise ModelFileError(source, f"holds no flm spec (ONNX metadata key {SPEC_METADATA_KEY!r}); the runtime "
                                     "only runs models exported by `flm export`, which records the crop, "
                                     "colour order and normalisation the model needs")
    return ModelSpec.from_json(meta[SPEC_METADATA_KEY], source=source)
