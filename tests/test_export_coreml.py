"""Core ML export: every preset converts to a FLOAT32 ML program that, reloaded from disk and run
op by op (MLModel.predict on macOS, the reference MIL evaluator elsewhere), matches PyTorch to
<= 0.01 px; a float16 program fails; the evaluator refuses ops it does not know."""

import json
import sys

import numpy as np
import pytest

from flm.errors import ModelFileError, ParityError
from flm.exporters import HEATMAPS, INPUT, LANDMARKS, TARGETS
from flm.exporters.commands import export_target
from flm.exporters.coreml import BATCH_RANGE_KEY, declared_batch_range, export_coreml, open_coreml, read_package
from flm.exporters.mil_eval import MilEvalError, MilProgram, UnsupportedOp
from flm.exporters.parity import MAX_DISPLACEMENT_PX, make_inputs
from flm.pipeline.checkpoint import load_model
from flm.pipeline.models import PRESETS
from flm.spec import CONFIDENCE, SPEC_METADATA_KEY, ModelSpec

from tests.helpers.checkpoints import randomised_model

COREML = TARGETS["coreml"]
REFERENCE = "reference MIL evaluator"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_exports_and_matches_pytorch(tmp_path, preset, random_checkpoints):
    ckpt = random_checkpoints(preset)
    model = load_model(ckpt)
    final = tmp_path / "export" / "model.mlpackage"
    report = export_target(model, COREML, final, make_inputs(model.spec, 2), {"decode": True}, str(ckpt))
    assert report.passed, report.summary()
    assert report.displacement_px <= MAX_DISPLACEMENT_PX
    if sys.platform != "darwin":
        assert report.runner.startswith(REFERENCE)
    names = [o.name for o in report.outputs]
    assert names == ([LANDMARKS, HEATMAPS, CONFIDENCE] if PRESETS[preset].spec.output == "heatmap" else [LANDMARKS])
    assert sorted(p.name for p in final.parent.iterdir()) == ["model.mlpackage"]


def test_package_metadata_descriptions_and_image_input(tmp_path):
    model = randomised_model("scn-98")  # a colour model: RGB image input
    path = export_coreml(model, tmp_path / "m.mlpackage")
    proto = read_package(path)
    d = proto.description
    meta = dict(d.metadata.userDefined)
    assert ModelSpec.from_json(meta[SPEC_METADATA_KEY]) == model.spec
    assert json.loads(meta["flm.outputs"]) == [LANDMARKS] and meta["flm.input"] == "image"
    assert meta["flm.coreml.precision"] == "float32"
    assert d.metadata.author == "flm" and d.metadata.license and "98 face landmarks" in d.metadata.shortDescription
    assert [i.name for i in d.input] == [INPUT] and d.input[0].shortDescription
    assert d.input[0].type.WhichOneof("Type") == "imageType"
    assert d.input[0].type.imageType.colorSpace == d.input[0].type.imageType.RGB
    assert all(o.shortDescription for o in d.output)
    assert proto.WhichOneof("Type") == "mlProgram"
    assert proto.specificationVersion >= 7  # iOS16 / macOS13


def test_batch_range_runs_batch_1_and_3(tmp_path):
    model = randomised_model("simple-cnn")
    path = export_coreml(model, tmp_path / "m.mlpackage", coreml_input="tensor")
    program = MilProgram(path)
    dtype, shape = program.inputs[INPUT]
    assert shape[0] is None and shape[1:] == (1, 96, 96)  # flexible batch, fixed image
    inputs = make_inputs(model.spec, 3)
    out3 = program.run({INPUT: inputs.tensor})[LANDMARKS]
    out1 = program.run({INPUT: inputs.tensor[:1]})[LANDMARKS]
    assert out3.shape == (3, 68, 2) and out1.shape == (1, 68, 2)
    np.testing.assert_allclose(out1[0], out3[0], atol=1e-4)


@pytest.mark.parametrize("kind", ["tensor", "image"])
def test_declared_batch_range_1_to_16_is_enforced(tmp_path, kind):
    """The README promises batch 1-16: the saved package declares it, and a batch outside is refused."""
    model = randomised_model("simple-cnn")
    path = export_coreml(model, tmp_path / "m.mlpackage", coreml_input=kind)
    proto = read_package(path)
    assert json.loads(dict(proto.description.metadata.userDefined)[BATCH_RANGE_KEY]) == [1, 16]
    if kind == "tensor":  # Core ML's own declaration (an image input has no batch field)
        r = proto.description.input[0].type.multiArrayType.shapeRange.sizeRanges[0]
        assert (r.lowerBound, r.upperBound) == (1, 16)
    assert declared_batch_range(proto, path) == (1, 16) and open_coreml(path, "reference").max_batch == 16
    program = MilProgram(path)
    x = make_inputs(model.spec, 1)
    one = x.pixels if kind == "image" else x.tensor
    assert program.run({INPUT: np.repeat(one, 16, axis=0)})[LANDMARKS].shape == (16, 68, 2)
    for batch in (17, 20):
        with pytest.raises(MilEvalError, match=f"has batch {batch}, but the package declares batch 1..16"):
            program.run({INPUT: np.repeat(one, batch, axis=0)})


def test_a_package_without_a_batch_range_is_refused(tmp_path):
    model = randomised_model("simple-cnn")
    path = export_coreml(model, tmp_path / "m.mlpackage", coreml_input="image")
    proto = read_package(path)
    del proto.description.metadata.userDefined[BATCH_RANGE_KEY]  # as an image package from before the key
    with pytest.raises(ModelFileError, match="declares no batch range"):
        MilProgram(path, proto)
    proto.description.metadata.userDefined[BATCH_RANGE_KEY] = "[1, 32]"
    assert MilProgram(path, proto).batch_ranges == {INPUT: (1, 32)}  # what the package declares counts
    tensor = read_package(export_coreml(model, tmp_path / "t.mlpackage", coreml_input="tensor"))
    tensor.description.metadata.userDefined[BATCH_RANGE_KEY] = "[1, 32]"
    with pytest.raises(ModelFileError, match="declares two batch ranges"):
        MilProgram(tmp_path / "t.mlpackage", tensor)


def test_float16_program_fails_parity_and_is_not_published(tmp_path):
    """Negative control: the converter's default float16 precision must not pass as float32."""
    model = randomised_model("simple-cnn")
    final = tmp_path / "export" / "model.mlpackage"
    with pytest.raises(ParityError) as err:
        export_target(model, COREML, final, make_inputs(model.spec, 2), {"precision": "float16"})
    report = err.value.report
    assert not report.passed and report.displacement_px > MAX_DISPLACEMENT_PX
    assert not final.exists()
    failed = tmp_path / "export" / "model.failed.mlpackage"
    assert report.path == str(failed) and failed.is_dir()
    assert dict(read_package(failed).description.metadata.userDefined)["flm.coreml.precision"] == "float16"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model.failed.mlpackage"]
    # the evaluator ran it as stored: fp16 weights in the package
    program = MilProgram(failed)
    assert any(v.dtype == np.float16 for v in program.consts.values() if isinstance(v, np.ndarray))


def _mil_package(tmp_path, build, shape=(1, 4, 2, 2)):
    """Save a hand-written MIL program as an ML package (for the evaluator's own tests)."""
    from flm.exporters.coreml import import_coremltools

    ct = import_coremltools()
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def prog(x):
        return build(mb, x)

    ml = ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                    minimum_deployment_target=ct.target.iOS16)
    path = tmp_path / "p.mlpackage"
    ml.save(str(path))
    return path


def test_evaluator_interleaved_concat_matches_mil_definition(tmp_path):
    # MIL's documented example: interleave=True puts in1[0], in2[0], in1[1], in2[1], ...
    path = _mil_package(tmp_path, lambda mb, x: mb.concat(values=[x, mb.mul(x=x, y=10.0)], axis=1,
                                                           interleave=True, name="out"))
    program = MilProgram(path)
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 2, 2)
    got = program.run({program_input(program): x})["out"]
    want = np.empty((1, 8, 2, 2), np.float32)
    want[:, 0::2], want[:, 1::2] = x, 10 * x
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, np.concatenate([x, 10 * x], axis=1))  # not a plain concat


def test_evaluator_refuses_an_op_it_does_not_know(tmp_path):
    path = _mil_package(tmp_path, lambda mb, x: mb.erf(x=mb.relu(x=x), name="out"))
    with pytest.raises(UnsupportedOp, match="erf"):
        MilProgram(path)


def program_input(program):
    (name,) = program.inputs
    return name
