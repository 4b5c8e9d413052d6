# flm tasks. `just` itself comes from PyPI (rust-just); see README.

venv := ".venv"
py := venv + "/bin/python"
flm := venv + "/bin/flm"
data := "../shared/data/youtube-faces-68"

# Create .venv and install flm with every extra (idempotent: skipped when up to date).
setup:
    @test -x {{py}} || python3 -m venv {{venv}}
    @if [ ! -f {{venv}}/.installed ] || [ pyproject.toml -nt {{venv}}/.installed ]; then \
        {{venv}}/bin/pip install -q --upgrade pip && \
        {{venv}}/bin/pip install -q -e '.[all]' && touch {{venv}}/.installed; fi

# The main job on the embedded default: train on synthetic faces, check the budget, export, verify, detect;
# then the model flm ships finds and landmarks a real face in public-domain photos (no download, no ../shared).
demo: setup
    {{flm}} train --out runs/demo
    {{flm}} check-budget runs/demo/best.pt
    {{flm}} export runs/demo/best.pt --target all --out runs/demo/export
    {{flm}} data synth --out runs/demo/faces -n 8 --seed 7
    # the synthetic pictures are face crops (the cartoon faces often defeat Haar): no detector
    {{flm}} detect runs/demo/faces/images --model runs/demo/export/model.onnx --detector none --out runs/demo/detections
    {{flm}} detect runs/demo/faces/images --detector none --out runs/demo/detections-shipped
    # real photographs (NASA's astronaut portrait, inside scikit-image's wheel), the default detector and model
    {{flm}} sample-photos --out runs/demo/photos
    {{flm}} detect runs/demo/photos --out runs/demo/detections-real --json runs/demo/detections-real/faces.json
    @echo "synthetic faces: runs/demo/detections (the model just trained), runs/demo/detections-shipped (the default shipped model)"
    @echo "real photos, open: runs/demo/detections-real/astronaut.jpg (and astronaut-mirrored-tilted.jpg):"
    @echo "  68 landmarks coloured by region, the face box with its detector score, head-pose axes at the nose"

# The default test run (what CI runs).
test *ARGS: setup
    {{py}} -m pytest {{ARGS}}

# Every property test (hypothesis) with FLM_FUZZ_EXAMPLES examples each (default 2000); nothing else.
fuzz *ARGS: setup
    HYPOTHESIS_PROFILE=fuzz {{py}} -m pytest tests {{ARGS}}

# Train the model flm ships on the real 68-point set, identity-held-out validation.
train-real *ARGS: setup
    {{flm}} train --model shufflenet-heatmap --data udacity:{{data}} --out runs/real {{ARGS}}

# Benchmarks: accuracy and speed side by side with the peers in ../shared/peers.
bench: setup
    {{py}} benchmarks/accuracy.py
    {{py}} benchmarks/speed.py
