"""`onerec tokenize` sharded over two real torchrun ranks (gloo) gives the single process's codes,
and only rank 0 writes the output.

`onerec data` runs once on the synthetic log (tests/integration/test_pipeline.py); copies of
that run directory are tokenized by one process (in this process, as `onerec pipeline` runs
it) and by launch/torchrun.sh with two workers (STAGE=tokenize; tests/distributed/
tokenize_worker.py as ENTRY runs the stage once per case in one job and records each rank's
file writes). Embedding batches of 5 split the 48 items 25 / 23.

- plain: 48 items x 8 codes is far below rq_kmeans.EXACT_SEEDING_MAX, where one process seeds
  k-means exactly, so the ranks embed their own items and rank 0 quantises the gathered
  vectors: the codes are the single process's by construction.
- sampled: EXACT_SEEDING_MAX = 0 in both runs (what a catalogue above the threshold does):
  the balanced k-means itself is sharded (each rank assigns its own items, sums and counts
  all-reduced). test_rq_kmeans_sharded.py proves that exact on exact-arithmetic data; these
  float vectors could differ only where a distance tie falls within the rounding of the
  all-reduced centroid sums, which this data set does not have: the codes are equal too.
- collaborative: the same, with co-occurrence vectors blended in (rank 0 computes them and
  sends them out) and the dedup level in popularity order (rank 0 alone reads the sequences).
- rq_vae: the vectors are gathered and rank 0 trains the RQ-VAE alone.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distributed_helpers import REPO, pipeline_test, process_env, run_logged

WORKER = REPO / "tests" / "distributed" / "tokenize_worker.py"
TOKENIZE = ["tokenizer.embed_batch_size=5"]  # 48 items -> 10 batches, 5 per rank: rows 0..24, 25..47
# name: (rq_kmeans.EXACT_SEEDING_MAX, or None for the shipped value; extra overrides)
CASES = {
    "plain": (None, []),
    "sampled": (0, []),
    "collaborative": (0, ["tokenizer.collaborative_weight=0.5", "tokenizer.dedup_order=popularity",
                          "tokenizer.kmeans_iters=5"]),
    "rq_vae": (None, ["tokenizer.method=rq_vae", "tokenizer.rq_vae.epochs=3", "tokenizer.rq_vae.hidden_dims=[16]"]),
}


def _semantic_ids(run):
    from onerec.tokenizer.semantic_ids import SemanticIds

    ids = SemanticIds.load(run / "semantic_ids")
    return ids.codes, ids.codebook_sizes, ids.stats


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from onerec.cli import main as cli_main
    from onerec.tokenizer import rq_kmeans

    tmp = tmp_path_factory.mktemp("tokenize_sharded")
    pipeline_test._write_log(tmp / "raw")
    overrides = [o for o in pipeline_test._overrides(tmp) if not o.startswith("run.out_dir=")] + TOKENIZE
    root = tmp / "runs"
    root.mkdir()
    data = root / "data_only"
    assert cli_main(["data", f"run.out_dir={data}", *overrides]) == 0
    shipped = rq_kmeans.EXACT_SEEDING_MAX
    for name, (exact_seeding_max, extra) in CASES.items():
        for kind in ("single", "sharded"):
            shutil.copytree(data, root / f"{kind}_{name}")
        rq_kmeans.EXACT_SEEDING_MAX = shipped if exact_seeding_max is None else exact_seeding_max
        try:
            assert cli_main(["tokenize", f"run.out_dir={root / f'single_{name}'}", *overrides, *extra]) == 0
        finally:
            rq_kmeans.EXACT_SEEDING_MAX = shipped

    audit = tmp / "audit"
    audit.mkdir()
    plan = [[str(root / f"sharded_{name}"), exact, extra] for name, (exact, extra) in CASES.items()]
    env = process_env(NPROC_PER_NODE="2", STAGE="tokenize", ENTRY=str(WORKER), AUDIT_ROOT=str(root),
                      AUDIT_OUT=str(audit), TOKENIZE_RUNS=json.dumps(plan))
    log = tmp / "torchrun.log"
    run_logged([str(REPO / "launch" / "torchrun.sh"), f"run.out_dir={root / 'sharded_plain'}", *overrides],
               log, 300, env)
    writes = {rank: json.loads((audit / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    return root, log.read_text(), writes


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_give_the_single_process_semantic_ids(runs, name):
    root, _, _ = runs
    codes, sizes, stats = _semantic_ids(root / f"sharded_{name}")
    expected_codes, expected_sizes, expected_stats = _semantic_ids(root / f"single_{name}")
    assert torch.equal(codes, expected_codes)
    assert sizes == expected_sizes and stats == expected_stats


def test_each_case_took_the_path_it_was_meant_to(runs):
    root, log, _ = runs
    assert "embedded 25 items (0..24, rank 0 of 2)" in log and "embedded 23 items (25..47, rank 1 of 2)" in log
    assert log.count("exact k-means++ seeding: the 2 ranks' vectors are gathered") == 2  # plain, on both ranks
    assert log.count("rq_vae: the 2 ranks' vectors are gathered") == 2
    assert log.count("balanced k-means sharded over 2 ranks") == 4  # sampled and collaborative
    assert "collaborative weight 0.50" in log and "in popularity order" in log
    # Sampled seeding really gives other codes here: the plain and sampled cases test two paths.
    assert not torch.equal(_semantic_ids(root / "sharded_plain")[0], _semantic_ids(root / "sharded_sampled")[0])


@pytest.mark.parametrize("name", CASES)
def test_only_rank_0_writes_the_output_and_each_rank_its_own_embedding_cache(runs, name):
    root, _, writes = runs
    run_dir = root / f"sharded_{name}"
    cache = run_dir / "semantic_ids" / "cache"
    for event, path in writes[1][run_dir.name]:
        # Rank 1 creates the cache directory if it is there first, and writes its own cache
        # files (each through a temporary name in the same directory); nothing else.
        assert (event == "os.mkdir" and path in (str(run_dir / "semantic_ids"), str(cache))) or (
            path.startswith(str(cache) + "/") and ".rank00001-of-00002." in path
        ), (event, path)
    renamed_by_1 = {path for event, path in writes[1][run_dir.name] if event == "os.rename"}
    assert {str(cache / f"embeddings.rank00001-of-00002.{ext}") for ext in ("safetensors", "json")} <= renamed_by_1
    # Rank 0 writes the output: semantic_ids/ (renamed into place), the provenance record, metrics.
    renamed_by_0 = {path for event, path in writes[0][run_dir.name] if event == "os.rename"}
    assert {str(run_dir / "semantic_ids"), str(run_dir / ".onerec" / "provenance" / "tokenize.json")} <= renamed_by_0
    assert str(run_dir / "metrics.jsonl") in {path for event, path in writes[0][run_dir.name] if event == "open"}
    # Both ranks' caches survive rank 0's atomic replacement of semantic_ids/.
    for rank in (0, 1):
        for ext in ("safetensors", "json"):
            assert (cache / f"embeddings.rank{rank:05d}-of-00002.{ext}").is_file()
