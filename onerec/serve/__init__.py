"""Serving a model export: request files (`onerec recommend --input`, jsonl.py) and HTTP
(`onerec serve`: app.py, with batcher.py gathering concurrent requests into one search).
Both answer through onerec.inference.recommend.Recommender, so a request gets the same items
from the Python API, a request file and the server."""
