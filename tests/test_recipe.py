"""`flm train --recipe`: stages from a TOML file, run end to end, skipped when done, resumed when not."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from flm.errors import UsageError
from flm.pipeline.models import build_model, count_parameters
from flm.pipeline.recipe import load_recipe

from tests.helpers.cli import REPO, flm


def test_the_shipped_models_recipe_reads_and_chains_its_stages():
    base, stages = load_recipe(REPO / "recipes" / "flm-68.toml")
    names = [n for n, _ in stages]
    assert names[:8] == [f"s{k}" for k in range(1, 9)] and base == Path("runs/flm-68")
    cfg = dict(stages)
    assert cfg["s1"].init is None and cfg["s1"].augment.flip == 0.5 and cfg["s2"].augment.flip == 0
    assert (cfg["s2"].epochs, cfg["s2"].stop_epoch) == (15, 1) and cfg["m2"].flip_for == {"300w-train": 0.5}
    assert cfg["s8"].init == str(base / "s7" / "best.pt") and cfg["s8"].augment.box_jitter == pytest.approx(0.025)
    last = stages[-1][1]
    assert names[-1] == "m4" and last.init == str(base / "m3" / "best.pt") and last.gate
    assert len(last.data) == 2 and last.augment.pose == pytest.approx(0.6) and "split" in last.val


def test_the_fast_models_recipe_shrinks_the_default_models_input():
    base, stages = load_recipe(REPO / "recipes" / "flm-68-fast.toml")
    assert [n for n, _ in stages] == ["fa1"] and base == Path("runs/flm-68-fast")
    cfg = stages[0][1]
    assert cfg.init == "models/flm-68-distilled.pt" and cfg.teacher == "models/flm-68-distilled.pt"
    assert cfg.select == "last" and cfg.flip_for == {"300w-train": 0} and len(cfg.data) == 2
    model = build_model(cfg.model, cfg.img_size, cfg.preset_options())
    assert (model.spec.input_size, model.spec.heatmap_size) == (160, 20)
    assert model.spec.build == {"gate": True, "head": (128, 96), "upsample": "light"}
    assert model.out.in_channels == 96 and count_parameters(model) < 1_000_000


def test_the_balanced_models_recipe_starts_light_upsamplings_from_flm_68():
    base, stages = load_recipe(REPO / "recipes" / "flm-68-balanced.toml")
    assert [n for n, _ in stages] == ["b1"] and base == Path("runs/flm-68-balanced")
    cfg = stages[0][1]
    assert cfg.init == "models/flm-68.pt" and cfg.gate and cfg.flip_for == {"300w-train": 0.5}
    model = build_model(cfg.model, cfg.img_size, cfg.preset_options())
    assert model.spec.input_size == 160 and model.spec.build == {"gate": True, "upsample": "light"}
    assert model.up1[3].groups == 192 and count_parameters(model) < 1_000_000


@pytest.mark.parametrize("text, words", [
    ('out = "r"\n[[stage]]\nname = "a"\nepochz = 3\n', "stage 'a': unknown key(s) epochz"),
    ('out = "r"\n[[stage]]\nname = "a"\ninit = "zz"\n', "init 'zz' is neither an earlier stage"),
    ('out = "r"\n[[stage]]\nname = "a"\naug_pose = 2\n', "--aug-pose is a probability"),
    ('out = "r"\n[[stage]]\nname = "a"\n[[stage]]\nname = "a"\n', "two stages are named 'a'"),
    ('[[stage]]\nname = "a"\n', "expected 'out"),
    ('out = "r"\nstage = [', "not valid TOML"),
    ('out = "r"\n[[stage]]\nname = "a"\ngate = "yes"\n', "stage 'a': gate is true or false, got 'yes'"),
    ('out = "r"\n[[stage]]\nname = "a"\nupsample = "bilinear"\n', "--upsample 'bilinear': expected one of deconv, light"),
    ('out = "r"\n[[stage]]\nname = "a"\ntrunk_lr = -0.1\n', "--trunk-lr is a fraction of --lr between 0 and 1"),
    ('out = "r"\n[[stage]]\nname = "a"\nteacher = "zz"\n', "teacher 'zz' is neither an earlier stage"),
    ('out = "r"\n[[stage]]\nname = "a"\nteacher_weight = 0\n', "--teacher-weight must be a positive number, got 0"),
    ('out = "r"\n[[stage]]\nname = "a"\nlr = -1\n', "stage 'a': --lr must be a positive number, got -1"),
    ('out = "r"\n[[stage]]\nname = "a"\nepochs = 0\n', "stage 'a': --epochs must be a whole number of at least 1"),
    ('out = "r"\n[[stage]]\nname = "a"\nstop_epoch = 0\n', "stage 'a': stop_epoch must be a whole number of at least 1"),
    ('out = "r"\n[[stage]]\nname = "a"\nbatch_size = "8"\n', "stage 'a': --batch-size must be a whole number of at least 1, got '8'"),
    ('out = "r"\n[[stage]]\nname = "a"\nepochs = 2.5\n', "stage 'a': --epochs must be a whole number of at least 1, got 2.5"),
    ('out = "r"\n[[stage]]\nname = "a"\nval_fraction = "0.1"\n', "stage 'a': --val-fraction is the share of people"),
])
def test_a_bad_recipe_is_refused_before_any_stage_runs(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=None) as e:
        load_recipe(path)
    assert words in str(e.value)


@pytest.mark.slow  # over ~20 s here; `just test -m "not slow"` skips it
def test_the_smoke_recipe_runs_end_to_end_then_skips_what_is_done_and_resumes_the_rest(tmp_path):
    recipe = REPO / "recipes" / "smoke.toml"
    r = flm("train", "--recipe", recipe, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    base = tmp_path / "runs" / "recipe-smoke"
    done = {n: json.loads((base / n / "done.json").read_text()) for n in ("s1", "s2")}
    assert done["s1"]["epochs_done"] == 2 and done["s2"]["epochs_done"] == 1
    assert "stage s1: best validation NME" in r.stdout and "stage s2" in r.stdout
    # s2 starts from s1's weights: its spec records that
    from flm.pipeline.checkpoint import read_checkpoint
    assert "s1/best.pt" in json.loads(read_checkpoint(base / "s2" / "best.pt")["spec"])["training_data"]
    # a rerun skips both stages: nothing is trained or rewritten
    stamp = (base / "s2" / "last.pt").stat().st_mtime_ns
    again = flm("train", "--recipe", recipe, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "wrote" not in again.stderr
    assert (base / "s2" / "last.pt").stat().st_mtime_ns == stamp
    # an unfinished stage (no done.json) resumes from its last.pt instead of starting over
    (base / "s2" / "done.json").unlink()
    resumed = flm("train", "--recipe", recipe, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and (base / "s2" / "done.json").is_file()


def test_a_recipe_flip_probability_out_of_range_is_refused_like_the_option(tmp_path):
    path = tmp_path / "flips.toml"
    path.write_text('out = "r"\n[[stage]]\nname = "a"\nflip_for = { "300w-train" = 1.5 }\n')
    with pytest.raises(UsageError, match="300w-train=1.5: expected NAME=P with P between 0 and 1"):
        load_recipe(path)


@pytest.mark.parametrize("line, says", [
    ('flip_shift_for = 1.0', "flip_shift_for maps convention names to label x offsets in pixels"),
    ('flip_shift_for = { "300w_train" = 1.0 }', "--aug-flip-shift-for 300w_train: no --data source follows"),
    ('flip_shift_for = { "synthetic" = "1" }', "--aug-flip-shift-for synthetic=1: expected NAME=PX"),
])
def test_a_recipe_flip_shift_is_checked_like_the_option(tmp_path, line, says):
    path = tmp_path / "shift.toml"
    path.write_text(f'out = "r"\n[[stage]]\nname = "a"\ndata = ["synthetic:8"]\n{line}\n')
    with pytest.raises(UsageError, match=f"stage 'a': {re.escape(says)}"):
        load_recipe(path)


def test_the_default_models_recipe_is_taught_by_flm_68_and_builds_the_shipped_network():
    """recipes/flm-68-distilled.toml rebuilds the network of the shipped checkpoint (a
    different head width would not load its weights) and is taught by flm-68 in every stage."""
    from flm.pipeline.checkpoint import read_checkpoint
    base, stages = load_recipe(REPO / "recipes" / "flm-68-distilled.toml")
    assert [n for n, _ in stages] == ["d1", "d2", "d3", "d4"] and base == Path("runs/flm-68-distilled")
    d1, d2, d3, d4 = (cfg for _, cfg in stages)
    assert d1.init == "models/flm-68.pt" and d2.init == str(base / "d1" / "best.pt")
    assert d3.init == str(base / "d2" / "best.pt") and d3.augment.pose == 0.3 and d2.augment.pose == 0.6
    assert {(cfg.teacher, cfg.teacher_weight) for cfg in (d1, d2, d3, d4)} == {("models/flm-68.pt", 1)}
    assert d4.init == str(base / "d3" / "best.pt") and d4.flip_for == {"300w-train": 0} and d4.select == "last"
    assert d3.flip_for == {"300w-train": 0.5} and d4.data == d3.data
    model = build_model(d3.model, d3.img_size, d3.preset_options())
    ck = read_checkpoint(REPO / "models" / "flm-68-distilled.pt")
    model = build_model(d3.model, spec=model.spec.with_(conventions=("300w-train", "youtube-faces-68")))
    model.load_state_dict(ck["state_dict"])  # raises if the recipe's network is not the shipped one
    assert "taught by models/flm-68.pt" in json.loads(ck["spec"])["training_data"]
