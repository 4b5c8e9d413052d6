"""Training-side stages: data, models, training and evaluation (these use torch)."""
