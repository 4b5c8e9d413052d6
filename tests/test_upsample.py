"""The heatmap head's x2 steps: 4x4 deconvolutions (the preset's) or the cheaper `light` ones (a 1x1
convolution, then a depthwise 4x4 transposed one): `flm train --upsample light`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flm.pipeline.checkpoint import load_model, save_checkpoint
from flm.pipeline.models import build_model, count_parameters
from flm.pipeline.train import _init_state

from tests.helpers.checkpoints import randomised_model
from tests.helpers.cli import flm

LIGHT = {"upsample": "light"}


def test_light_upsampling_is_a_1x1_then_a_depthwise_deconvolution_with_the_same_output():
    deconv, light = build_model("shufflenet-heatmap", 96), build_model("shufflenet-heatmap", 96, LIGHT)
    assert light.spec.build == LIGHT and "upsample" not in deconv.spec.build
    first, depthwise = light.up1[0], light.up1[3]
    assert isinstance(first, nn.Conv2d) and first.kernel_size == (1, 1) and (first.in_channels, first.out_channels) == (464, 192)
    assert isinstance(depthwise, nn.ConvTranspose2d) and depthwise.groups == 192 and depthwise.stride == (2, 2)
    ups = [sum(p.numel() for p in m.parameters()) for m in (deconv.up1, light.up1)]
    assert ups == [464 * 192 * 16 + 2 * 192, 464 * 192 + 192 * 16 + 4 * 192]
    assert count_parameters(deconv) - count_parameters(light) > 1_500_000
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert deconv.eval()(x).shape == light.eval()(x).shape == (2, 68, 12, 12)


def test_an_unknown_upsampling_is_one_clear_error(tmp_path):
    r = flm("train", "--data", "synthetic:24", "--upsample", "bilinear", "--epochs", "1", "--out", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert "--upsample 'bilinear'" in r.stderr and "deconv, light" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_light_upsamplings_start_afresh_from_a_deconvolution_checkpoint_and_the_rest_is_kept():
    src = randomised_model("shufflenet-heatmap", seed=1, img_size=64)
    light = build_model("shufflenet-heatmap", 64, LIGHT)
    fresh = {k: v.clone() for k, v in light.state_dict().items() if k.startswith(("up1.", "up2."))}
    light.load_state_dict(_init_state({"spec": src.spec.to_json(), "state_dict": src.state_dict()}, light))
    for k, v in light.state_dict().items():
        want = fresh[k] if k in fresh else src.state_dict()[k]
        torch.testing.assert_close(v, want, msg=k)
    other = randomised_model("shufflenet-heatmap", seed=2, img_size=64, options=LIGHT)
    light.load_state_dict(_init_state({"spec": other.spec.to_json(), "state_dict": other.state_dict()}, light))
    torch.testing.assert_close(light.up1[0].weight, other.up1[0].weight)  # the same kind: kept
    assert (light.up1[0].weight - fresh["up1.0.weight"]).abs().max() > 0.01


def test_a_light_model_trains_and_its_checkpoint_rebuilds_it(tmp_path):
    r = flm("train", "--data", "synthetic:24", "--upsample", "light", "--img-size", "64", "--epochs", "1",
            "--max-steps", "2", "--batch-size", "8", "--workers", "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    model = load_model(tmp_path / "run" / "last.pt")
    assert model.spec.build == LIGHT and model.up2[3].groups == 128


def test_a_light_model_exports_to_onnx_and_core_ml_with_parity(tmp_path):
    """The depthwise transposed convolution runs in onnxruntime and in the MIL evaluator."""
    from flm.cli import main
    from flm.exporters.onnx import open_onnx
    from flm.exporters.parity import make_inputs, run_exported

    m = randomised_model("shufflenet-heatmap", seed=3, img_size=64, options=LIGHT)
    save_checkpoint(tmp_path / "m.pt", m)
    assert main(["export", str(tmp_path / "m.pt"), "--target", "all", "--out", str(tmp_path / "x"),
                 "--samples", "2"]) == 0
    exported = open_onnx(tmp_path / "x" / "model.onnx")
    assert exported.spec.build == LIGHT and (tmp_path / "x" / "model.mlpackage").is_dir()
    inputs = make_inputs(m.spec, 3)
    got = run_exported(exported, inputs)["landmarks"]
    with torch.no_grad():
        want = m.decode(m(torch.from_numpy(inputs.tensor))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.abs(want - want.mean(axis=0)).max() > 1  # the faces' points differ: a comparison that can fail


def test_head_layers_of_another_width_start_afresh_and_a_trunk_of_another_width_is_refused():
    src = randomised_model("shufflenet-heatmap", seed=1, img_size=64)
    narrow = build_model("shufflenet-heatmap", 64, {"head": [64, 48], **LIGHT})
    head_layers = ("up1.", "up2.", "skip3.", "skip2.", "out.")
    fresh = {k: v.clone() for k, v in narrow.state_dict().items() if k.startswith(head_layers)}
    narrow.load_state_dict(_init_state({"spec": src.spec.to_json(), "state_dict": src.state_dict()}, narrow))
    for k, v in narrow.state_dict().items():
        torch.testing.assert_close(v, fresh[k] if k in fresh else src.state_dict()[k], msg=k)
    assert len(fresh) > 10 and any(k.startswith("stage4.") for k in narrow.state_dict())
    thinner = build_model("shufflenet-heatmap", 64, {"width": 0.5})
    with pytest.raises(RuntimeError, match="size mismatch"):  # --init then says the weights do not fit
        thinner.load_state_dict(_init_state({"spec": src.spec.to_json(), "state_dict": src.state_dict()}, thinner))
