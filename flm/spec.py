"""The model spec: the one contract that travels with every flm model.

Training writes it into the checkpoint, exporters write it into ONNX `metadata_props`
(key `flm.spec`) and Core ML user metadata, and the runtime reads it back and refuses a
file without it. Nothing about preprocessing is ever guessed from shapes or file names.

Pure Python on purpose: the torch-free runtime imports this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

from flm import __version__
from flm.errors import SpecError

SPEC_METADATA_KEY = "flm.spec"
SPEC_FORMAT = "flm-spec/1"

# The names of an exported file's input and outputs, declared once: the exporters write them,
# their checks and the runtime read them (`flm.exporters` describes the shapes).
INPUT = "input"  # float32 [N, C, S, S], normalised as `flm.geometry.to_model_input` does
LANDMARKS = "landmarks"  # [N, K, 2] model-input pixels
HEATMAPS = "heatmaps"  # [N, K, h, w] logits (heatmap models)
CONFIDENCE = "confidence"  # [N, K] per point: heatmap models' peak probability; the runtime reads it when present

# Landmark schemes flm knows, with the indices apps and metrics rely on.
SCHEMES: dict[str, dict] = {
    "ibug68": {"points": 68, "outer_eyes": (36, 45), "pupils": None},
    "wflw98": {"points": 98, "outer_eyes": (60, 72), "pupils": (96, 97)},
    # the 12 eye points of ibug68 (36..47), in that order
    "eyes12": {"points": 12, "outer_eyes": (0, 9), "pupils": None},
}


# How a source scheme's points map onto a model's scheme: index of each model point in the source.
# WFLW -> 68 is the standard map (jaw every second point, the upper brow contours, nose, the
# eye corners and lids without the 3 extra lid points, mouth) used by PIPNet, HRNet and others.
_WFLW_TO_68 = (list(range(0, 33, 2)) + [33, 34, 35, 36, 37, 42, 43, 44, 45, 46] + list(range(51, 60))
               + [60, 61, 63, 64, 65, 67, 68, 69, 71, 72, 73, 75] + list(range(76, 96)))
SCHEME_MAPS: dict[tuple[str, str], tuple[int, ...]] = {
    ("wflw98", "ibug68"): tuple(_WFLW_TO_68),
    ("ibug68", "eyes12"): tuple(range(36, 48)),
    ("wflw98", "eyes12"): tuple(_WFLW_TO_68[36:48]),
}


def scheme_index(source: str, target: str) -> tuple[int, ...] | None:
    """Indices of `target`'s points inside `source`'s scheme; None when they are the same scheme.
    Raises SpecError when `source` cannot give `target`'s points (e.g. 12 eye points for 68)."""
    if source == target:
        return None
    if (source, target) not in SCHEME_MAPS:
        raise SpecError(f"{source} points cannot be mapped to {target} "
                        f"(known maps: {', '.join(f'{a}->{b}' for a, b in SCHEME_MAPS)})")
    return SCHEME_MAPS[(source, target)]


def build_options(options: dict) -> tuple[tuple[str, object], ...]:
    """`options` as ModelSpec stores them: sorted (name, value) pairs, lists made tuples."""
    if not isinstance(options, dict):
        raise TypeError(f"options must be an object, got {type(options).__name__}")
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


@dataclass(frozen=True)
class CropRule:
    """How a face crop is cut from an image, relative to a face box.

    The box is the tight box of the landmarks during training (the challenge forbids a
    detector there); the crop is a square of side `scale * max(w, h)` centred on the box
    centre shifted by `shift_y * h`, resized to the model input. Pixels outside the
    image are zero.
    """

    source: str = "landmark-box"
    scale: float = 1.25
    shift_y: float = 0.0
    square: bool = True


@dataclass(frozen=True)
class ModelSpec:
    preset: str
    num_points: int
    scheme: str
    input_size: int
    channels: int  # 3 = colour, 1 = grayscale
    color_order: str  # "RGB" or "GRAY": what the model input expects after decoding an image
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    output: str  # "heatmap" (K maps, decoded by soft-argmax) or "coords"
    heatmap_size: int | None = None
    crop: CropRule = field(default_factory=CropRule)
    # Where coordinates live: pixel centres at integers, in the model input (0..input_size-1 span).
    coords: str = "input-pixels"
    flm_version: str = __version__
    training_data: str = ""
    # Annotation conventions the model learnt, one output head each (the first is what the model's
    # `landmarks` output follows); empty = one convention, that of its training data.
    conventions: tuple[str, ...] = ()
    # The preset's build options (e.g. width, head), sorted (name, value) pairs, so that a file
    # rebuilds the same architecture: `build_model(spec.preset, spec=spec)`.
    options: tuple[tuple[str, object], ...] = ()
    licence: str = "Model weights: see the model card. Training data licences apply."
    format: str = SPEC_FORMAT

    def __post_init__(self):
        if self.scheme in SCHEMES and SCHEMES[self.scheme]["points"] != self.num_points:
            raise SpecError(f"spec: scheme {self.scheme!r} has {SCHEMES[self.scheme]['points']} points, "
                            f"num_points is {self.num_points}")
        if self.channels not in (1, 3):
            raise SpecError(f"spec: channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise SpecError(f"spec: mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if self.output not in ("heatmap", "coords"):
            raise SpecError(f"spec: output must be 'heatmap' or 'coords', got {self.output!r}")
        if self.output == "heatmap" and not self.heatmap_size:
            raise SpecError("spec: a heatmap model needs heatmap_size")
        if self.color_order not in ("RGB", "BGR", "GRAY"):
            raise SpecError(f"spec: color_order must be RGB, BGR or GRAY, got {self.color_order!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["conventions"] = list(self.conventions)
        d["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "spec") -> "ModelSpec":
        if not isinstance(d, dict):
            raise SpecError(f"{source}: the flm spec must be a JSON object, got {type(d).__name__}")
        if d.get("format") != SPEC_FORMAT:
            raise SpecError(f"{source}: spec format {d.get('format')!r} is not {SPEC_FORMAT!r}")
        known = {f.name for f in fields(cls)}
        required = {"preset", "num_points", "scheme", "input_size", "channels", "color_order",
                    "mean", "std", "output"}
        missing = sorted(required - d.keys())
        if missing:
            raise SpecError(f"{source}: spec lacks field(s) {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in known}
        try:
            kw["mean"], kw["std"] = tuple(float(v) for v in kw["mean"]), tuple(float(v) for v in kw["std"])
            kw["crop"] = CropRule(**kw.get("crop", {}))
            kw["conventions"] = tuple(str(c) for c in kw.get("conventions", ()))
            kw["options"] = build_options(kw.get("options", {}))
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{source}: invalid spec: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "spec") -> "ModelSpec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: flm spec is not valid JSON ({e.msg} at char {e.pos})") from None
        return cls.from_dict(d, source)

    def with_(self, **changes) -> "ModelSpec":
        return replace(self, **changes)

    @property
    def build(self) -> dict:
        """The build options as keyword arguments."""
        return dict(self.options)

    @property
    def gated(self) -> bool:
        """Whether the model answers through a gate over its conventions' heads (`flm train --gate`)."""
        return bool(self.build.get("gate")) and len(self.conventions) > 1

    @property
    def outer_eyes(self) -> tuple[int, int]:
        return SCHEMES[self.scheme]["outer_eyes"]
