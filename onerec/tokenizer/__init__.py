"""Semantic-ID tokenizer: item text -> embeddings -> balanced residual k-means -> dedup -> trie.

The `onerec tokenize` command is onerec/stages/tokenize.py.
"""

from onerec.tokenizer.embed import embed_features, embed_texts
from onerec.tokenizer.rq_kmeans import balanced_kmeans, residual_kmeans
from onerec.tokenizer.semantic_ids import SemanticIds, add_dedup_level, codebook_stats
from onerec.tokenizer.trie import Trie, build_trie

__all__ = [
    "SemanticIds",
    "Trie",
    "add_dedup_level",
    "balanced_kmeans",
    "build_trie",
    "codebook_stats",
    "embed_features",
    "embed_texts",
    "residual_kmeans",
]
