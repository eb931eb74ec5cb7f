"""onerec: train OneRec-style generative recommenders end to end."""

__version__ = "0.1.0"
