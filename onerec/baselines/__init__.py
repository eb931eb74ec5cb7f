"""Baselines run in the same harness, data and split as the generative model."""
