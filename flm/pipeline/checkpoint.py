"""Checkpoints: plain tensors + the model spec, loaded with `torch.load(weights_only=True)`.

Nothing in a checkpoint is unpickled as an arbitrary object, so a file from a stranger can
carry no code. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from flm.errors import ModelFileError, SpecError, UsageError
from flm.fileio import atomic_path, log_written
from flm.pipeline.models import LandmarkModel, build_model
from flm.spec import ModelSpec

CHECKPOINT_FORMAT = "flm-checkpoint/1"


def save_checkpoint(path, model: LandmarkModel, **extra) -> Path:
    """Write {format, spec, options, state_dict, **extra} atomically. `extra` must be plain data/tensors."""
    started = time.perf_counter()
    payload = {"format": CHECKPOINT_FORMAT, "spec": model.spec.to_json(),
               "options": model.spec.build,  # also in the spec; kept for flm versions that read it here
               "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # through a Python file, so a full disk is an OSError (ENOSPC) that atomic_path reports
        # clearly; torch.save(payload, path) reports it as "unexpected pos" from its C++ writer
        torch.save(payload, f)
    log_written(path, started)
    return Path(path)


def state_digest(state_dict: dict) -> str:
    """A short SHA-256 of a state dict's names and exact tensor bytes: equal digests, equal weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_CHECKPOINT_EXAMPLE = "runs/train/best.pt or runs/train/last.pt, as written by flm train --out runs/train"


def read_checkpoint(path) -> dict:
    path = Path(path)
    if path.suffix.lower() in (".onnx", ".mlpackage", ".mlmodel"):
        raise ModelFileError(path, "an exported model, not a checkpoint: this takes the .pt file flm train writes "
                                   "(exported files run with flm detect --model FILE)", example=_CHECKPOINT_EXAMPLE)
    if not path.is_file():
        raise ModelFileError(path, "checkpoint not found", example=_CHECKPOINT_EXAMPLE)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign / pickled-code files
        raise ModelFileError(path, f"not a readable flm checkpoint ({_unreadable(e)}); expected a .pt file "
                                   f"written by flm train", example=_CHECKPOINT_EXAMPLE) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(path, f"not an flm checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if "spec" not in ckpt or "state_dict" not in ckpt:
        raise ModelFileError(path, "checkpoint lacks its model spec or weights")
    return ckpt


def _unreadable(e: Exception) -> str:
    """Why torch.load refused a file, in a user's words."""
    if "Weights only load failed" in str(e):  # torch's advice here (weights_only=False) would run the file's code
        return "it holds Python objects or code beside tensors, which flm never unpickles"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__


def load_model(path) -> LandmarkModel:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    ckpt = read_checkpoint(path)
    try:
        spec = ModelSpec.from_json(ckpt["spec"], source=str(path))
    except SpecError as e:
        raise ModelFileError(path, str(e)) from None
    try:
        model = build_model(spec.preset, spec=spec, options=ckpt.get("options") or {})
    except UsageError as e:  # a preset or option this flm does not know: the file's problem, not the command's
        raise ModelFileError(path, f"its spec cannot be built here: {e}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # torch's first line only names the class; the next says what differs
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        raise ModelFileError(path, f"weights do not match its spec (preset {spec.preset!r}, {spec.num_points} "
                                   f"points): {(lines[1] if len(lines) > 1 else lines[0] if lines else '')[:300]}"
                             ) from None
    return model.eval()
