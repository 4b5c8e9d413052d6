"""What the tests share, imported one way: `from tests.helpers.X import ...`.

  cli          `flm` as a real subprocess (REPO, FLM, ENV, TRAIN, flm, Flm)
  data         small fixture files: images, PNG chunks and bomb headers, annotation files
               (.pts, WFLW, AFLW2000), dot images
  checkpoints  randomly initialised models and checkpoints with non-trivial outputs, checkpoint payloads
  runtime      generated 68-point faces and ONNX files with an flm spec (torch-free to import)

Nothing is imported here, so `tests.helpers.runtime` stays importable where torch is not.
Session-scoped fixtures built from these live in tests/conftest.py.
"""
