"""The item head (OneRecModel.item_logits): its logits, its loss in pretraining
(train.item_loss_weight), the rerank of the final beams (eval.item_score_weight), and the
config checks around them."""

import pytest
import torch
import torch.nn.functional as F

from onerec.config import ConfigError, LoggingConfig, ModelConfig, MoEConfig, TrainConfig, load_config, to_dict
from onerec.inference.beam_search import constrained_beam_search
from onerec.inference.evaluate import evaluate_examples
from onerec.model.onerec import OneRecModel, lookup_codes
from onerec.stages.pretrain import batch_loss
from onerec.tokenizer.trie import build_trie
from onerec.train.losses import item_loss, next_token_loss
from catalogue_helpers import random_catalogue

SIZES = [5, 4, 3]
NUM_ITEMS = 24
MAX_HISTORY = 5


def _model(seed: int = 0, item_id_embedding: bool = True, dropout: float = 0.0, moe: bool = True) -> OneRecModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=32, num_heads=4, encoder_layers=1, decoder_layers=1, d_ff=64, dropout=dropout,
        item_id_embedding=item_id_embedding, moe=MoEConfig(enabled=moe, num_experts=3, top_k=2),
    )
    num_items = NUM_ITEMS if item_id_embedding else 0
    return OneRecModel(cfg, SIZES, max_history=MAX_HISTORY, session_len=2, num_items=num_items)


def _histories(num_users: int, seed: int) -> torch.Tensor:
    """[users, MAX_HISTORY] item indices, right-aligned, 1..MAX_HISTORY real items each."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, NUM_ITEMS, (num_users, MAX_HISTORY), generator=g)
    lengths = torch.randint(1, MAX_HISTORY + 1, (num_users,), generator=g)
    history[torch.arange(MAX_HISTORY) < (MAX_HISTORY - lengths).unsqueeze(1)] = -1
    return history


# ---------------------------------------------------------------- the head


def test_item_logits_are_the_last_encoder_state_against_the_item_table():
    model = _model().eval()
    codes = random_catalogue(NUM_ITEMS, SIZES, 0)
    history = _histories(3, 0)
    with torch.no_grad():
        memory = model.encode(lookup_codes(history, codes), history_items_BS=history)
        logits_BN = model.item_logits(memory)
        expected_BN = memory.states_BSD[:, -1] @ model.item_emb.weight.T
        target = lookup_codes(torch.randint(0, NUM_ITEMS, (3, 2)), codes)
        plain = model(lookup_codes(history, codes), target, None, history)
        with_head = model(lookup_codes(history, codes), target, None, history, with_item_logits=True)
    assert logits_BN.shape == (3, NUM_ITEMS) and logits_BN.dtype == torch.float32
    torch.testing.assert_close(logits_BN, expected_BN)
    assert plain.item_logits_BN is None  # not asked for: not computed
    torch.testing.assert_close(with_head.item_logits_BN, logits_BN)
    assert torch.equal(with_head.logits_BMLC, plain.logits_BMLC)  # the generative side is untouched


def test_item_logits_stay_float32_under_bf16_autocast():
    model = _model().eval()
    codes = random_catalogue(NUM_ITEMS, SIZES, 1)
    history = _histories(2, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits_BN = model.item_logits(model.encode(lookup_codes(history, codes), history_items_BS=history))
    assert logits_BN.dtype == torch.float32


def test_item_logits_need_the_item_id_embedding():
    model = _model(item_id_embedding=False).eval()
    history = _histories(2, 0)
    memory = model.encode(lookup_codes(history, random_catalogue(NUM_ITEMS, SIZES, 0)))
    with pytest.raises(ValueError, match="model.item_id_embedding"):
        model.item_logits(memory)


def test_item_loss_ignores_missing_targets_and_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits_BN = torch.randn(6, 11, generator=g) * 3
    targets_B = torch.tensor([3, -1, 0, 10, -1, 7], dtype=torch.int32)  # int32, as the batches hold them
    real = targets_B >= 0
    expected = F.cross_entropy(logits_BN[real], targets_B[real].long())
    torch.testing.assert_close(item_loss(logits_BN, targets_B), expected)
    # a -1 row's logits do not matter
    changed = logits_BN.clone()
    changed[1] += torch.randn(11, generator=g) * 10
    torch.testing.assert_close(item_loss(changed, targets_B), expected)
    # no real target at all: zero, not NaN
    assert item_loss(logits_BN, torch.full((6,), -1)).item() == 0.0


# ---------------------------------------------------------------- pretraining


def _batch(seed: int, codes: torch.Tensor, num_users: int = 8):
    """(history [B, S], target [B, 2] with some -1 session slots) of random items."""
    g = torch.Generator().manual_seed(seed + 100)
    target = torch.randint(0, NUM_ITEMS, (num_users, 2), generator=g)
    target[::3, 1] = -1  # a shorter session
    return _histories(num_users, seed), target


def _todays_loss(model, history, target, codes, train: TrainConfig, moe: MoEConfig) -> torch.Tensor:
    """The pretrain step's loss as it was computed before the item head existed."""
    target_codes = lookup_codes(target, codes)
    output = model(lookup_codes(history, codes), target_codes, None, history)
    ntp, _ = next_token_loss(output.logits_BMLC, target_codes, model.code_mask_LC, train.label_smoothing)
    return ntp + moe.aux_loss_weight * output.aux_loss + moe.z_loss_weight * output.z_loss


def test_pretrain_loss_without_the_item_head_is_unchanged_bit_for_bit():
    """Dropout on, the same seed before each call: the same random masks, the same loss, and no
    `item_loss` logged; with a weight, the loss adds weight x the head's cross-entropy."""
    model = _model(dropout=0.2).train()
    codes = random_catalogue(NUM_ITEMS, SIZES, 2)
    history, target = _batch(2, codes)
    moe = model.cfg.moe
    off = TrainConfig(item_loss_weight=0.0, label_smoothing=0.1)
    torch.manual_seed(5)
    today = _todays_loss(model, history, target, codes, off, moe)
    torch.manual_seed(5)
    loss, scalars = batch_loss(model, history, target, None, codes, model.code_mask_LC, off, moe)
    assert torch.equal(loss, today)
    assert "item_loss" not in scalars and {"ntp_loss", "aux_loss", "z_loss"} <= set(scalars)

    on = TrainConfig(item_loss_weight=0.5, label_smoothing=0.1)
    torch.manual_seed(5)
    with_head, scalars = batch_loss(model, history, target, None, codes, model.code_mask_LC, on, moe)
    torch.manual_seed(5)
    memory = model.encode(lookup_codes(history, codes), history_items_BS=history)
    expected_item = item_loss(model.item_logits(memory), target[:, 0])  # the session's first item
    torch.testing.assert_close(torch.tensor(scalars["item_loss"]), expected_item.detach())
    torch.testing.assert_close(with_head, today + 0.5 * expected_item)


def _next_item_task(num_examples: int = 96):
    """Histories of random items whose next item is (last item + 1) mod NUM_ITEMS."""
    history = _histories(num_examples, 7)
    target = torch.stack([(history[:, -1] + 1) % NUM_ITEMS, torch.full((num_examples,), -1)], dim=1)
    return history, target


def _train_on_toy_task(tmp_path, item_loss_weight: float, steps: int = 40) -> tuple[float, float]:
    """(item loss of the whole toy set before, after) `steps` steps through the trainer's real
    DeepSpeed engine (which must pass with_item_logits on to the model)."""
    from onerec.distributed.deepspeed import init_distributed
    from onerec.logging import RunLogger
    from onerec.train.trainer import Trainer

    dist_info = init_distributed("cpu")
    model = _model(seed=1, moe=False)
    codes = random_catalogue(NUM_ITEMS, SIZES, 3)
    history, target = _next_item_task()

    def measured() -> float:
        model.eval()
        with torch.no_grad():
            memory = model.encode(lookup_codes(history, codes), history_items_BS=history)
            value = item_loss(model.item_logits(memory), target[:, 0]).item()
        model.train()
        return value

    def step_fn(engine, indices):
        return batch_loss(engine, history[indices], target[indices], None, codes, model.code_mask_LC, cfg, moe)

    moe = model.cfg.moe
    cfg = TrainConfig(
        batch_size=16, max_steps=steps, max_epochs=100, lr=1e-2, warmup_steps=2, eval_every=1000,
        checkpoint_every=1000, log_every=1000, patience=0, item_loss_weight=item_loss_weight,
    )
    before = measured()
    tmp_path.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(LoggingConfig(), tmp_path, "test", {}, rank=0)
    try:
        Trainer(cfg, model, len(history), step_fn, tmp_path, dist_info, logger, {}, seed=0).fit()
    finally:
        logger.close()
    return before, measured()


def test_training_with_the_item_loss_learns_the_next_item(tmp_path):
    before, after = _train_on_toy_task(tmp_path / "with", item_loss_weight=1.0)
    assert after < 0.5 * before, (before, after)
    # the item loss term is what teaches the head: without it the head stays near chance
    _, without = _train_on_toy_task(tmp_path / "without", item_loss_weight=0.0)
    assert after < 0.5 * without, (after, without)


# ---------------------------------------------------------------- reranking


def _search_setup(seed: int = 0):
    model = _model(seed=seed).eval()
    with torch.no_grad():  # larger weights: distinct, history-dependent scores on both sides
        for parameter in model.parameters():
            parameter.mul_(3.0)
    codes = random_catalogue(NUM_ITEMS, SIZES, seed)
    return model, codes, build_trie(codes, SIZES), _histories(6, seed)


def test_weight_zero_is_todays_search_and_never_computes_the_head(monkeypatch):
    model, codes, trie, history = _search_setup()
    target = torch.randint(0, NUM_ITEMS, (len(history),), generator=torch.Generator().manual_seed(0))
    args = (model, history, target, None, codes, trie)
    kwargs = dict(beam_width=8, ks=[1, 5], batch_size=4, device="cpu", exclude_history=True)
    today = evaluate_examples(*args, **kwargs)
    beams = constrained_beam_search(model, lookup_codes(history, codes), trie, 8, history_items_BS=history)

    def untouched(memory):
        raise AssertionError("item_score_weight=0 must not compute the item head")

    monkeypatch.setattr(model, "item_logits", untouched)
    assert evaluate_examples(*args, **kwargs, item_score_weight=0.0) == today
    again = constrained_beam_search(
        model, lookup_codes(history, codes), trie, 8, history_items_BS=history, item_score_weight=0.0
    )
    for name in ("items_BW", "scores_BW", "codes_BWL"):
        assert torch.equal(getattr(again, name), getattr(beams, name))


@pytest.mark.parametrize("exclude_history", [False, True])
def test_a_large_weight_orders_the_beams_by_the_item_head(exclude_history):
    """The same W items as the plain search, ordered by the head's log-probability (weight
    1e4 dwarfs the beam scores), each with the combined score; dead beams stay last."""
    model, codes, trie, history = _search_setup(1)
    weight, W = 1e4, NUM_ITEMS  # every item a beam: with excluded items, the rest are dead beams
    history_codes = lookup_codes(history, codes)
    exclude = history if exclude_history else None
    plain = constrained_beam_search(model, history_codes, trie, W, history_items_BS=history, exclude_items_BX=exclude)
    reranked = constrained_beam_search(
        model, history_codes, trie, W, history_items_BS=history, exclude_items_BX=exclude, item_score_weight=weight
    )
    with torch.no_grad():
        log_probs_BN = torch.log_softmax(model.item_logits(model.encode(history_codes, None, history)), dim=-1)
    moved = False
    for b in range(len(history)):
        live = plain.items_BW[b] >= 0
        items = plain.items_BW[b][live]
        by_head = items[torch.argsort(log_probs_BN[b, items], descending=True, stable=True)]
        assert reranked.items_BW[b, : len(items)].tolist() == by_head.tolist()
        assert (reranked.items_BW[b, len(items):] == -1).all()  # dead beams last
        assert torch.isneginf(reranked.scores_BW[b, len(items):]).all()
        beam_score = {int(i): s for i, s in zip(items, plain.scores_BW[b][live])}
        expected = torch.stack([beam_score[int(i)] + weight * log_probs_BN[b, i] for i in by_head])
        torch.testing.assert_close(reranked.scores_BW[b, : len(items)], expected)
        assert torch.equal(reranked.codes_BWL[b, : len(items)], codes[by_head])  # codes follow their item
        moved |= by_head.tolist() != items.tolist()
    assert moved  # the head disagrees with the beams somewhere, so the test sees the rerank


def test_evaluation_ranks_by_the_item_head_with_a_large_weight():
    """Targets = the head's favourite item among each row's beams: a perfect Recall@1 after the
    rerank, whatever the beams' own order."""
    model, codes, trie, history = _search_setup(2)
    history_codes = lookup_codes(history, codes)
    plain = constrained_beam_search(model, history_codes, trie, 8, history_items_BS=history)
    with torch.no_grad():
        log_probs_BN = torch.log_softmax(model.item_logits(model.encode(history_codes, None, history)), dim=-1)
    favourite = plain.items_BW.gather(1, log_probs_BN.gather(1, plain.items_BW).argmax(1, keepdim=True)).squeeze(1)
    kwargs = dict(beam_width=8, ks=[1], batch_size=4, device="cpu")
    assert evaluate_examples(model, history, favourite, None, codes, trie, **kwargs, item_score_weight=1e4)[
        "recall@1"
    ] == pytest.approx(1.0)
    plain_recall = evaluate_examples(model, history, favourite, None, codes, trie, **kwargs)["recall@1"]
    assert plain_recall < 1.0  # the beams alone put another item first somewhere


def test_rerank_refuses_a_model_without_the_head():
    model = _model(item_id_embedding=False).eval()
    codes = random_catalogue(NUM_ITEMS, SIZES, 0)
    history = _histories(2, 0)
    with pytest.raises(ValueError, match="eval.item_score_weight=0.5.*model.item_id_embedding"):
        evaluate_examples(model, history, torch.zeros(2, dtype=torch.long), None, codes, build_trie(codes, SIZES),
                          beam_width=5, ks=[5], batch_size=2, device="cpu", item_score_weight=0.5)
    with pytest.raises(ValueError, match="item_score_weight"):
        constrained_beam_search(model, lookup_codes(history, codes), build_trie(codes, SIZES), 5, item_score_weight=1.0)


def test_recommender_takes_the_weight_from_the_export_and_checks_it_at_load(tmp_path):
    from export_helpers import tiny_export

    from onerec.export import load_export
    from onerec.inference.recommend import Recommender

    exported = load_export(tiny_export(tmp_path), "cpu")  # no item-ID embedding
    assert Recommender(exported).item_score_weight == 0.0
    exported.cfg.eval.item_score_weight = 0.5
    with pytest.raises(ValueError, match="eval.item_score_weight=0.5"):
        Recommender(exported)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("key", ["train.item_loss_weight", "eval.item_score_weight"])
def test_the_item_head_without_an_item_id_embedding_is_a_config_error(key):
    from onerec.stages import BY_NAME, check_item_head, pipeline_stages

    cfg = load_config(None, [f"{key}=0.5", "run.out_dir=/nonexistent/run"])
    with pytest.raises(ConfigError, match=f"{key}=0.5 needs model.item_id_embedding=true"):
        check_item_head(cfg)
    with pytest.raises(ConfigError, match=key):
        pipeline_stages(cfg)  # `onerec pipeline` / `onerec plan` stop before the first stage
    with pytest.raises(ConfigError, match=key):
        BY_NAME["pretrain"].check_inputs(cfg)  # `onerec pretrain` stops before its missing inputs
    check_item_head(load_config(None, [f"{key}=0.5", "model.item_id_embedding=true"]))  # fine with the table


def test_negative_weights_are_refused():
    for key in ("train.item_loss_weight", "eval.item_score_weight"):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [f"{key}=-0.1"])


def test_records_written_before_the_item_head_stay_fresh():
    """At 0 the new keys are left out of the pretrain/evaluate fingerprints (older records stay
    fresh); another value counts. NEUTRAL_DEFAULTS follows the dataclasses' defaults."""
    from onerec.provenance import NEUTRAL_DEFAULTS, config_subset

    defaults = to_dict(load_config(None, []))

    def default_of(key: str):
        value = defaults
        for part in key.split("."):
            value = value[part]
        return value

    assert {key: default_of(key) for key in NEUTRAL_DEFAULTS} == NEUTRAL_DEFAULTS
    sections = ("data", "model", "train", "eval", "parallel", "run.seed")  # the pretrain stage's
    subset = config_subset(defaults, sections)
    assert "train.item_loss_weight" not in subset and "eval.item_score_weight" not in subset
    on = to_dict(load_config(None, ["train.item_loss_weight=0.3", "eval.item_score_weight=0.2"]))
    assert config_subset(on, sections)["train.item_loss_weight"] == 0.3
    assert config_subset(on, sections)["eval.item_score_weight"] == 0.2


def test_the_rerank_weight_is_chosen_after_training_without_retraining():
    """eval.item_score_weight is an inference setting: the training stages' fingerprints leave
    it out (their validation ranks the plain beams), evaluate's counts it."""
    from onerec.stages import BY_NAME

    base = load_config(None, ["model.item_id_embedding=true", "train.item_loss_weight=0.2"])
    reranked = load_config(None, ["model.item_id_embedding=true", "train.item_loss_weight=0.2",
                                  "eval.item_score_weight=1"])
    for name in ("baseline", "pretrain", "dpo"):
        assert BY_NAME[name].config_keys(base) == BY_NAME[name].config_keys(reranked), name
    assert BY_NAME["evaluate"].config_keys(reranked)["eval.item_score_weight"] == 1
    assert "eval.item_score_weight" not in BY_NAME["evaluate"].config_keys(base)  # 0: neutral


def test_a_checkpoint_written_before_the_item_head_still_resumes():
    """train.resume=auto compares the checkpoint's config with the current one: the new keys at
    their neutral value are no change, a weight that trains the head is one."""
    import copy

    from onerec.train.trainer import config_changes

    current = to_dict(load_config(None, []))
    saved = copy.deepcopy(current)
    del saved["train"]["item_loss_weight"], saved["eval"]["item_score_weight"]
    assert config_changes(saved, current) == []
    on = to_dict(load_config(None, ["train.item_loss_weight=0.5", "model.item_id_embedding=true"]))
    assert config_changes(saved, on) == ["model.item_id_embedding", "train.item_loss_weight"]
