"""Model presets. Each builds an `nn.Module` that carries its `ModelSpec`.

Every model's `forward(x)` returns its raw output (heatmap logits `(N, K, h, w)` or
coordinates `(N, 2K)`), and `decode(raw)` turns that into `(N, K, 2)` landmarks in model-input
pixels. Exporters wrap the two so an exported file can return coordinates directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.shufflenetv2 import ShuffleNetV2

from flm.errors import UsageError
from flm.spec import CropRule, ModelSpec, build_options

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.25,)


def memory_format(device: torch.device) -> torch.memory_format:
    """How weights and images are laid out for training and evaluation: channels-last on CPU, where
    oneDNN's convolutions are faster in it (flm-68-distilled, one thread: a training step of 32
    faces at 192 px 0.34 vs 0.45 s; two threads, no grad: 64 faces 0.14 vs 0.23 s); as they
    come elsewhere. The numbers are the same up to float rounding."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def soft_argmax(logits: torch.Tensor, input_size: int) -> torch.Tensor:
    """Torch twin of `flm.geometry.soft_argmax` (sub-pixel, differentiable, exportable)."""
    n, k, h, w = logits.shape
    p = torch.softmax(logits.reshape(n, k, h * w), dim=-1).reshape(n, k, h, w)
    xs = torch.arange(w, dtype=logits.dtype, device=logits.device)
    ys = torch.arange(h, dtype=logits.dtype, device=logits.device)
    x = (p.sum(dim=2) * xs).sum(dim=-1)
    y = (p.sum(dim=3) * ys).sum(dim=-1)
    stride = input_size / w
    return (torch.stack([x, y], dim=-1) + 0.5) * stride - 0.5


class LandmarkModel(nn.Module):
    spec: ModelSpec

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        if self.spec.output == "heatmap":
            return soft_argmax(raw, self.spec.input_size)
        s = self.spec.input_size
        # regressors predict offsets from the crop centre in units of the crop side
        return raw.reshape(raw.shape[0], -1, 2) * s + (s - 1) / 2.0


def _deconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _light_up(cin: int, cout: int) -> nn.Sequential:
    """A cheaper x2 upsampling: a 1x1 convolution to `cout` channels, then a depthwise 4x4 transposed
    one (cin*cout + 16*cout weights against `_deconv`'s 16*cin*cout; the model card's speed table)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.ConvTranspose2d(cout, cout, 4, stride=2, padding=1, groups=cout, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


UPSAMPLING = {"deconv": _deconv, "light": _light_up}  # the heatmap head's x2 steps (`--upsample`)


def check_upsample(name: str | None) -> None:
    """UsageError unless `name` is None (the preset's default) or a kind of `UPSAMPLING`."""
    if name is not None and name not in UPSAMPLING:
        raise UsageError(f"--upsample {name!r}: expected one of {', '.join(UPSAMPLING)}",
                         example="flm train --upsample light")


def _conv1x1(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


SHUFFLE_WIDTHS = {0.5: (24, 48, 96, 192), 1.0: (24, 116, 232, 464), 1.5: (24, 176, 352, 704),
                  2.0: (24, 244, 488, 976)}


HEAD_LAYERS = ("up1.", "up2.", "skip3.", "skip2.", "out.", "heads.")  # ShuffleNetHeatmap's, after its trunk


class ShuffleNetHeatmap(LandmarkModel):
    """ShuffleNetV2 trunk (no conv5) + two x2 upsamplings to stride 8, one heatmap per point.

    Skip connections from the stride-16 and stride-8 stages give the head the fine detail
    that upsampling stride-32 features alone lacks; they cost ~60 k parameters. The upsamplings
    are 4x4 deconvolutions, or with `upsample="light"` the cheaper `_light_up`.
    """

    def __init__(self, spec: ModelSpec, width: float = 1.0, head=(192, 128), upsample: str = "deconv"):
        super().__init__()
        self.spec = spec
        check_upsample(upsample)
        c = SHUFFLE_WIDTHS[width]
        trunk = ShuffleNetV2([4, 8, 4], [*c, 1024])
        if spec.channels != 3:
            trunk.conv1[0] = nn.Conv2d(spec.channels, c[0], 3, 2, 1, bias=False)
        self.stem = nn.Sequential(trunk.conv1, trunk.maxpool)
        self.stage2, self.stage3, self.stage4 = trunk.stage2, trunk.stage3, trunk.stage4
        up = UPSAMPLING[upsample]
        self.up1, self.up2 = up(c[3], head[0]), up(head[0], head[1])
        self.skip3, self.skip2 = _conv1x1(c[2], head[0]), _conv1x1(c[1], head[1])
        self.out = nn.Conv2d(head[1], spec.num_points, 1)
        # one more 1x1 heatmap head per further annotation convention (spec.conventions[1:])
        self.heads = nn.ModuleList(nn.Conv2d(head[1], spec.num_points, 1) for _ in spec.conventions[1:])
        # With several conventions, optionally a gate: which convention the face's source follows,
        # told from the trunk's pooled features (stride 8 to 32: the stride-8 ones carry how sharp
        # and how compressed the photo is); the model then answers in a blend of its heads.
        # (Its BatchNorm keeps a plain average of the batches' statistics, with no trace of its init.)
        pooled = c[1] + c[2] + c[3]
        self.gate = (nn.Sequential(nn.BatchNorm1d(pooled, momentum=None), nn.Linear(pooled, len(spec.conventions)))
                     if spec.gated else None)

    def features(self, x):
        """(the heads' input features, the trunk's pooled features the gate reads)."""
        s2 = self.stage2(self.stem(x))
        s3 = self.stage3(s2)
        s4 = self.stage4(s3)
        y = torch.relu(self.up1(s4) + self.skip3(s3))
        pooled = torch.cat([s4.mean(dim=(2, 3)), s3.mean(dim=(2, 3)), s2.mean(dim=(2, 3))], dim=1)
        return torch.relu(self.up2(y) + self.skip2(s2)), pooled

    def forward(self, x, head=None, with_gate: bool = False):
        """Heatmap logits: of the first convention's head (or, for a gated model, the gate's blend of
        every head, see `_blend`), or with `head` (N,) of each face's own convention (training on
        several conventions at once); `with_gate` adds the gate's logits, computed on detached
        features so that learning to tell the sources apart leaves the landmarks alone."""
        y, pooled = self.features(x)
        if head is None and self.gate is None or not len(self.heads):
            return self.out(y)
        if head is None:
            return _blend(y, *self._head_weights(), self.gate(pooled))
        raw = self._every_head(y)[torch.arange(len(x), device=x.device), head]
        return (raw, self.gate(pooled.detach())) if with_gate else raw

    def _head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's 1x1 weights (S, K, C) and biases (S, K), conventions in the spec's order."""
        heads = (self.out, *self.heads)
        return torch.stack([h.weight.flatten(1) for h in heads]), torch.stack([h.bias for h in heads])

    def _every_head(self, y):
        """(N, S, K, h, w) logits of every head, as one convolution (training: a head per face)."""
        weight, bias = self._head_weights()
        every = F.conv2d(y, weight.flatten(0, 1)[..., None, None], bias.flatten())
        return every.reshape(-1, *weight.shape[:2], *every.shape[2:])

    def convention_head(self, name: str) -> nn.Conv2d:
        """The output layer of convention `name` (KeyError naming the known ones)."""
        names = self.spec.conventions or ("",)
        if name not in names:
            raise KeyError(f"no convention {name!r}; this model has {', '.join(names)}")
        i = names.index(name)
        return self.out if i == 0 else self.heads[i - 1]


def _blend(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """The heads' heatmap logits on features `y` (heads of `weight` (S, K, C) and `bias` (S, K)),
    weighted by the gate's probabilities (a geometric mixture of their distributions): with a sure
    gate the answer is that head's, in between it moves from one head's points towards the other's.
    Measured as accurate as mixing the heads' points on the validation sets (the model card). The
    heads are linear (1x1 convolutions), so their weights are blended first, per face, and applied
    once: the cost of one head, not one per convention."""
    w = torch.softmax(gate_logits, dim=1)  # (N, S)
    n, c, hh, ww = y.shape
    s, k, _ = weight.shape
    per_face = (w @ weight.reshape(s, -1)).reshape(n, k, c)
    return (torch.bmm(per_face, y.reshape(n, c, hh * ww)) + (w @ bias).unsqueeze(2)).reshape(n, k, hh, ww)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


class ResNetRegressor(LandmarkModel):
    """ResNet-style trunk (7x7 stem, residual stages), global pooling, linear coordinate head."""

    def __init__(self, spec: ModelSpec, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
        super().__init__()
        self.spec = spec
        layers = [nn.Conv2d(spec.channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, 2 * spec.num_points)

    def forward(self, x):
        return self.fc(self.features(x))


class SimpleCNN(LandmarkModel):
    """Seed 002: four conv + max-pool blocks, dropout, two fully connected layers."""

    def __init__(self, spec: ModelSpec, hidden: int = 256):
        super().__init__()
        self.spec = spec
        chans, blocks, cin = (32, 64, 128, 256), [], spec.channels
        for i, c in enumerate(chans):
            blocks += [nn.Conv2d(cin, c, (5, 3, 3, 3)[i], padding="same"), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2), nn.Dropout(0.1 * (i + 1))]
            cin = c
        side = spec.input_size // 16
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(hidden, 2 * spec.num_points))

    def forward(self, x):
        return self.head(self.features(x))


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable[[ModelSpec, dict], LandmarkModel]
    spec: ModelSpec  # at the default configuration
    options: tuple[str, ...] = ()  # builder keyword options a user may set (e.g. width)


def _spec(preset, points, scheme, size, channels, output, heatmap_stride=None) -> ModelSpec:
    rgb = channels == 3
    return ModelSpec(preset=preset, num_points=points, scheme=scheme, input_size=size, channels=channels,
                     color_order="RGB" if rgb else "GRAY", mean=IMAGENET_MEAN if rgb else GRAY_MEAN,
                     std=IMAGENET_STD if rgb else GRAY_STD, output=output,
                     heatmap_size=size // heatmap_stride if heatmap_stride else None, crop=CropRule())


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("shufflenet-heatmap", "ShuffleNetV2 x1.0 trunk (no conv5), 2-deconv head, soft-argmax (default)",
           lambda s, o: ShuffleNetHeatmap(s, width=o.get("width", 1.0), head=tuple(o.get("head", (192, 128))),
                                          upsample=o.get("upsample", "deconv")),
           _spec("shufflenet-heatmap", 68, "ibug68", 128, 3, "heatmap", 8), ("width", "head", "gate", "upsample")),
    Preset("resnet-regressor", "grayscale ResNet-18 layout at 1/2 width, coordinate head (fits 15 MB)",
           lambda s, o: ResNetRegressor(s, widths=tuple(int(w * o.get("width", 0.5)) for w in (64, 128, 256, 512))),
           _spec("resnet-regressor", 68, "ibug68", 128, 1, "coords"), ("width",)),
    Preset("resnet18-regressor", "the seeds' full grayscale ResNet-18, 136 outputs (11.2 M, over 15 MB)",
           lambda s, o: ResNetRegressor(s), _spec("resnet18-regressor", 68, "ibug68", 224, 1, "coords")),
    Preset("resnet-eyes", "seed 001: half-width grayscale ResNet, 12 eye points (24 outputs)",
           lambda s, o: ResNetRegressor(s, widths=(32, 64, 128, 256)),
           _spec("resnet-eyes", 12, "eyes12", 96, 1, "coords")),
    Preset("scn-98", "seed 000: 7x7 conv, residual blocks 64-128-256-512, pooling, FC head, 98 points",
           lambda s, o: ResNetRegressor(s, blocks=(1, 1, 1, 1)), _spec("scn-98", 98, "wflw98", 112, 3, "coords")),
    Preset("simple-cnn", "seed 002: four conv+pool blocks, dropout, two FC layers (grayscale)",
           lambda s, o: SimpleCNN(s), _spec("simple-cnn", 68, "ibug68", 96, 1, "coords")),
]}

DEFAULT_PRESET = "shufflenet-heatmap"


def preset_options(width: float | None = None, head=None, gate: bool = False, upsample: str | None = None) -> dict:
    """The build options a user set (`--width`, `--head`, `--gate`, `--upsample`); the others keep the
    preset's defaults."""
    return {k: v for k, v in (("width", width), ("head", head), ("gate", gate or None), ("upsample", upsample))
            if v is not None}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}",
                         example="flm train --model shufflenet-heatmap")
    return PRESETS[name]


def build_model(name: str, img_size: int | None = None, options: dict | None = None,
                spec: ModelSpec | None = None) -> LandmarkModel:
    """Build preset `name`; `spec` (from a checkpoint) wins over `img_size`, and its build options
    over `options` (those of files written before the spec held them). The model's spec records
    the options it was built with."""
    preset = get_preset(name)
    options = {**(options or {}), **(spec.build if spec is not None else {})}
    unknown = set(options) - set(preset.options)
    if unknown:
        raise UsageError(f"preset {name!r} has no option(s) {sorted(unknown)}; it accepts {list(preset.options)}")
    _check_width(name, options.get("width"))
    if spec is None:
        spec = preset.spec
        if img_size is not None and img_size != spec.input_size:
            if img_size % 32 or img_size < 32:
                raise UsageError(f"--img-size must be a positive multiple of 32, got {img_size}",
                                 example="flm train --img-size 128")
            stride = spec.input_size // spec.heatmap_size if spec.heatmap_size else None
            spec = spec.with_(input_size=img_size, heatmap_size=img_size // stride if stride else None)
    return preset.build(spec.with_(options=build_options(options)), options)


def _check_width(preset: str, width: float | None) -> None:
    """UsageError for a --width the preset cannot build: ShuffleNetV2 exists at four widths, the
    ResNet layouts at any fraction that leaves their first layer a channel (64 x width >= 1)."""
    shuffle = preset == "shufflenet-heatmap"
    if width is None or (width in SHUFFLE_WIDTHS if shuffle else isinstance(width, (int, float)) and 64 * width >= 1):
        return
    allowed = ", ".join(map(str, SHUFFLE_WIDTHS)) if shuffle else "a fraction of at least 1/64 (0.5: half the channels)"
    raise UsageError(f"--width {width}: {preset} is built at {allowed}",
                     example=f"flm train --model {preset} --width 0.5")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def single_convention(model: LandmarkModel, name: str | None = None) -> LandmarkModel:
    """`model` with one output head, that of annotation convention `name` (default: its first), as an
    exported file holds it: the spec then names that convention alone. Models of one convention
    come back as they are."""
    names = model.spec.conventions
    if len(names) <= 1 and name in (None, *names):
        return model
    if name is not None and name not in names:
        raise UsageError(f"--convention {name!r}: this model learnt {', '.join(names) or 'one convention'}",
                         example=f"flm export best.pt --convention {names[0]}" if names else "flm export best.pt")
    if name is None and model.spec.gated:
        return model  # a gated model's output is its blend of every head
    name = name or names[0]
    options = build_options({k: v for k, v in model.spec.build.items() if k != "gate"})
    one = build_model(model.spec.preset, spec=model.spec.with_(conventions=(name,), options=options))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("out.", "heads.", "gate."))}
    state.update({f"out.{k}": v for k, v in model.convention_head(name).state_dict().items()})
    one.load_state_dict(state)
    return one.train(model.training)
