"""Triton kernels with plain-PyTorch reference twins, installed as ``onerec.kernels``."""
