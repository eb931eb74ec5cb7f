"""The generator: T5-style encoder-decoder with a sparse-MoE decoder (onerec.py), its MoE layer (moe.py)
and building blocks (layers.py)."""
