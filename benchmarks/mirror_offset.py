"""How far a set's labels sit from their mirror-consistent place: the value of --aug-flip-shift-for.

    python benchmarks/mirror_offset.py models/flm-68-distilled.pt [--part train|val] [--json F]

For every training set of `benchmarks/accuracy.py` (youtube-faces-68, 300w-train; the same
identity / photo split as `flm train`'s, training side by default), each face is scored twice from
its ground-truth box: as it is, and mirrored (the points mirrored back, left and right swapped).
Half the mean difference in x, in image pixels, is the offset the model puts between a face and
its mirror. A model trained on a set **without flips** learns its labels' offset, so this is the
offset of those labels; a model trained with plain flips (probability p) learns (1 - 2p) times it.
The mean signed error against the labels (prediction - label, x and y) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accuracy import SETS  # noqa: E402  (benchmarks/: the same sets)
from flm.geometry import flip_permutation  # noqa: E402
from flm.pipeline.checkpoint import load_model  # noqa: E402
from flm.pipeline.data import open_dataset  # noqa: E402
from flm.pipeline.evaluate import CropDataset, to_image_coords  # noqa: E402
from flm.pipeline.train import TrainConfig  # noqa: E402


@torch.no_grad()
def both_views(model, ds) -> tuple[np.ndarray, np.ndarray]:
    """Image-pixel points of every face of `ds` as it is and mirrored (mirrored back), through the gate."""
    spec, perm = model.spec, torch.as_tensor(flip_permutation(model.spec.scheme))
    plain, mirrored = [], []
    for x, _, _ in DataLoader(CropDataset(ds, spec, None), batch_size=64):
        plain.append(model.decode(model(x)).numpy())
        m = model.decode(model(torch.flip(x, [3])))[:, perm].numpy()
        m[..., 0] = spec.input_size - 1 - m[..., 0]  # pixel centres at integers: x -> size - 1 - x
        mirrored.append(m)
    return tuple(to_image_coords(np.concatenate(v), ds, spec) for v in (plain, mirrored))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--part", choices=("train", "val"), default="train")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model = load_model(args.model).eval()
    rows = {}
    for name, (text, how, _, _) in SETS.items():
        if how != "split":
            continue  # aflw2000-3d-val is never training data
        split = TrainConfig.val_fraction, TrainConfig.seed  # flm train's defaults
        ds = open_dataset(text).mapped(model.spec.scheme).split_by_identity(*split)[args.part == "val"]
        plain, mirrored = both_views(model, ds)
        labels = np.stack([s.points for s in ds.samples])
        rows[name] = {"faces": len(ds), "mirror_offset_x": float(((plain - mirrored) / 2)[..., 0].mean()),
                      "bias_x": float((plain - labels)[..., 0].mean()), "bias_y": float((plain - labels)[..., 1].mean())}
    print(f"{args.model}, {args.part} part, image pixels:")
    print(f"{'set':<18} {'faces':>6} {'(face - mirror) / 2, x':>23} {'prediction - label, x':>22} {'y':>7}")
    for name, r in rows.items():
        print(f"{name:<18} {r['faces']:>6} {r['mirror_offset_x']:>+23.2f} {r['bias_x']:>+22.2f} {r['bias_y']:>+7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "part": args.part, "sets": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
