"""Preference alignment after pretraining (OneRec: reward model + Iterative Preference Alignment)."""
