"""Expert parallelism with two real gloo processes through DeepSpeed (CPU accelerator).

The same tiny OneRec model is trained twice on the same two ranks and the same global batches:
once data parallel only (ep=1, every rank holds all 4 experts), once with the experts
sharded (ep=2, each rank holds 2 and tokens travel by all-to-all). Both must be the same
function: forward outputs, per-step losses and the parameters after a few AdamW steps with
active gradient clipping agree within float tolerance, under ZeRO stages 0, 1 and 2.
Evaluation sharded over the two ranks (each decodes half the users, hit counts summed)
gives exactly the single-process metrics, also when the model's forward is itself a
collective (ep=2).

The workers are this file run as a script (two subprocesses joined by env:// rendezvous);
they write their results with torch.save and the test compares them here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ZERO_STAGES = (0, 1, 2)
STEPS = 3
WORLD = 2
MICRO_BATCH = 4  # per rank; the global batch is 8 rows




# ------------------------------------------------------------------------------ worker side
def _worker(out_dir: Path) -> None:
    from onerec.config import ModelConfig, MoEConfig, TrainConfig
    from onerec.distributed.deepspeed import build_engine, init_distributed
    from onerec.distributed.expert_parallel import apply_expert_parallel, expert_parallel_state_dict
    from onerec.inference.evaluate import evaluate_examples
    from onerec.model.onerec import OneRecModel
    from onerec.tokenizer.trie import build_trie
    from onerec.train.trainer import warmup_cosine

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    rank = info.rank
    model_cfg = ModelConfig(
        d_model=32, num_heads=2, encoder_layers=1, decoder_layers=2, d_ff=48, dropout=0.0,
        moe=MoEConfig(num_experts=4, top_k=2, aux_loss_weight=0.01, z_loss_weight=0.001),
    )
    codebook_sizes, history_len, session_len = [16, 16, 4], 6, 2
    # The same global batches on both layouts; rank r takes rows [r * MICRO_BATCH, ...).
    data = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(STEPS + 1):
        history = torch.stack([torch.randint(0, c, (WORLD * MICRO_BATCH, history_len), generator=data) for c in codebook_sizes], -1)
        history[:, :2] = -1  # some left padding, as real histories have
        target = torch.stack([torch.randint(0, c, (WORLD * MICRO_BATCH, session_len), generator=data) for c in codebook_sizes], -1)
        rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
        batches.append((history[rows], target[rows]))
    # A catalogue of 40 items with distinct code tuples, and 13 users (odd on purpose: the
    # shards and the batches of 4 are uneven) with histories of item indices.
    flat = torch.randperm(16 * 16 * 4, generator=data)[:40]  # distinct, so the tuples are too
    item_codes = torch.stack([flat // 64, flat // 4 % 16, flat % 4], -1)
    trie = build_trie(item_codes, codebook_sizes)
    eval_history = torch.randint(0, 40, (13, history_len), generator=data)
    eval_history[:, :3] = -1
    eval_target = torch.randint(0, 40, (13,), generator=data)

    def evaluate(model, distributed):
        return evaluate_examples(
            model, eval_history, eval_target, None, item_codes, trie, beam_width=10, ks=[1, 5, 10],
            batch_size=4, device="cpu", distributed=distributed,
        )

    results = {}
    for zero_stage in ZERO_STAGES:
        for ep in (1, 2):
            torch.manual_seed(0)  # every rank builds all experts from the seed, then keeps its slice
            model = OneRecModel(model_cfg, codebook_sizes, history_len, session_len)
            apply_expert_parallel(model, ep)
            # Clipping at 0.05 is active on every step (the gradient norms here are ~1).
            train_cfg = TrainConfig(lr=3e-3, weight_decay=0.01, grad_clip=0.05, zero_stage=zero_stage, warmup_steps=1)
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
            no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
            optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=train_cfg.lr, betas=(0.9, 0.98),
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10, 1, 0.1))
            engine = build_engine(model, optimizer, scheduler, train_cfg, MICRO_BATCH, WORLD)

            model.eval()
            with torch.no_grad():
                logits = model(*batches[-1]).logits_BMLC.clone()
            model.train()
            losses = []
            for history, target in batches[:STEPS]:
                output = engine(history, target)
                logits_flat = output.logits_BMLC.reshape(-1, output.logits_BMLC.shape[-1])
                ntp = torch.nn.functional.cross_entropy(logits_flat, target.reshape(-1))
                loss = ntp + 0.01 * output.aux_loss + 0.001 * output.z_loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            state = expert_parallel_state_dict(model)  # collective: full expert set on every rank
            if zero_stage == 0:
                results[("eval", ep)] = {
                    "sharded": evaluate(model, distributed=True),
                    # An ep=2 model cannot run on one rank alone: its forward is a collective.
                    "single": evaluate(model, distributed=False) if ep == 1 else None,
                }
            results[(zero_stage, ep)] = {
                "logits": logits,
                "losses": torch.tensor(losses),
                "state": state,
                "local_experts": model.decoder_layers[0].ffn.experts.w1_EFD.shape[0],
            }
    torch.save(results, out_dir / f"rank{rank}.pt")
    torch.distributed.barrier()


# ------------------------------------------------------------------------------ test side
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from distributed_helpers import free_port, run_ranks  # the test side only, not the workers

    out_dir = tmp_path_factory.mktemp("ep")
    port = free_port()
    env_base = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_WORLD_SIZE": str(WORLD),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    # A few seconds on idle cores; the generous limit only catches a hang, not a slow machine.
    return run_ranks(Path(__file__), out_dir, WORLD, env_base, timeout=900, what="expert-parallel")


@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_ep2_forward_matches_ep1(runs, zero_stage):
    for rank in range(WORLD):
        ep1, ep2 = runs[rank][(zero_stage, 1)], runs[rank][(zero_stage, 2)]
        torch.testing.assert_close(ep2["logits"], ep1["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_ep2_losses_match_ep1(runs, zero_stage):
    for rank in range(WORLD):
        ep1, ep2 = runs[rank][(zero_stage, 1)], runs[rank][(zero_stage, 2)]
        torch.testing.assert_close(ep2["losses"], ep1["losses"], rtol=1e-5, atol=1e-5)
        assert not torch.equal(ep1["losses"][0], ep1["losses"][-1]), "training did not move the loss"


@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_ep2_updated_parameters_match_ep1(runs, zero_stage):
    initial = runs[0][(zero_stage, 1)]
    for rank in range(WORLD):
        ep1, ep2 = runs[rank][(zero_stage, 1)]["state"], runs[rank][(zero_stage, 2)]["state"]
        assert ep1.keys() == ep2.keys()
        for name in ep1:
            # The gathered ep=2 state holds the full expert set, in global expert order.
            assert ep2[name].shape == ep1[name].shape, name
            torch.testing.assert_close(ep2[name], ep1[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Both ranks end with the same (gathered) model, and each really held only half the experts.
    for name, value in runs[0][(zero_stage, 2)]["state"].items():
        torch.testing.assert_close(runs[1][(zero_stage, 2)]["state"][name], value, rtol=0, atol=0)
    assert [runs[r][(zero_stage, 2)]["local_experts"] for r in range(WORLD)] == [2, 2]
    assert initial["local_experts"] == 4


def test_sharded_evaluation_equals_the_single_process_metrics(runs):
    single = runs[0][("eval", 1)]["single"]
    assert runs[1][("eval", 1)]["single"] == single  # same model, same rows on both ranks
    assert any(value > 0 for value in single.values()), "no hits at all: the comparison would be vacuous"
    for rank in range(WORLD):
        # Integer hit counts summed over ranks: exactly equal, not merely close.
        assert runs[rank][("eval", 1)]["sharded"] == single
        # The ep=2 model is the same function up to float rounding; 1/13 is one user's hit.
        for metric, value in runs[rank][("eval", 2)]["sharded"].items():
            assert abs(value - single[metric]) <= 1 / 13 + 1e-9, metric


def test_shard_rows_are_strided_and_padded_to_equal_length():
    from onerec.inference.evaluate import _shard_rows

    shards = [_shard_rows(7, rank, 3) for rank in range(3)]
    assert [rows.tolist() for rows, _ in shards] == [[0, 3, 6], [1, 4, 0], [2, 5, 0]]
    assert [counted for _, counted in shards] == [3, 2, 2]
    assert _shard_rows(1, 1, 2)[0].tolist() == [0] and _shard_rows(1, 1, 2)[1] == 0


def test_expert_parallel_size_must_divide_experts_and_world():
    from onerec.config import ConfigError, load_config
    from onerec.distributed.expert_parallel import check_expert_parallel

    check_expert_parallel(2, num_experts=4, world_size=4)
    with pytest.raises(ConfigError, match="does not divide model.moe.num_experts=6"):
        check_expert_parallel(4, num_experts=6, world_size=4)
    with pytest.raises(ConfigError, match="does not divide the world size"):
        check_expert_parallel(2, num_experts=4, world_size=3)
    with pytest.raises(ConfigError, match="expert_parallel_size"):
        load_config(overrides=["parallel.expert_parallel_size=0"])
    assert load_config(overrides=["parallel.expert_parallel_size=2"]).parallel.expert_parallel_size == 2


def test_regroup_order_turns_source_major_blocks_into_expert_major():
    from onerec.distributed.expert_parallel import _source_major_to_expert_major

    # 2 source ranks x 2 local experts; received rows: src0:e0 x2, src0:e1 x1, src1:e0 x0, src1:e1 x3
    counts_SJ = torch.tensor([[2, 1], [0, 3]])
    # received row ids 0 1 | 2 | (none) | 3 4 5 -> expert-major: e0: 0 1 ; e1: 2, 3 4 5
    assert _source_major_to_expert_major(counts_SJ).tolist() == [0, 1, 2, 3, 4, 5]
    counts_SJ = torch.tensor([[1, 2], [3, 1]])
    # rows: src0:e0 [0], src0:e1 [1 2], src1:e0 [3 4 5], src1:e1 [6] -> e0: 0 3 4 5 ; e1: 1 2 6
    assert _source_major_to_expert_major(counts_SJ).tolist() == [0, 3, 4, 5, 1, 2, 6]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
