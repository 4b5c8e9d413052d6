"""flm: train compact face-landmark models and ship them to the edge."""

__version__ = "0.1.0"
