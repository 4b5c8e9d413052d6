"""ONNX export: every preset exports, re-opens from disk and matches PyTorch to <= 0.01 px; the
file carries its spec, has a dynamic batch, is a single file, and runs where torch cannot load."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

from flm.cli import main
from flm.exporters import BATCH_AXIS, HEATMAPS, INPUT, LANDMARKS, TARGETS
from flm.exporters.commands import export_target
from flm.exporters.parity import MAX_DISPLACEMENT_PX, make_inputs
from flm.pipeline.checkpoint import load_model
from flm.pipeline.models import PRESETS
from flm.spec import CONFIDENCE, SPEC_METADATA_KEY, ModelSpec

ONNX = TARGETS["onnx"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, random_checkpoints):
    """preset -> (the session's random checkpoint, exported model.onnx, report), each exported
    once per module, into a folder of its own."""
    cache = {}

    def get(preset):
        if preset not in cache:
            ckpt = random_checkpoints(preset)
            model = load_model(ckpt)
            inputs = make_inputs(model.spec, 2)
            final = tmp_path_factory.mktemp(preset) / "export" / "model.onnx"
            report = export_target(model, ONNX, final, inputs, {"decode": True, "opset": 18}, str(ckpt))
            cache[preset] = (ckpt, final, report)
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_exports_and_matches_pytorch(exports, preset):
    ckpt, final, report = exports(preset)
    assert report.passed, report.summary()
    assert report.displacement_px <= MAX_DISPLACEMENT_PX
    assert report.runner.startswith("onnxruntime") and report.path == str(final)
    names = [o.name for o in report.outputs]
    assert names == ([LANDMARKS, HEATMAPS, CONFIDENCE] if PRESETS[preset].spec.output == "heatmap" else [LANDMARKS])
    # published atomically: only the final file, no temporaries, no failed copy, no external data
    assert sorted(p.name for p in final.parent.iterdir()) == ["model.onnx"]


def test_file_carries_spec_names_and_dynamic_batch(exports):
    ckpt, final, _ = exports("shufflenet-heatmap")
    proto = onnx.load(str(final))
    meta = {p.key: p.value for p in proto.metadata_props}
    spec = ModelSpec.from_json(meta[SPEC_METADATA_KEY])
    assert spec == load_model(ckpt).spec
    assert json.loads(meta["flm.outputs"]) == [LANDMARKS, HEATMAPS, CONFIDENCE]
    assert meta["author"] == "flm" and meta["licence"] and meta["training_data"]
    assert [i.name for i in proto.graph.input] == [INPUT]
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == BATCH_AXIS, value.name
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 128, 128]
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_runs_in_a_fresh_interpreter_without_torch(exports, tmp_path):
    """The runtime's world: numpy + onnxruntime + flm.spec, with `import torch` failing."""
    ckpt, final, _ = exports("shufflenet-heatmap")
    model = load_model(ckpt)
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = model(x)
        expected = model.decode(raw)
    np.savez(tmp_path / "io.npz", x=x.numpy(), landmarks=expected.numpy(), heatmaps=raw.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.modules["coremltools"] = None
        import numpy as np, onnxruntime as ort
        from flm.spec import ModelSpec
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        sess = ort.InferenceSession({str(final)!r}, providers=["CPUExecutionProvider"])
        spec = ModelSpec.from_json(sess.get_modelmeta().custom_metadata_map["flm.spec"])
        io = np.load({str(tmp_path / "io.npz")!r})
        for n in (1, 3):  # the dynamic batch axis
            lm, hm = sess.run(["landmarks", "heatmaps"], {{"input": io["x"][:n]}})
            assert lm.shape == (n, spec.num_points, 2) and hm.shape == (n, spec.num_points, 16, 16)
            err = float(np.abs(lm - io["landmarks"][:n]).max())
            assert err < 1e-3, err
        print("ok", spec.preset, err)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok shufflenet-heatmap")


def test_opset_below_18_is_refused_before_any_work(tmp_path, capsys, random_checkpoints):
    ckpt = random_checkpoints("simple-cnn")
    assert main(["export", str(ckpt), "--target", "onnx", "--opset", "17", "--out", str(tmp_path / "x")]) == 2
    assert "--opset 17" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_confidence_is_each_points_heatmap_peak_probability_and_the_runtime_reads_it(exports):
    """The in-graph `confidence` is what the runtime used to compute from the heatmaps itself."""
    import onnxruntime as ort

    from flm.runtime.landmarker import FaceLandmarker, heatmap_confidence

    _, final, _ = exports("shufflenet-heatmap")
    sess = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(0, 1, (3, *sess.get_inputs()[0].shape[1:])).astype(np.float32)
    hm, conf = sess.run([HEATMAPS, CONFIDENCE], {INPUT: x})
    np.testing.assert_allclose(conf, heatmap_confidence(hm), rtol=1e-4, atol=1e-6)
    assert conf.std() > 1e-3  # points differ, so the comparison above can fail
    lm = FaceLandmarker.create(str(final))
    assert lm._has_confidence and not lm._extra_heatmaps  # no heatmap fetched at run time


def test_a_file_written_before_the_confidence_output_still_opens_and_tracks(exports, tmp_path):
    import onnxruntime as ort

    from flm.exporters.onnx import open_onnx
    from flm.runtime.landmarker import FaceLandmarker

    _, final, _ = exports("shufflenet-heatmap")
    proto = onnx.load(str(final))
    assert [o.name for o in proto.graph.output] == [LANDMARKS, HEATMAPS, CONFIDENCE]
    del proto.graph.output[2]  # an older flm file: landmarks and heatmaps only
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    assert [o.name for o in ort.InferenceSession(str(old)).get_outputs()] == [LANDMARKS, HEATMAPS]
    assert open_onnx(old).decode
    lm = FaceLandmarker.create(str(old))
    assert lm._extra_heatmaps and not lm._has_confidence  # confidence from the heatmaps, as before
    del proto.graph.output[1]  # landmarks alone is not a heatmap model's contract
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(Exception, match="outputs are"):
        open_onnx(tmp_path / "bad.onnx")


def test_the_lean_file_pads_the_trunk_and_gathers_its_shuffles_with_the_same_outputs(tmp_path, random_checkpoints):
    """The ONNX file's trunk (the default, `flm.exporters.lean`) has no shuffle's Transpose, only channel counts
    that fill onnxruntime's blocks in the stem and stage 2 (24 -> 32, 58 -> 64), and the plain file's numbers;
    the control moves one gathered channel: the numbers change, so the comparison can tell."""
    import onnxruntime as ort

    from flm.exporters.onnx import export_onnx

    model = load_model(random_checkpoints("shufflenet-heatmap")).eval()
    plain, lean = export_onnx(model, tmp_path / "plain.onnx", lean=False), export_onnx(model, tmp_path / "lean.onnx")
    graphs = {p: onnx.load(str(p)).graph for p in (plain, lean)}
    ops = {p: [n.op_type for n in g.node] for p, g in graphs.items()}
    assert ops[plain].count("Transpose") == 16 and "Gather" not in ops[plain]  # 3 + 7 + 3 units, 3 stage ends
    assert "Transpose" not in ops[lean] and ops[lean].count("Gather") == 13 * 2 + 3
    widths = {p: {int(t.dims[0]) for t in g.initializer if t.name.startswith(("model.stem", "model.stage2"))
                  and len(t.dims) == 4} for p, g in graphs.items()}
    assert {24, 58} <= widths[plain] and widths[lean] & {24, 58} == set() and {32, 64} <= widths[lean]
    x = make_inputs(model.spec, 3).tensor

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT: x})

    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(run(plain), run(lean)))
    proto = onnx.load(str(lean))
    order = next(t for n in proto.graph.node if n.op_type == "Gather"
                 for t in proto.graph.initializer if t.name == n.input[1])
    moved = onnx.numpy_helper.to_array(order)[[1, 0, *range(2, order.dims[0])]]
    order.CopyFrom(onnx.numpy_helper.from_array(moved, order.name))
    onnx.save(proto, str(tmp_path / "moved.onnx"))
    assert not np.allclose(run(lean)[0], run(tmp_path / "moved.onnx")[0], atol=1e-3)


def test_flm_export_plain_keeps_pytorchs_layout(tmp_path, random_checkpoints):
    ckpt = random_checkpoints("shufflenet-heatmap")
    transposes = {}
    for flag in ("--lean", "--plain"):
        out = tmp_path / flag.strip("-")
        assert main(["export", str(ckpt), "--target", "onnx", flag, "--samples", "2", "--out", str(out)]) == 0
        transposes[flag] = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node].count("Transpose")
    assert transposes == {"--lean": 0, "--plain": 16}
