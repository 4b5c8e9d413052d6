"""A few real training steps on generated faces: loss falls, checkpoints resume exactly."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from flm.errors import ModelFileError, TrainingError
from flm.pipeline.augment import AugmentConfig
from flm.pipeline.checkpoint import load_model, read_checkpoint, save_checkpoint
from flm.pipeline.data import open_dataset
from flm.pipeline.models import build_model, memory_format
from flm.pipeline.train import TrainConfig, train

from tests.helpers.checkpoints import randomised_model
from tests.helpers.cli import flm


@pytest.fixture(scope="module")
def faces():
    ds = open_dataset("synthetic:48:3")
    return ds.split_by_identity(0.25, seed=0)


def small_cfg(tmp_path, **kw):
    base = dict(model="shufflenet-heatmap", img_size=64, epochs=2, batch_size=8, lr=2e-3, workers=0,
                out=str(tmp_path / "run"), device="cpu", augment=AugmentConfig.off(), seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_identity_split_holds_people_out(faces):
    tr, va = faces
    assert {s.identity for s in tr.samples}.isdisjoint({s.identity for s in va.samples})
    assert len(va) > 0 and len(tr) > len(va)


def test_training_steps_reduce_loss(tmp_path, faces):
    tr, va = faces
    summary = train(small_cfg(tmp_path, epochs=4), tr, va)
    h = summary["history"]
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"], h
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    model = load_model(tmp_path / "run" / "best.pt")
    assert model.spec.input_size == 64 and model.spec.training_data.startswith(tr.name)


def test_resume_after_one_epoch_matches_exactly(tmp_path, faces):
    tr, va = faces
    full = train(small_cfg(tmp_path / "a", epochs=2, augment=AugmentConfig()), tr, va)
    # a 2-epoch schedule stopped by a signal-like max_steps at the end of epoch 1
    steps = full["history"][0]["step"]
    part = train(small_cfg(tmp_path / "b", epochs=2, augment=AugmentConfig(), max_steps=steps), tr, va)
    assert part["epochs_done"] == 1
    res = train(small_cfg(tmp_path / "b", epochs=2, augment=AugmentConfig(),
                          resume=str(tmp_path / "b" / "run" / "last.pt")), tr, va)
    assert res["history"][-1]["val_nme"] == pytest.approx(full["history"][-1]["val_nme"], rel=1e-5)
    assert res["history"][-1]["train_loss"] == pytest.approx(full["history"][-1]["train_loss"], rel=1e-5)


def test_channels_last_is_a_layout_not_a_different_training(tmp_path, faces, monkeypatch):
    """On CPU training and evaluation lay weights and images out channels-last (faster); the same
    run in the default layout must give the same numbers, and the saved weights load into a plain
    model."""
    assert memory_format(torch.device("cpu")) == torch.channels_last
    tr, va = faces
    runs = {}
    for layout in (torch.channels_last, torch.preserve_format):
        for where in ("flm.pipeline.train", "flm.pipeline.evaluate"):
            monkeypatch.setattr(f"{where}.memory_format", lambda device, layout=layout: layout)
        runs[layout] = train(small_cfg(tmp_path / str(layout), epochs=1), tr, va)
    fast, plain = runs[torch.channels_last]["history"][0], runs[torch.preserve_format]["history"][0]
    assert fast["train_loss"] == pytest.approx(plain["train_loss"], rel=2e-3)  # float rounding only
    assert fast["val_nme"] == pytest.approx(plain["val_nme"], rel=2e-3)
    saved = {layout: read_checkpoint(tmp_path / str(layout) / "run" / "last.pt")["state_dict"] for layout in runs}
    name = next(k for k, v in saved[torch.channels_last].items() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1)
    # the patch took effect: the weights trained (and were saved) in the layout each run was given
    assert saved[torch.channels_last][name].is_contiguous(memory_format=torch.channels_last)
    assert not saved[torch.channels_last][name].is_contiguous()
    assert saved[torch.preserve_format][name].is_contiguous()
    loaded = load_model(tmp_path / str(torch.channels_last) / "run" / "last.pt").state_dict()[name]
    assert loaded.is_contiguous() and torch.equal(loaded, saved[torch.channels_last][name])  # a plain model again


def test_nan_loss_stops_with_the_step_named(tmp_path, faces):
    tr, va = faces
    with pytest.raises(TrainingError, match=r"epoch 1 step 1"):
        train(small_cfg(tmp_path, heatmap_sigma=float("nan")), tr, va)


def test_checkpoint_refuses_foreign_and_truncated_files(tmp_path):
    model = build_model("resnet-eyes")
    good = save_checkpoint(tmp_path / "m.pt", model)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="trunc.pt"):
        load_model(tmp_path / "trunc.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match="not an flm checkpoint"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "code.pt").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would import os.system
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "code.pt")
    loaded = load_model(good)
    x = torch.randn(1, 1, 96, 96)
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_init_fine_tunes_at_another_input_size(tmp_path, faces):
    tr, va = faces
    first = train(small_cfg(tmp_path / "a", epochs=1), tr, va)
    init = str(tmp_path / "a" / "run" / "best.pt")
    cfg = small_cfg(tmp_path / "b", epochs=1, img_size=96, max_steps=1, init=init)
    # before any step the fine-tuned model holds exactly the initial weights
    from flm.pipeline.train import _load_init_weights
    model = build_model("shufflenet-heatmap", 96)
    _load_init_weights(model, init)
    src = load_model(init)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    second = train(cfg, tr, va)
    assert load_model(tmp_path / "b" / "run" / "last.pt").spec.input_size == 96
    assert first["best_val_nme"] > 0 and second["epochs_done"] == 1
    from flm.errors import UsageError
    other = save_checkpoint(tmp_path / "eyes.pt", build_model("resnet-eyes"))
    with pytest.raises(UsageError, match="resnet-eyes"):
        train(small_cfg(tmp_path / "c", init=str(other)), tr, va)


def test_stop_epoch_cuts_a_longer_schedule_where_an_interrupted_run_stopped(tmp_path, faces):
    """A recipe replays a run that was stopped early: same schedule (lr of a 3-epoch cosine), 1 epoch."""
    tr, va = faces
    cut = train(small_cfg(tmp_path / "cut", epochs=3, stop_epoch=1), tr, va)
    full = train(small_cfg(tmp_path / "full", epochs=3), tr, va)
    assert cut["epochs_done"] == 1 and full["epochs_done"] == 3
    assert cut["history"][0]["lr"] == pytest.approx(full["history"][0]["lr"])
    assert cut["history"][0]["val_nme"] == pytest.approx(full["history"][0]["val_nme"], rel=1e-5)
    one = train(small_cfg(tmp_path / "one", epochs=1), tr, va)
    assert one["history"][0]["lr"] != pytest.approx(cut["history"][0]["lr"])  # a 1-epoch schedule differs


def test_select_last_keeps_the_last_epoch_where_mean_keeps_the_best_scoring_one(tmp_path, faces):
    """--select last: best.pt is the schedule's end, chosen by no validation set."""
    tr, va = faces
    mean = train(small_cfg(tmp_path / "mean", epochs=3, lr=0.1), tr, va)  # lr 0.1: later epochs get worse
    last = train(small_cfg(tmp_path / "last", epochs=3, lr=0.1, select="last"), tr, va)
    scores = [h["val_nme"] for h in mean["history"]]
    assert int(np.argmin(scores)) != 2, f"vacuous: the last epoch scored best {scores}"
    assert read_checkpoint(tmp_path / "mean" / "run" / "best.pt")["epoch"] == int(np.argmin(scores)) + 1
    assert read_checkpoint(tmp_path / "last" / "run" / "best.pt")["epoch"] == 3
    assert last["best_val_nme"] == pytest.approx(last["history"][-1]["val_nme"])


def test_build_options_travel_in_the_spec_through_checkpoint_and_export(tmp_path):
    """A model built with non-default options (a narrow trunk and head) rebuilds the same network
    from its checkpoint and from its ONNX file's spec alone; a checkpoint written before the spec
    held the options (they sat beside it) still loads."""
    from flm.exporters.onnx import export_onnx
    from flm.runtime.modelfile import open_session, read_spec

    model = build_model("shufflenet-heatmap", 64, {"width": 0.5, "head": [64, 32]})
    assert model.spec.build == {"head": (64, 32), "width": 0.5} and model.out.in_channels == 32
    path = save_checkpoint(tmp_path / "narrow.pt", model)
    again = load_model(path)
    assert again.spec.build == model.spec.build and again.out.in_channels == 32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    onnx_path = export_onnx(again, tmp_path / "narrow.onnx")
    from_file = read_spec(open_session(onnx_path, threads=1), str(onnx_path))
    assert build_model(from_file.preset, spec=from_file).out.in_channels == 32
    # a checkpoint of the older layout: options beside the spec, not in it
    ck = torch.load(path, weights_only=True)
    old_spec = json.loads(ck["spec"])
    del old_spec["options"]
    ck["spec"] = json.dumps(old_spec)
    torch.save(ck, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").spec.build == model.spec.build
    # negative control: without the options anywhere, the default network cannot take these weights
    del ck["options"]
    torch.save(ck, tmp_path / "bare.pt")
    with pytest.raises(ModelFileError, match="weights do not match"):
        load_model(tmp_path / "bare.pt")


def test_a_frozen_trunk_keeps_its_weights_while_the_head_learns(tmp_path):
    save_checkpoint(tmp_path / "init.pt", randomised_model("shufflenet-heatmap", seed=4, img_size=64))
    start = read_checkpoint(tmp_path / "init.pt")["state_dict"]
    moved = {}
    for trunk_lr in ("0", "1"):  # 1: the control, where the trunk learns too
        r = flm("train", "--data", "synthetic:24", "--init", tmp_path / "init.pt", "--trunk-lr", trunk_lr,
                "--img-size", "64", "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--workers", "0",
                "--out", tmp_path / trunk_lr)
        assert r.returncode == 0, r.stderr
        end = read_checkpoint(tmp_path / trunk_lr / "last.pt")["state_dict"]
        moved[trunk_lr] = {k.split(".")[0] for k, v in end.items() if v.is_floating_point()
                           and k.endswith("weight") and not torch.equal(v, start[k])}
    assert {"stem", "stage2", "stage3", "stage4"} <= moved["1"]
    assert moved["0"] == {"up1", "up2", "skip3", "skip2", "out"}


@pytest.mark.parametrize("args, says", [(("--trunk-lr", "1.5"), "between 0 and 1, got 1.5"),
                                        (("--trunk-lr", "0.5", "--model", "resnet-regressor"),
                                         "'resnet-regressor' has none")])
def test_a_bad_trunk_learning_rate_is_one_clear_error(tmp_path, args, says):
    r = flm("train", "--data", "synthetic:24", *args, "--epochs", "1", "--out", tmp_path / "run")
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, says", [
    (("--batch-size", "0"), "--batch-size must be a whole number of at least 1, got 0"),
    (("--workers", "-1"), "--workers must be a whole number of at least 0, got -1"),
    (("--seed", "-1"), "--seed must be a whole number of at least 0, got -1"),
    (("--epochs", "0"), "--epochs must be a whole number of at least 1, got 0"),  # not "unset": 0 epochs
    (("--max-steps", "0"), "--max-steps must be a whole number of at least 1, got 0"),
    (("--val-fraction", "2"), "--val-fraction is the share of people held out, between 0 and 1, got 2.0"),
    (("--width", "0.7"), "--width 0.7: shufflenet-heatmap is built at 0.5, 1.0, 1.5, 2.0"),
    (("--width", "0", "--model", "resnet-regressor"), "--width 0.0: resnet-regressor is built at a fraction"),
])
def test_a_count_or_fraction_out_of_range_is_one_clear_error(tmp_path, args, says, capsys):
    """Values torch or the loader would meet with a traceback (or, for 0 epochs, take as unset)."""
    from flm.cli import main
    assert main(["train", "--synthetic-n", "24", *args, "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def _kl_to(teacher, student, crops) -> float:
    from flm.pipeline.train import heatmap_kl
    x = torch.stack([crops[i][0] for i in range(len(crops))])
    with torch.no_grad():  # the student on batch statistics: ten steps leave its running ones behind
        return float(heatmap_kl(torch.softmax(teacher.eval()(x).flatten(2), -1), student.train()(x)))


def test_a_teacher_pulls_the_model_towards_its_heatmaps(tmp_path, faces):
    """Distillation: trained with `teacher`, the model's heatmaps on held-out faces end closer to the
    teacher's than the same training without it (the control); the spec names the teacher."""
    from flm.pipeline.evaluate import CropDataset
    tr, va = faces
    teacher = randomised_model("shufflenet-heatmap", seed=4, img_size=64)
    with torch.no_grad():
        teacher.out.weight.mul_(10)  # sharp peaks in places of its own, far from the faces' points
    path = save_checkpoint(tmp_path / "teacher.pt", teacher)
    taught = train(small_cfg(tmp_path / "t", teacher=str(path), teacher_weight=5), tr, va)
    alone = train(small_cfg(tmp_path / "a"), tr, va)
    assert taught["epochs_done"] == alone["epochs_done"] == 2
    teacher, crops = load_model(path), CropDataset(va, load_model(path).spec)
    kl = {name: _kl_to(teacher, load_model(tmp_path / name / "run" / "last.pt"), crops) for name in ("t", "a")}
    assert kl["t"] < 0.7 * kl["a"], kl
    assert f"taught by {path}" in load_model(tmp_path / "t" / "run" / "last.pt").spec.training_data


def _crop_points(model, crops) -> torch.Tensor:
    """A model's landmarks on `crops` (its own), as fractions of the crop side (pixel centres); as in
    `_kl_to`, a student answers on batch statistics."""
    x = torch.stack([crops[i][0] for i in range(len(crops))])
    with torch.no_grad():
        return (model.decode(model(x)) + 0.5) / model.spec.input_size


def test_a_teacher_of_another_input_size_teaches_on_the_same_crops(tmp_path, faces):
    """A 96 px teacher (12x12 maps) teaching a 64 px model (8x8), 4 epochs: the taught model's points on held-out
    faces, as fractions of the crop, end nearer the teacher's (each on its own input) than those of the
    same training without it."""
    from flm.pipeline.evaluate import CropDataset
    tr, va = faces
    teacher = randomised_model("shufflenet-heatmap", seed=4, img_size=96)
    with torch.no_grad():
        teacher.out.weight.mul_(10)  # sharp peaks in places of its own, far from the faces' points
    path = save_checkpoint(tmp_path / "teacher.pt", teacher)
    train(small_cfg(tmp_path / "t", teacher=str(path), teacher_weight=5, epochs=4), tr, va)
    train(small_cfg(tmp_path / "a", epochs=4), tr, va)
    taught_by = _crop_points(load_model(path).eval(), CropDataset(va, teacher.spec))
    gap = {}
    for name in ("t", "a"):
        student = load_model(tmp_path / name / "run" / "last.pt").train()
        gap[name] = float((_crop_points(student, CropDataset(va, student.spec)) - taught_by).norm(dim=-1).mean())
    assert gap["t"] < 0.7 * gap["a"], gap


def _renormalised(model):
    model.spec = model.spec.with_(mean=(0.5, 0.5, 0.5))
    return model


@pytest.mark.parametrize("args, says", [(("--teacher-weight", "0"), "--teacher-weight must be a positive number"),
                                        (("--teacher", "T96", "--img-size", "64"),
                                         "mean (0.5, 0.5, 0.5) (this model: (0.485, 0.456, 0.406))"),
                                        (("--teacher", "nowhere.pt"), "--teacher nowhere.pt: file not found")])
def test_a_teacher_that_cannot_teach_is_one_clear_error(tmp_path, args, says):
    save_checkpoint(tmp_path / "T96", _renormalised(build_model("shufflenet-heatmap", 96)))
    args = [str(tmp_path / "T96") if a == "T96" else a for a in args]
    r = flm("train", "--data", "synthetic:24", *args, "--epochs", "1", "--out", tmp_path / "run")
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
