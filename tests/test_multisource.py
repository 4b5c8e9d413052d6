"""Training on several sources at once: parsing, scheme maps, splits, weights, per-convention heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flm.errors import UsageError
from flm.pipeline.augment import AugmentConfig
from flm.pipeline.checkpoint import load_model, save_checkpoint
from flm.pipeline.data import Source, open_dataset, open_sources
from flm.pipeline.evaluate import evaluate, yaw_bin_masks
from flm.pipeline.models import build_model
from flm.pipeline.train import EpochSampler, TrainConfig, _init_state, run, validation_sets
from flm.spec import SCHEME_MAPS, scheme_index

from tests.helpers.checkpoints import randomised_model
from tests.helpers.cli import flm
from tests.helpers.data import face_points, make_wflw, wflw_line, write_image, write_pts


# --------------------------------------------------------------------------- sources


def test_source_weight_and_convention_come_from_the_name():
    s = Source.parse("ibug-pts:../shared/data/300w-train@2")
    assert (s.spec, s.weight, s.convention) == ("ibug-pts:../shared/data/300w-train", 2.0, "300w-train")
    assert Source.parse("udacity:data/youtube-faces-68/").convention == "youtube-faces-68"
    assert Source.parse("wflw:W/list_98pt_test.txt@0.5").convention == "list_98pt_test"
    assert Source.parse("synthetic:40:3").convention == "synthetic"
    assert Source.parse("synthetic").weight == 1.0


@pytest.mark.parametrize("weight", ["0", "-1", "x", "nan", "inf", ""])
def test_a_weight_that_is_not_a_positive_number_is_refused(weight):
    with pytest.raises(UsageError, match="weight after '@' must be a positive number"):
        Source.parse(f"udacity:DIR@{weight}")


def test_wflw_joins_a_68_point_run_through_the_standard_map(tmp_path):
    img_root = tmp_path / "WFLW" / "WFLW_images"
    write_image(img_root / "a" / "1.jpg")
    p98 = face_points(0, 98)
    ann = make_wflw(tmp_path, [wflw_line(p98, [5, 5, 110, 95], [0] * 6, "a/1.jpg")])
    [(src, ds)] = open_sources([f"wflw:{ann}@2"], "ibug68")
    idx = SCHEME_MAPS[("wflw98", "ibug68")]
    assert (ds.scheme, ds.num_points, src.weight) == ("ibug68", 68, 2.0)
    np.testing.assert_allclose(ds.samples[0].points, p98[list(idx)], atol=1e-3)
    # the map's anchors: jaw ends, outer eye corners, nose tip, mouth corners
    assert [idx[i] for i in (0, 16, 36, 45, 30, 48, 54)] == [0, 32, 60, 72, 54, 76, 82]


def test_a_scheme_that_cannot_be_mapped_names_both_sources(tmp_path):
    img_root = tmp_path / "WFLW" / "WFLW_images"
    write_image(img_root / "a" / "1.jpg")
    ann = make_wflw(tmp_path, [wflw_line(face_points(0, 98), [5, 5, 110, 95], [0] * 6, "a/1.jpg")])
    write_image(tmp_path / "f" / "a.jpg")
    write_pts(tmp_path / "f" / "a.pts", face_points(0) + 1)
    with pytest.raises(UsageError) as e:  # a 98-point run (scn-98): WFLW fits, 68-point faces do not
        open_sources([f"wflw:{ann}", f"ibug-pts:{tmp_path / 'f'}"], "wflw98")
    msg = str(e.value)
    assert f"--data 'ibug-pts:{tmp_path / 'f'}' cannot join a wflw98 run" in msg
    assert f"first source is 'wflw:{ann}'" in msg and "ibug68 points cannot be mapped to wflw98" in msg
    assert open_sources([f"wflw:{ann}"], "wflw98")[0][1].num_points == 98
    with pytest.raises(Exception, match="cannot be mapped"):
        scheme_index("eyes12", "ibug68")


@pytest.mark.parametrize("spec, words", [("nope:DIR", "unknown dataset format"),
                                         ("udacity:/no/such/dir", "not found"),
                                         ("udacity:DIR@abc", "positive number")])
def test_bad_sources_are_one_clear_cli_error_and_nothing_is_written(tmp_path, spec, words):
    r = flm("train", "--data", "synthetic:8", "--data", spec, "--out", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- splits and weights


def test_photo_split_keeps_the_faces_of_one_photo_on_one_side(tmp_path):
    for photo in range(30):
        for face in (1, 2):
            img = write_image(tmp_path / "afw" / f"{1000 + photo}_{face}.jpg", seed=photo)
            write_pts(img.with_suffix(".pts"), face_points(photo * 2 + face) + 1)
    ds = open_dataset(f"ibug-pts:{tmp_path}")
    tr, va = ds.split_by_identity(0.2, seed=0)
    photos = lambda d: {Path(s.image).stem.split("_")[0] for s in d.samples}  # noqa: E731
    assert len(va) >= 12 and not photos(tr) & photos(va)
    assert len(tr) + len(va) == 60 and all(len(d) % 2 == 0 for d in (tr, va))


def test_split_validation_gives_each_source_its_own_set_and_head(tmp_path):
    cfg = TrainConfig(data=["synthetic:16:1", "synthetic:12:2"], val=["split"])
    sources = open_sources(cfg.data, "ibug68")
    kept, vals = validation_sets(cfg, sources, "ibug68")
    assert [v.name for v in vals] == ["synthetic#1", "synthetic#2"]
    assert sum(len(d) for _, d in kept) + sum(len(v.ds) for v in vals) == 28
    with pytest.raises(UsageError, match="--select 'nope'"):
        validation_sets(TrainConfig(data=["synthetic:8"], select="nope"), open_sources(["synthetic:8"], "ibug68"),
                        "ibug68")


def test_a_source_without_people_or_photos_cannot_be_split(tmp_path):
    img_root = tmp_path / "WFLW" / "WFLW_images"
    write_image(img_root / "a" / "1.jpg")
    ann = make_wflw(tmp_path, [wflw_line(face_points(0, 98), [5, 5, 110, 95], [0] * 6, "a/1.jpg")])
    cfg = TrainConfig(data=[f"wflw:{ann}"])
    with pytest.raises(UsageError, match="name no person or photo"):
        validation_sets(cfg, open_sources(cfg.data, "ibug68"), "ibug68")


def test_sampler_draws_each_source_weight_times_its_size_and_is_deterministic():
    weights = np.r_[np.full(10, 2.0), np.full(20, 0.5), np.full(5, 1.0)]
    s = EpochSampler(35, seed=4, weights=weights)
    s.epoch = 3
    order = [i for i, _ in s]
    assert len(order) == len(s) == 20 + 10 + 5
    counts = np.bincount(order, minlength=35)
    assert (counts[:10] == 2).all() and (counts[30:] == 1).all()
    assert counts[10:30].sum() == 10 and counts[10:30].max() == 1
    assert order == [i for i, _ in s]  # same (seed, epoch), same order
    s.epoch = 4
    assert order != [i for i, _ in s]
    # the default (no weights) is the plain permutation of every item once
    plain = EpochSampler(35, seed=4)
    assert sorted(i for i, _ in plain) == list(range(35))


# --------------------------------------------------------------------------- heads


def _two_head_model():
    base = build_model("shufflenet-heatmap", 64)
    return build_model("shufflenet-heatmap", spec=base.spec.with_(conventions=("a", "b", "c")))


def test_each_face_is_scored_by_the_head_of_its_convention():
    torch.manual_seed(0)
    m = _two_head_model().eval()
    assert len(m.heads) == 2
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        y, _ = m.features(x)
        picked = m(x, torch.tensor([2, 0, 1]))
        torch.testing.assert_close(picked[0], m.heads[1](y)[0])
        torch.testing.assert_close(picked[1], m.out(y)[1])
        torch.testing.assert_close(picked[2], m.heads[0](y)[2])
        torch.testing.assert_close(m(x), m.out(y))  # no head given: the first convention
        assert not torch.allclose(picked[0], m.out(y)[0])  # the heads differ: the check above can fail


def test_heads_round_trip_through_a_checkpoint_and_init_matches_them_by_name(tmp_path):
    m = _two_head_model()
    with torch.no_grad():
        for k, h in enumerate([m.out, *m.heads]):
            h.bias.fill_(float(k))
    save_checkpoint(tmp_path / "m.pt", m)
    back = load_model(tmp_path / "m.pt")
    assert back.spec.conventions == ("a", "b", "c")
    assert [float(h.bias[0]) for h in (back.out, *back.heads)] == [0.0, 1.0, 2.0]
    # a model of conventions (c, new): c's head comes from c, the unknown one from the first head
    other = build_model("shufflenet-heatmap", spec=m.spec.with_(conventions=("c", "new")))
    other.load_state_dict(_init_state(torch.load(tmp_path / "m.pt", weights_only=True), other))
    assert [float(other.out.bias[0]), float(other.heads[0].bias[0])] == [2.0, 0.0]


def test_a_one_head_checkpoint_initialises_every_head():
    one = build_model("shufflenet-heatmap", 64)
    ck = {"spec": one.spec.to_json(), "state_dict": one.state_dict()}
    many = _two_head_model()
    many.load_state_dict(_init_state(ck, many))
    for h in many.heads:
        torch.testing.assert_close(h.weight, one.out.weight)


# --------------------------------------------------------------------------- a whole run


def test_two_conventions_train_two_heads_and_report_each_validation_set(tmp_path):
    a, b = tmp_path / "conv-a", tmp_path / "conv-b"
    from flm.pipeline.data.synthetic import synthetic_dataset, write_udacity
    write_udacity(synthetic_dataset(24, seed=1), a)
    write_udacity(synthetic_dataset(24, seed=2), b)
    cfg = TrainConfig(data=[f"udacity:{a}@2", f"udacity:{b}"], val=["split"], img_size=64, epochs=1,
                      batch_size=8, workers=0, device="cpu", out=str(tmp_path / "run"), lr=1e-3,
                      augment=AugmentConfig.off(), val_fraction=0.25)
    summary = run(cfg)
    rec = summary["history"][-1]
    assert set(rec["val"]) == {"conv-a", "conv-b"}
    assert rec["val_nme"] == pytest.approx(np.mean(list(rec["val"].values())))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["val"] == pytest.approx(rec["val"])
    model = load_model(tmp_path / "run" / "best.pt")
    assert model.spec.conventions == ("conv-a", "conv-b")
    assert "conv-a" in model.spec.training_data and "x2" in model.spec.training_data
    assert (tmp_path / "run" / "curves.png").is_file()


# --------------------------------------------------------------------------- yaw bins


def test_yaw_bins_use_the_absolute_wrapped_yaw():
    from flm.pipeline.data import LandmarkDataset, Sample
    pts = face_points(0).astype(np.float32)
    yaws = [5.0, -45.0, 80.0, -29.9]
    ds = LandmarkDataset("t", "ibug68", [Sample(lambda: None, pts, meta={"yaw": y}) for y in yaws])
    bins = yaw_bin_masks(ds)
    assert [list(np.flatnonzero(m)) for m in bins.values()] == [[0, 3], [1], [2]]
    ds.samples[0].meta.pop("yaw")
    assert yaw_bin_masks(ds) is None
    assert callable(evaluate)


# --------------------------------------------------------------------------- export of one convention


def test_export_writes_the_chosen_conventions_head_and_verify_compares_with_that_head(tmp_path):
    from flm.cli import main
    from flm.exporters.onnx import open_onnx
    from flm.exporters.parity import make_inputs, run_exported

    one = randomised_model("shufflenet-heatmap", img_size=64)
    many = build_model("shufflenet-heatmap", spec=one.spec.with_(conventions=("a", "b")))
    many.load_state_dict(_init_state({"spec": one.spec.to_json(), "state_dict": one.state_dict()}, many))
    with torch.no_grad():
        many.heads[0].weight.mul_(-1.0)  # head b differs from head a
    save_checkpoint(tmp_path / "m.pt", many.eval())
    assert main(["export", str(tmp_path / "m.pt"), "--target", "onnx", "--convention", "b",
                 "--out", str(tmp_path / "b"), "--samples", "2"]) == 0
    exported = open_onnx(tmp_path / "b" / "model.onnx")
    assert exported.spec.conventions == ("b",)
    inputs = make_inputs(many.spec, 2)
    got = run_exported(exported, inputs)["landmarks"]
    x = torch.from_numpy(inputs.tensor)
    with torch.no_grad():
        head_b = many.decode(many(x, torch.ones(len(x), dtype=torch.long))).numpy()
        head_a = many.decode(many(x)).numpy()
    np.testing.assert_allclose(got, head_b, atol=1e-3)
    assert np.abs(got - head_a).max() > 0.1  # the heads differ, so the check above can fail
    assert main(["verify", str(tmp_path / "b" / "model.onnx"), "--against", str(tmp_path / "m.pt"),
                 "--samples", "2"]) == 0
    assert main(["export", str(tmp_path / "m.pt"), "--target", "onnx", "--convention", "zz",
                 "--out", str(tmp_path / "z")]) == 2
    assert not (tmp_path / "z").exists()


def test_flips_can_be_set_per_convention(tmp_path):
    """--aug-flip-for: faces of one source flip, the others never do (their labels may not mirror)."""
    from flm.pipeline.evaluate import CropDataset
    a, b = open_dataset("synthetic:6:1"), open_dataset("synthetic:6:2")
    spec = build_model("shufflenet-heatmap", 64).spec
    base = AugmentConfig.off()
    flips = [AugmentConfig.from_options(0, 0, 1.0)] * len(a) + [base] * len(b)
    from flm.pipeline.data import LandmarkDataset
    both = LandmarkDataset("ab", "ibug68", a.samples + b.samples)
    ds = CropDataset(both, spec, flips, seed=0)
    plain = CropDataset(both, spec, None)
    for i in range(len(both)):
        _, pts, _ = ds[(i, 0)]
        _, ref, _ = plain[(i, 0)]
        mirrored = np.allclose(pts.numpy()[36, 0], 63 - ref.numpy()[45, 0], atol=1e-3)
        assert mirrored == (i < len(a))
    r = flm("train", "--aug-flip-for", "300w-train=2", "--out", tmp_path / "x")
    assert r.returncode == 2 and "expected NAME=P with P between 0 and 1" in r.stderr


def test_flip_shifts_are_set_per_convention_and_checked(tmp_path):
    """--aug-flip-shift-for: the named source's faces carry its label offset into their flips; an
    unknown name or a shift out of range is one clear error (a typo would otherwise change nothing)."""
    from flm.pipeline.train import _loader
    cfg = TrainConfig(data=["synthetic:6:1", "ibug-pts:x/300w-train"], flip_for={"300w-train": 0.5},
                      flip_shift_for={"300w-train": 1.0}, workers=0)
    sources = [(Source.parse(cfg.data[0]), open_dataset("synthetic:6:1")),
               (Source.parse(cfg.data[1]), open_dataset("synthetic:4:2"))]
    loader, _, _ = _loader(cfg, build_model("shufflenet-heatmap", 64).spec, sources, ("synthetic", "300w-train"), 0, 1)
    augs = loader.dataset.aug
    assert [(a.flip, a.flip_shift) for a in augs] == [(cfg.augment.flip, 0.0)] * 6 + [(0.5, 1.0)] * 4
    for args, says in ((["--aug-flip-shift-for", "300w_train=1"], "no --data source follows a convention of that name"),
                       (["--aug-flip-shift-for", "synthetic=12"], "PX pixels between -10 and 10"),
                       (["--aug-flip-shift-for", "synthetic"], "expected NAME=NUMBER")):
        r = flm("train", *args, "--out", tmp_path / "x")
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
