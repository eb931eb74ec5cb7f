"""Inference: trie-constrained beam search, the exhaustive reference, ranking metrics, evaluation."""

from onerec.inference.beam_search import BeamSearchOutput, constrained_beam_search
from onerec.inference.evaluate import evaluate_examples, evaluate_popularity, popularity_ranking
from onerec.inference.exhaustive import exhaustive_top_k
from onerec.inference.metrics import MetricAccumulator, ranking_metrics

__all__ = [
    "BeamSearchOutput",
    "MetricAccumulator",
    "constrained_beam_search",
    "evaluate_examples",
    "evaluate_popularity",
    "exhaustive_top_k",
    "popularity_ranking",
    "ranking_metrics",
]
