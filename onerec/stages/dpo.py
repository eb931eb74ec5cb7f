"""`onerec dpo`: Iterative Preference Alignment of the pretrained model with the reward model.

Reads <out>/pretrain/export and <out>/reward; writes <out>/dpo/{export, alignment.json}.
alignment.json (also merged into metrics.json by the evaluate stage):

    {"pretrain": {reward_mean, reward_max, recall@K, ndcg@K, per_signal: {name: {mean, max}}},
     "rounds":   [{same keys, plus "train": round statistics, "accepted"}, ...],
     "exported_round": k, "eval_split": "valid", "eval_users": n, "config": {...align...}}

The held-out users are a fixed random subset of the validation split (the selection split),
the same for every round, so the rows are comparable.

It runs on every rank of a launcher (`distributed` in the stage table); one round is

    sample (sharded)   every rank generates, scores and takes the reference log-probs of its
                       share of the round's users (onerec/align/sampling.py)
    gather             the pair rows meet on every rank, in user order (onerec/align/pairs.py);
                       rank 0 writes them to dpo/round_<k>/pairs.safetensors
    train              DPO + NTP through the shared Trainer (onerec/align/dpo_training.py):
                       DeepSpeed engine, data parallel, experts sharded when
                       parallel.expert_parallel_size > 1, checkpoints in dpo/round_<k>/
    evaluate (sharded) the held-out reward and recall, summed over ranks; the round is
                       accepted or rejected (align.max_recall_drop)

The round's users come from (run.seed, round) alone and beam search draws nothing at random,
so the pairs, and with align.batch_size the global batch, do not depend on the number of
ranks (up to float rounding). A killed job resumes mid-round from the round's files
(onerec/align/round_files.py): finished rounds are read back, saved pairs are not sampled
again, and training continues from the round's newest checkpoint. Only rank 0 writes.

Every round trains a freshly built module (loaded with the previous round's weights): a
DeepSpeed engine, ZeRO-2's gradient hooks in particular, stays attached to the module it
was built on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import torch

from onerec.align.dpo_training import autocast_of, round_statistics, round_train_config, train_on_pairs
from onerec.align.ipa import Prompts, evaluate_alignment, latest_training_prompts, round_users
from onerec.align.pairs import PAIRS_FILE, PairTable, gather_rows, load_pairs, save_pairs, shard_rows
from onerec.align.reward_scorer import load_reward
from onerec.align.round_files import POLICY_FILE, prepare_rounds, read_round, round_dir, write_round
from onerec.align.sampling import sample_pairs
from onerec.checkpoint import load_weights, save_weights
from onerec.config import RootConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import make_splits
from onerec.distributed.deepspeed import init_distributed
from onerec.distributed.expert_parallel import (
    apply_expert_parallel,
    expert_parallel_state_dict,
    has_expert_parallel_params,
)
from onerec.export import build_model, export_model, load_export
from onerec.logging import RunLogger, write_json_atomic
from onerec.paths import RunPaths
from onerec.train.trainer import AfterStepFn

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


class _RoundLog:
    """The Trainer's log calls of one round on the stage's single step axis: the round's steps
    follow the earlier rounds' (metrics.jsonl and W&B want one increasing step per stage), its
    scalars under train/, tagged with the round. Anything else goes to the stage's logger."""

    def __init__(self, logger: RunLogger, offset: int, round_index: int) -> None:
        self._logger, self._offset, self._round = logger, offset, round_index

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._logger.log({"round": self._round, **{f"train/{k}": v for k, v in metrics.items()}}, self._offset + step)

    def set_training_run(self, run_id: str) -> None:
        """Each round is a Trainer run of its own; the stage keeps one W&B run over all rounds."""

    def __getattr__(self, name: str):
        return getattr(self._logger, name)


def _fingerprint(cfg: RootConfig) -> str:
    """The dpo stage's provenance fingerprint (its config keys and the outputs it reads): the
    saved rounds are continued only when it has not changed."""
    from onerec.provenance import LEGACY_OUTPUT, fingerprint, read_record
    from onerec.stages import BY_NAME

    stage, root = BY_NAME["dpo"], RunPaths.of(cfg.run.out_dir).root
    upstream = {}
    for name in stage.upstream(cfg):
        record = read_record(root, name)
        upstream[name] = record.output_id if record is not None else LEGACY_OUTPUT
    return fingerprint("dpo", stage.config_keys(cfg), upstream, [])


class _Ipa:
    """What the rounds of one `onerec dpo` run share, and the steps of a round (on every rank)."""

    def __init__(self, cfg: RootConfig, dist_info, exported, scorer, prompts: Prompts, eval_prompts: Prompts,
                 eval_targets: np.ndarray, run_logger: RunLogger, fingerprint: str) -> None:
        self.cfg, self.acfg, self.dist = cfg, cfg.align, dist_info
        self.device = dist_info.device
        self.paths = RunPaths.of(cfg.run.out_dir)
        self.model_cfg, self.semantic_ids = exported.cfg, exported.semantic_ids
        self.codes_NL = exported.semantic_ids.codes.to(self.device)
        self.trie = exported.trie.to(self.device)
        self.scorer, self.prompts = scorer, prompts
        self.eval_prompts, self.eval_targets = eval_prompts, eval_targets
        self.run_logger, self.fingerprint = run_logger, fingerprint
        self.autocast = autocast_of(cfg.train, self.device)
        self.train_cfg = round_train_config(cfg.align, cfg.train, dist_info.world_size)
        self.config_dict = to_dict(cfg)

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def build_policy(self, state: dict[str, torch.Tensor]):
        """M_t from full weights: every rank loads them all, then keeps its experts' slice."""
        model = build_model(self.model_cfg, self.semantic_ids)
        model.load_state_dict(state)
        model.to(self.device).eval()
        apply_expert_parallel(model, self.cfg.parallel.expert_parallel_size)
        return model

    def load_policy_file(self, path) -> dict[str, torch.Tensor]:
        """A finished round's weights (verified against their manifest), on the host."""
        model = build_model(self.model_cfg, self.semantic_ids)
        load_weights(model, path)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @staticmethod
    def full_weights(model) -> dict[str, torch.Tensor]:
        """Every weight on every rank, on the host (a collective under expert parallelism)."""
        if has_expert_parallel_params(model):
            return {k: v.cpu() for k, v in expert_parallel_state_dict(model).items()}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def evaluate(self, model) -> dict:
        """The held-out reward and recall, each rank evaluating its share of the users."""
        cfg = self.cfg
        return evaluate_alignment(
            model, self.scorer, self.eval_prompts, self.eval_targets, self.codes_NL, self.trie, self.acfg.num_samples,
            cfg.data.session_len, cfg.eval.beam_width, list(cfg.eval.ks), self.acfg.sample_batch_size, self.device,
            exclude_history=cfg.eval.exclude_history, distributed=True,
        )

    def pairs(self, k: int, policy, saved: bool) -> PairTable:
        """Round k's pair rows: read back when a previous attempt saved them, else sampled (each
        rank its share of the users), gathered on every rank, and saved by rank 0 before training."""
        path = round_dir(self.paths.dpo, k) / PAIRS_FILE
        if saved:
            table, _ = load_pairs(path)
            log.info("round %d: %d pairs of %d users read from %s (not sampled again)",
                     k, int(table.usable_R.sum()), len(table), path)
            return table
        acfg, rank, world = self.acfg, self.dist.rank, self.dist.world_size
        users_U = round_users(self.cfg.run.seed, k, len(self.prompts), acfg.users_fraction)
        rows_R = shard_rows(len(users_U), rank, world)
        mine = users_U[rows_R.clamp(min=0).numpy()]  # padding rows repeat the round's first user
        log.info("round %d: sampling %d sessions for each of %d users (%d on each of %d ranks)",
                 k, acfg.num_samples, len(users_U), len(rows_R), world)
        started = time.perf_counter()
        local = sample_pairs(
            policy, self.scorer, torch.as_tensor(self.prompts.history[mine]), torch.as_tensor(self.prompts.user[mine]),
            torch.as_tensor(self.prompts.target[mine]), rows_R, self.codes_NL, self.trie, acfg.num_samples,
            self.cfg.data.session_len, acfg.sample_batch_size, self.device, self.autocast,
        )
        table = gather_rows(local, world, self.device)
        seconds = time.perf_counter() - started
        log.info("round %d: sampled %d users in %.1f s (%.1f sessions/s over %d ranks), %d pairs",
                 k, len(table), seconds, len(table) * acfg.num_samples / max(seconds, 1e-9), world,
                 int(table.usable_R.sum()))
        if self.dist.is_main:
            save_pairs(path, table, {"round": k, "users": len(users_U), "fingerprint": self.fingerprint})
        return table

    def run_round(self, k: int, policy, saved: bool, recall_floor: float, offset: int,
                  after_step: Optional[AfterStepFn]) -> tuple[dict, dict[str, torch.Tensor]]:
        """Sample (or read back), train, evaluate and save round k from `policy` (M_t, trained in
        place); (the round's values, the policy's full weights)."""
        here = round_dir(self.paths.dpo, k)
        table = self.pairs(k, policy, saved)
        pairs = table.usable()
        steps = 0
        if len(pairs):
            step_hook = None if after_step is None else (lambda step: after_step(offset + step))
            steps = train_on_pairs(
                policy, pairs, self.codes_NL, self.acfg, self.train_cfg, here, self.dist,
                _RoundLog(self.run_logger, offset, k), self.config_dict, seed=self.cfg.run.seed + 1000 * k,
                after_step=step_hook,
            ).steps
        else:
            log.warning("round %d: no user's sessions differ in reward, so no pairs: the policy stays", k)
        stats = round_statistics(policy, pairs.to(self.device), self.codes_NL, self.acfg, self.device,
                                 self.dist.rank, self.dist.world_size, self.autocast, steps, len(table))
        values = self.evaluate(policy)
        values["train"] = asdict(stats)
        values["accepted"] = values["recall@10"] >= recall_floor
        state = self.full_weights(policy)  # a collective under expert parallelism
        if self.dist.is_main:  # the weights first: round.json marks a finished round
            save_weights(policy, here / POLICY_FILE, full_state=state, provenance={"round": k})
            write_round(self.paths.dpo, k, {"values": values})
        log.info(
            "round %d: %d pairs of %d users (chosen reward %.4f, rejected %.4f), %d steps, dpo loss %.4f; %s",
            k, stats.pairs, stats.users, stats.chosen_reward, stats.rejected_reward, steps, stats.dpo_loss,
            _summary(values),
        )
        return values, state


def main(cfg: RootConfig, after_step: Optional[AfterStepFn] = None) -> dict:
    """after_step: called with each finished DPO step, numbered over all rounds (tests inject faults with it)."""
    started = time.perf_counter()
    acfg = cfg.align
    paths = RunPaths.of(cfg.run.out_dir)
    dist_info = init_distributed(cfg.run.device)
    torch.manual_seed(cfg.run.seed)

    exported = load_export(paths.require(paths.export, "pretrain"), "cpu")
    scorer = load_reward(paths.require(paths.reward, "reward"), exported.semantic_ids.codes, dist_info.device)
    prepared = load_prepared(paths.require(paths.data, "data"))
    splits = make_splits(prepared.sequences, cfg.data)
    train, valid = splits["train"], splits["valid"]
    item_table = prepared.items
    rng = np.random.default_rng(cfg.run.seed)
    eval_rows = np.sort(rng.choice(len(valid), size=min(acfg.eval_users, len(valid)), replace=False))
    eval_prompts = Prompts(valid.user[eval_rows], valid.history[eval_rows], valid.target[eval_rows])
    prompts = latest_training_prompts(train.user, train.history, train.target)

    fingerprint = _fingerprint(cfg)
    if dist_info.is_main:
        prepare_rounds(paths.dpo, fingerprint, resume=cfg.train.resume != "none")
    run_logger = RunLogger(cfg.logging, paths.root, "dpo", to_dict(cfg), rank=dist_info.rank)
    ipa = _Ipa(cfg, dist_info, exported, scorer, prompts, eval_prompts, valid.target[eval_rows, 0], run_logger,
               fingerprint)
    del prepared, splits, train, valid
    ipa.barrier()  # nobody reads a round directory before rank 0 has sorted them

    result: dict = {"eval_split": "valid", "eval_users": len(eval_prompts), "config": asdict(acfg)}
    accepted_state = {k: v.detach().clone() for k, v in exported.model.state_dict().items()}
    try:
        policy = ipa.build_policy(accepted_state)
        pretrained = read_round(paths.dpo, 0)
        ipa.barrier()  # every rank has looked before rank 0 writes
        if pretrained is None:
            pretrained = {"values": ipa.evaluate(policy)}
            if dist_info.is_main:
                write_round(paths.dpo, 0, pretrained)
        result["pretrain"] = pretrained["values"]
        run_logger.log({"round": 0, **_scalars(result["pretrain"])}, 0)
        log.info("before alignment: %s", _summary(result["pretrain"]))
        # Recall of the pretrained model is the floor a round must keep: DPO against a reward that
        # disagrees with what users consume next can buy reward with accuracy (reward hacking).
        recall_floor = (1.0 - acfg.max_recall_drop) * result["pretrain"]["recall@10"]
        result["rounds"], result["exported_round"] = [], 0
        offset = 0  # DPO steps of the earlier rounds: the stage's step axis in the run log
        for k in range(1, acfg.rounds + 1):
            here = round_dir(paths.dpo, k)
            finished = read_round(paths.dpo, k)
            saved = (here / PAIRS_FILE).is_file()
            ipa.barrier()  # every rank has looked before rank 0 writes
            if finished is not None:
                values = finished["values"]
                log.info("round %d finished earlier (%s): %s", k, here, _summary(values))
            else:
                if k > 1:  # round 1 trains the module the pretrained evaluation used
                    del policy
                    policy = ipa.build_policy(accepted_state)
                values, state = ipa.run_round(k, policy, saved, recall_floor, offset, after_step)
            offset += values["train"]["steps"]
            result["rounds"].append(values)
            run_logger.log({"round": k, **_scalars(values), **{f"round/{n}": v for n, v in values["train"].items()}},
                           offset)
            if not values["accepted"]:
                log.warning(
                    "round %d rejected: held-out recall@10 %.4f is below %.4f (pretrained %.4f, "
                    "align.max_recall_drop=%g); exporting round %d",
                    k, values["recall@10"], recall_floor, result["pretrain"]["recall@10"], acfg.max_recall_drop,
                    result["exported_round"],
                )
                break
            accepted_state = state if finished is None else ipa.load_policy_file(here / POLICY_FILE)
            result["exported_round"] = k
        result["wall_seconds"] = time.perf_counter() - started
        run_logger.summary({"exported_round": result["exported_round"]})
    finally:
        run_logger.close()

    if dist_info.is_main:
        weights = paths.dpo / "aligned.safetensors"
        aligned = build_model(exported.cfg, exported.semantic_ids)
        aligned.load_state_dict(accepted_state)
        save_weights(aligned, weights)
        export_model(paths.dpo_export, weights, exported.cfg, exported.semantic_ids, list(item_table["raw_id"]),
                     list(item_table["title"]))
        write_json_atomic(paths.dpo / "alignment.json", result)
        log.info("aligned model (round %d) exported to %s", result["exported_round"], paths.dpo_export)
    ipa.barrier()  # the job ends when rank 0 has written the outputs
    return result
