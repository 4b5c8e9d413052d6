"""Model files for the export, parity and budget tests: randomly initialised models and
checkpoints whose outputs are not trivial, and checkpoint payloads to doctor.

A fresh model is a weak parity subject: BatchNorm is the identity and the last layer's tiny
init makes heatmap logits ~1e-6, so almost any export would "match". Here BN gets random
affine parameters and running statistics, and the last layer is rescaled so heatmap logits
spread over several units and regressed landmarks over tens of pixels.
"""

from pathlib import Path

import torch
from torch import nn

from flm.pipeline.checkpoint import CHECKPOINT_FORMAT, load_model, save_checkpoint
from flm.pipeline.models import build_model


def randomised_model(preset: str, seed: int = 0, **build):
    torch.manual_seed(seed)
    model = build_model(preset, **build)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        last = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
        model.eval()
        s = model.spec
        x = torch.randn(4, s.channels, s.input_size, s.input_size)
        raw = model(x)
        target = 3.0 if s.output == "heatmap" else 0.1  # logits in units; offsets in crop sides
        last.weight.mul_(target / raw.std().clamp_min(1e-12))
        if last.bias is not None:
            last.bias.mul_(target / raw.std().clamp_min(1e-12))
    return model.eval()


def random_checkpoint(path: Path, preset: str, seed: int = 0, **build) -> Path:
    save_checkpoint(path, randomised_model(preset, seed, **build))
    return Path(path)


def perturbed_checkpoint(src: Path, dest: Path, scale: float = 1.01) -> Path:
    """The same model with its first layer's weights scaled by `scale`."""
    model = load_model(src)
    with torch.no_grad():
        next(iter(model.parameters())).mul_(scale)
    save_checkpoint(dest, model)
    return Path(dest)


def payload(model, **changes) -> dict:
    """An flm checkpoint's dict for `model` (format, spec, width-0.5 options, weights) with
    `changes` applied, a change to None leaving that key out: `torch.save` it to doctor a file."""
    d = {"format": CHECKPOINT_FORMAT, "spec": model.spec.to_json(), "options": {"width": 0.5},
         "state_dict": model.state_dict()}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}
