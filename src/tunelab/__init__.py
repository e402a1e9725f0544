"""tunelab: one declarative file per fine-tuning experiment; plan it, train it, compare it."""

__version__ = "0.1.0"
