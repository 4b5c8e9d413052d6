"""Is model B's NME really different from model A's? A paired bootstrap over people / photos.

    python benchmarks/paired.py models/flm-68.pt models/flm-68-distilled.pt [--rounds 2000] [--json F]

Both checkpoints are scored on the same held-out faces as `benchmarks/accuracy.py`'s tables
(youtube-faces-68 identity-held-out, 300w-train photo-held-out, aflw2000-3d-val; each by its own
protocol, a gated model through its gate) and the difference B - A of the set's score is
resampled by identity (a person's frames, a photo's faces stay together; AFLW2000-3D: by image,
inside its |yaw| bins so the yaw-balanced mean keeps its bins). Prints the difference and its 95 %
interval: an interval that holds 0 is a difference this validation set cannot tell from noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accuracy import SETS, validation_part  # noqa: E402  (benchmarks/: the same sets, held out the same way)
from flm.pipeline.checkpoint import load_model  # noqa: E402
from flm.pipeline.evaluate import evaluate_sets, yaw_bin_masks  # noqa: E402


def score(errors: np.ndarray, groups: list[np.ndarray]) -> float:
    """A set's score: the mean NME, or the mean of the |yaw| bin means (groups: one mask per bin)."""
    return float(np.mean([errors[m].mean() for m in groups if m.any()]))


def paired(a: np.ndarray, b: np.ndarray, ids: list[str], groups: list[np.ndarray], rounds: int, seed: int = 0):
    """(2.5 %, 97.5 %) of the bootstrap of B - A: identities drawn with replacement inside each group."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids)
    members = [[np.flatnonzero(m & (ids == i)) for i in np.unique(ids[m])] for m in groups]
    diffs = []
    for _ in range(rounds):
        idx = [np.concatenate([faces[k] for k in rng.integers(0, len(faces), len(faces))]) for faces in members]
        diffs.append(np.mean([b[i].mean() - a[i].mean() for i in idx if len(i)]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    models = [load_model(p) for p in (args.a, args.b)]
    rows = {}
    for name, (text, how, norm, _) in SETS.items():
        split = "val" if how == "split" else "all"
        errs = [np.asarray(evaluate_sets(m, [text], split=split)[0]["errors"]) for m in models]
        ds = validation_part(text, how, 0.15, 0)  # the faces evaluate_sets scored, in its order
        bins = yaw_bin_masks(ds) if norm == "bbox" else None
        groups = list(bins.values()) if bins else [np.ones(len(ds), bool)]
        ids = [s.identity if how == "split" else str(j) for j, s in enumerate(ds.samples)]  # AFLW: by image
        a, b = (score(e, groups) for e in errs)
        lo, hi = paired(errs[0], errs[1], ids, groups, args.rounds)
        rows[name] = {"a": a * 100, "b": b * 100, "diff": (b - a) * 100, "ci95": [lo * 100, hi * 100],
                      "faces": len(ds), "people": len(set(ids))}
    print(f"| set | A: {args.a} | B: {args.b} | B - A | 95 % interval | faces (groups) |\n|---|---:|---:|---:|---|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['a']:.2f} | {r['b']:.2f} | {r['diff']:+.2f} | [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] "
              f"| {r['faces']} ({r['people']}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
