"""`onerec dpo`: Iterative Preference Alignment of the pretrained model with the reward model.

Reads <out>/pretrain/export and <out>/reward; writes <out>/dpo/{export, alignment.json}.
alignment.json (also merged into metrics.json by the evaluate stage):

    {"pretrain": {reward_mean, reward_max, recall@K, ndcg@K, per_signal: {name: {mean, max}}},
     "rounds":   [{same keys, plus "train": round statistics}, ...],
     "eval_split": "valid", "eval_users": n, "config": {...align...}}

The held-out users are a fixed random subset of the validation split (the selection split),
the same for every round, so the rows are comparable.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import numpy as np
import torch

from onerec.align.ipa import Prompts, evaluate_alignment, ipa_round, latest_training_prompts
from onerec.align.reward_scorer import load_reward
from onerec.checkpoint import save_weights
from onerec.config import RootConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import make_splits
from onerec.device import resolve_device
from onerec.export import export_model, load_export
from onerec.logging import RunLogger, write_json_atomic
from onerec.paths import RunPaths

log = logging.getLogger("onerec.dpo")


def _summary(values: dict) -> str:
    return (
        f"reward mean {values['reward_mean']:.4f} max {values['reward_max']:.4f}, "
        f"recall@10 {values.get('recall@10', float('nan')):.4f} ndcg@10 {values.get('ndcg@10', float('nan')):.4f}"
    )


def _scalars(values: dict) -> dict[str, float]:
    """One evaluation's reward and recall as flat scalars for the run log (W&B)."""
    flat = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, stats in values.get("per_signal", {}).items():
        flat.update({f"{name}/reward_{k}": v for k, v in stats.items()})
    return flat


def main(cfg: RootConfig) -> dict:
    started = time.perf_counter()
    acfg = cfg.align
    paths = RunPaths.of(cfg.run.out_dir)
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    exported = load_export(paths.require(paths.export, "pretrain"), device)
    policy = exported.model
    codes_NL = exported.semantic_ids.codes.to(device)
    scorer = load_reward(paths.require(paths.reward, "reward"), codes_NL, device)
    prepared = load_prepared(paths.require(paths.data, "data"))
    splits = make_splits(prepared.sequences, cfg.data)
    train, valid = splits["train"], splits["valid"]
    rng = np.random.default_rng(cfg.run.seed)

    eval_rows = np.sort(rng.choice(len(valid), size=min(acfg.eval_users, len(valid)), replace=False))
    eval_prompts = Prompts(valid.user[eval_rows], valid.history[eval_rows], valid.target[eval_rows])
    eval_targets = valid.target[eval_rows, 0]

    def evaluate() -> dict:
        return evaluate_alignment(
            policy, scorer, eval_prompts, eval_targets, codes_NL, exported.trie, acfg.num_samples,
            cfg.data.session_len, cfg.eval.beam_width, list(cfg.eval.ks), cfg.eval.batch_size, device,
            exclude_history=cfg.eval.exclude_history,
        )

    run_logger = RunLogger(cfg.logging, paths.root, "dpo", to_dict(cfg))
    result = {"eval_split": "valid", "eval_users": len(eval_prompts), "config": asdict(acfg)}
    result["pretrain"] = evaluate()
    run_logger.log(_scalars(result["pretrain"]), 0)
    log.info("before alignment: %s", _summary(result["pretrain"]))
    prompts = latest_training_prompts(train.user, train.history, train.target)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    # Recall of the pretrained model is the floor a round must keep: DPO against a reward that
    # disagrees with what users consume next can buy reward with accuracy (reward hacking).
    recall_floor = (1.0 - acfg.max_recall_drop) * result["pretrain"]["recall@10"]
    accepted_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    result["rounds"], result["exported_round"] = [], 0
    for round_index in range(1, acfg.rounds + 1):
        sampled = np.sort(rng.choice(len(prompts), size=max(1, math.ceil(acfg.users_fraction * len(prompts))), replace=False))
        stats = ipa_round(
            policy, scorer, prompts.subset(sampled), codes_NL, exported.trie, acfg, cfg.data.session_len, generator, device
        )
        values = evaluate()
        values["train"] = asdict(stats)
        values["accepted"] = values["recall@10"] >= recall_floor
        result["rounds"].append(values)
        run_logger.log({**_scalars(values), **{f"train/{k}": v for k, v in asdict(stats).items()}}, round_index)
        log.info(
            "round %d: %d pairs (chosen reward %.4f, rejected %.4f), dpo loss %.4f; %s",
            round_index, stats.pairs, stats.chosen_reward, stats.rejected_reward, stats.dpo_loss, _summary(values),
        )
        if not values["accepted"]:
            log.warning(
                "round %d rejected: held-out recall@10 %.4f is below %.4f (pretrained %.4f, align.max_recall_drop=%g); "
                "exporting round %d",
                round_index, values["recall@10"], recall_floor, result["pretrain"]["recall@10"], acfg.max_recall_drop,
                result["exported_round"],
            )
            policy.load_state_dict(accepted_state)
            break
        accepted_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        result["exported_round"] = round_index
    result["wall_seconds"] = time.perf_counter() - started
    run_logger.summary({"exported_round": result["exported_round"]})
    run_logger.close()

    weights = paths.dpo / "aligned.safetensors"
    paths.dpo.mkdir(parents=True, exist_ok=True)
    save_weights(policy, weights)
    items = prepared.items
    export_model(paths.dpo_export, weights, exported.cfg, exported.semantic_ids, list(items["raw_id"]), list(items["title"]))
    write_json_atomic(paths.dpo / "alignment.json", result)
    log.info("aligned model exported to %s", paths.dpo_export)
    return result
