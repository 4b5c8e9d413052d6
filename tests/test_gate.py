"""The convention gate: a model of several annotation conventions that tells, from the image, which
one a face's source follows and answers in it (`ShuffleNetHeatmap`, `flm train --gate`)."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from flm.pipeline.augment import AugmentConfig
from flm.pipeline.checkpoint import load_model, save_checkpoint
from flm.pipeline.data import open_dataset
from flm.pipeline.evaluate import CropDataset, evaluate_sets
from flm.pipeline.models import build_model, single_convention
from flm.pipeline.train import TrainConfig, _init_state, run

from tests.helpers.checkpoints import randomised_model
from tests.helpers.cli import flm


def _gated(conventions=("a", "b"), size=64, seed=0):
    """A gated model whose heads give different, non-trivial points (random BN statistics, heatmap
    logits over several units; the second head's weights negated) and whose gate weighs them
    somewhere between 20/80 and 40/60, differently per face."""
    one = randomised_model("shufflenet-heatmap", seed=seed, img_size=size)
    gated = build_model("shufflenet-heatmap", spec=one.spec.with_(conventions=conventions, options=(("gate", True),)))
    gated.load_state_dict(_init_state({"spec": one.spec.to_json(), "state_dict": one.state_dict()}, gated))
    with torch.no_grad():
        gated.heads[0].weight.mul_(-1.0)
        gated.gate[1].weight.normal_(0, 0.02)
        gated.gate[1].bias.copy_(torch.tensor([0.0, 1.0]))
    return gated.eval()


def test_a_gated_model_answers_in_the_gate_weighted_blend_of_its_heads():
    m = _gated()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        y, pooled = m.features(x)
        w = torch.softmax(m.gate(pooled), dim=1)
        a, b = m.out(y), m.heads[0](y)
        got = m.decode(m(x))
        want = m.decode(w[:, 0, None, None, None] * a + w[:, 1, None, None, None] * b)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert 0.05 < float(w[:, 0].min()) and float(w[:, 0].max()) < 0.95  # a blend, not one head
        assert (got - m.decode(a)).abs().max() > 1 and (got - m.decode(b)).abs().max() > 1  # the check can fail
        for k, head in enumerate((a, b)):  # a sure gate: exactly that head's answer
            m.gate[1].bias.copy_(torch.tensor([30.0, 0.0] if k == 0 else [0.0, 30.0]))
            torch.testing.assert_close(m.decode(m(x)), m.decode(head), atol=1e-4, rtol=0)


def test_one_convention_of_a_gated_model_is_that_head_alone_without_the_gate():
    m = _gated()
    one = single_convention(m, "b")
    assert one.gate is None and "gate" not in one.spec.build and one.spec.conventions == ("b",)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(one(x), m(x, torch.ones(2, dtype=torch.long)))
    assert single_convention(m) is m  # no convention named: the gated model as it is


def test_a_gate_starts_afresh_from_an_ungated_checkpoint_and_is_kept_from_its_own():
    plain = build_model("shufflenet-heatmap", spec=build_model("shufflenet-heatmap", 64).spec.with_(conventions=("a", "b")))
    gated = build_model("shufflenet-heatmap", spec=plain.spec.with_(options=(("gate", True),)))
    fresh = gated.state_dict()["gate.1.weight"].clone()
    gated.load_state_dict(_init_state({"spec": plain.spec.to_json(), "state_dict": plain.state_dict()}, gated))
    torch.testing.assert_close(gated.state_dict()["gate.1.weight"], fresh)
    torch.testing.assert_close(gated.out.weight, plain.out.weight)
    trained = _gated(seed=2)
    with torch.no_grad():
        trained.gate[1].weight.fill_(0.25)
    gated.load_state_dict(_init_state({"spec": trained.spec.to_json(), "state_dict": trained.state_dict()}, gated))
    assert float(gated.gate[1].weight.detach()[0, 0]) == 0.25


def _two_looks(tmp_path):
    """Two synthetic sources that look different (one with inverted colours)."""
    from flm.pipeline.data.synthetic import synthetic_dataset, write_udacity
    a, b = tmp_path / "look-a", tmp_path / "look-b"
    write_udacity(synthetic_dataset(32, seed=1), a)
    write_udacity(synthetic_dataset(32, seed=2), b)
    for p in (b / "images").iterdir():
        cv2.imwrite(str(p), 255 - cv2.imread(str(p)))
    return a, b


def test_the_gate_learns_which_source_a_face_comes_from(tmp_path):
    a, b = _two_looks(tmp_path)
    cfg = TrainConfig(data=[f"udacity:{a}", f"udacity:{b}"], val=["split"], img_size=64, epochs=12, batch_size=8,
                      workers=0, device="cpu", out=str(tmp_path / "run"), lr=1e-3, gate=True,
                      augment=AugmentConfig.off(), val_fraction=0.25)
    run(cfg)
    model = load_model(tmp_path / "run" / "best.pt")
    assert model.spec.build == {"gate": True} and model.gate is not None
    for k, folder in enumerate((a, b)):
        ds = open_dataset(f"udacity:{folder}")
        x = torch.stack([CropDataset(ds, model.spec)[i][0] for i in range(len(ds))])
        with torch.no_grad():
            p = torch.softmax(model.gate(model.features(x)[1]), dim=1)[:, k]
        assert (p > 0.5).float().mean() >= 0.9, (folder.name, p)  # each source's own convention, both ways
    results = evaluate_sets(model, [f"udacity:{a}"])
    assert results[0]["convention"] == "gate"  # auto: what the gated model answers


def test_gate_with_one_convention_is_one_clear_error(tmp_path):
    r = flm("train", "--data", "synthetic:24", "--gate", "--epochs", "1", "--out", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert "--gate" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_gated_checkpoint_exports_with_its_gate_and_passes_parity(tmp_path):
    from flm.cli import main
    from flm.exporters.onnx import open_onnx
    from flm.exporters.parity import make_inputs, run_exported

    m = _gated(seed=1)
    save_checkpoint(tmp_path / "m.pt", m)
    assert main(["export", str(tmp_path / "m.pt"), "--target", "onnx", "--out", str(tmp_path / "x"),
                 "--samples", "2"]) == 0
    exported = open_onnx(tmp_path / "x" / "model.onnx")
    assert exported.spec.build == {"gate": True} and exported.spec.conventions == ("a", "b")
    inputs = make_inputs(m.spec, 3)
    got = run_exported(exported, inputs)["landmarks"]
    with torch.no_grad():
        x = torch.from_numpy(inputs.tensor)
        blend, first = m.decode(m(x)).numpy(), m.decode(m.out(m.features(x)[0])).numpy()
    np.testing.assert_allclose(got, blend, atol=1e-3)
    assert np.abs(got - first).max() > 1  # the file holds the gate, not just the first head
    # `flm verify` compares the file with the gated checkpoint it came from, and with no other
    args = ["verify", str(tmp_path / "x" / "model.onnx"), "--samples", "2", "--against"]
    assert main([*args, str(tmp_path / "m.pt")]) == 0
    save_checkpoint(tmp_path / "other.pt", _gated(seed=2))
    assert main([*args, str(tmp_path / "other.pt")]) == 1


def test_a_gated_run_resumes_exactly(tmp_path):
    """The gate's own optimiser group and BatchNorm statistics come back with `--resume`."""
    from flm.pipeline.checkpoint import read_checkpoint, state_digest

    a, b = _two_looks(tmp_path)

    def cfg(out, **kw):
        return TrainConfig(data=[f"udacity:{a}", f"udacity:{b}"], val=["split"], img_size=64, epochs=2,
                           batch_size=8, workers=0, device="cpu", out=str(tmp_path / out), lr=1e-3, gate=True,
                           augment=AugmentConfig(), val_fraction=0.25, **kw)

    full = run(cfg("full"))
    steps = full["history"][0]["step"]
    assert run(cfg("part", max_steps=steps))["epochs_done"] == 1
    resumed = run(cfg("part", resume=str(tmp_path / "part" / "last.pt")))
    assert resumed["history"][-1]["train_loss"] == full["history"][-1]["train_loss"]
    digests = [state_digest(read_checkpoint(tmp_path / d / "last.pt")["state_dict"]) for d in ("full", "part")]
    assert digests[0] == digests[1]
    gate = read_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]["gate.0.running_var"]
    assert float(gate.std()) > 0  # the gate's statistics were learnt, so the digest covers them


def test_a_gated_checkpoint_exports_to_core_ml_and_passes_parity(tmp_path):
    """The gate's ops (pooling, BatchNorm, linear, softmax, the weighted sum) run in the MIL evaluator."""
    from flm.cli import main

    save_checkpoint(tmp_path / "m.pt", _gated(seed=3))
    assert main(["export", str(tmp_path / "m.pt"), "--target", "coreml", "--out", str(tmp_path / "x"),
                 "--samples", "2"]) == 0
    assert (tmp_path / "x" / "model.mlpackage").is_dir()
