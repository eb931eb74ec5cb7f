"""RQ-VAE semantic IDs (TIGER): learns planted structure, guards against dead codes, deterministic."""

from dataclasses import replace

import datasets
import pytest
import torch

from onerec.config import RQVAEConfig, load_config
from onerec.tokenizer.rq_vae import RQVAE, _restart_dead_codes, train_rq_vae
from onerec.tokenizer.semantic_ids import SemanticIds
from onerec.stages.tokenize import main as tokenize_main

SMALL = RQVAEConfig(hidden_dims=[32], latent_dim=8, epochs=40, batch_size=64, lr=3e-3, restart_every=5)


def planted_clusters(num_clusters: int = 8, per_cluster: int = 32, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_clusters, dim, generator=g) * 3.0
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    return centers[labels] + 0.1 * torch.randn(len(labels), dim, generator=g), labels


def test_first_level_codes_recover_planted_clusters():
    x, labels = planted_clusters()
    codes, summary = train_rq_vae(x, levels=2, codebook_size=8, cfg=SMALL, seed=0)
    assert codes.shape == (len(x), 2) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 8
    # Each planted cluster should map (almost) entirely to one first-level code.
    purity = sum(int(torch.bincount(codes[labels == c, 0]).max()) for c in range(8)) / len(x)
    assert purity >= 0.9, purity
    assert summary["reconstruction_mse"] < float(x.var(0).sum())  # better than predicting the mean


def test_same_seed_same_codes_and_other_seed_runs():
    x, _ = planted_clusters(seed=1)
    a, _ = train_rq_vae(x, 2, 8, SMALL, seed=5)
    b, _ = train_rq_vae(x, 2, 8, SMALL, seed=5)
    assert torch.equal(a, b)


def test_dead_codes_restart_onto_current_residuals_and_live_codes_stay():
    torch.manual_seed(0)
    x, _ = planted_clusters()
    model = RQVAE(16, levels=2, codebook_size=8, cfg=SMALL)
    before = model.quantizer.codebooks_LKZ.detach().clone()
    with torch.no_grad():
        residuals = model(x)["residuals"]  # what the restart samples from
    used = torch.ones(2, 8, dtype=torch.bool)
    used[0, [1, 6]] = False
    used[1, 3] = False
    restarted = _restart_dead_codes(model, x, used, torch.Generator().manual_seed(0))
    after = model.quantizer.codebooks_LKZ.detach()
    assert restarted == 3
    assert torch.equal(after[used], before[used])
    for level, code in [(0, 1), (0, 6), (1, 3)]:
        assert not torch.equal(after[level, code], before[level, code])
        distances = (residuals[level] - after[level, code]).norm(dim=1)
        assert float(distances.min()) < 1e-5  # moved onto one of that level's residuals


def test_collapse_guard_raises_utilization_and_reconstruction():
    # 16 planted clusters, 16 codes: without the guard some codes die and clusters merge.
    x, _ = planted_clusters(num_clusters=16, per_cluster=16, seed=2)
    with_guard, guarded = train_rq_vae(x, 1, 16, replace(SMALL, epochs=150), seed=0)
    without, unguarded = train_rq_vae(x, 1, 16, replace(SMALL, epochs=150, restart_every=0), seed=0)
    assert guarded["dead_code_restarts"] > 0 and unguarded["dead_code_restarts"] == 0
    assert len(torch.unique(with_guard[:, 0])) == 16 > len(torch.unique(without[:, 0]))
    assert guarded["reconstruction_mse"] < unguarded["reconstruction_mse"]


def test_too_few_items_is_a_clear_error():
    with pytest.raises(ValueError, match="codebook_size"):
        train_rq_vae(torch.randn(5, 4), 1, 8, SMALL, seed=0)
    with pytest.raises(ValueError, match="finite"):
        train_rq_vae(torch.full((20, 4), float("nan")), 1, 4, SMALL, seed=0)


def test_tokenize_stage_with_rq_vae_writes_unique_ids(tmp_path):
    texts = [f"item {i} {'lipstick gloss serum soap'.split()[i % 4]}" for i in range(48)]
    datasets.Dataset.from_dict(
        {"item_index": list(range(48)), "raw_id": [str(i) for i in range(48)], "title": texts, "text": texts}
    ).save_to_disk(str(tmp_path / "data" / "items"))
    cfg = load_config(
        None,
        [
            f"run.out_dir={tmp_path}",
            "run.device=cpu",
            "tokenizer.method=rq_vae",
            "tokenizer.encoder=hashing",
            "tokenizer.levels=2",
            "tokenizer.codebook_size=4",
            "tokenizer.rq_vae.hidden_dims=[32]",
            "tokenizer.rq_vae.latent_dim=8",
            "tokenizer.rq_vae.epochs=5",
        ],
    )
    sid = SemanticIds.load(tokenize_main(cfg))
    assert sid.semantic_levels == 2 and sid.codes.shape == (48, 3)
    assert len({tuple(r) for r in sid.codes.tolist()}) == 48
    assert sid.stats["method"] == "rq_vae" and "reconstruction_mse" in sid.stats["training"]
