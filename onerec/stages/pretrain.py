"""`onerec pretrain`: next-token training of the encoder-decoder on users' next sessions.

Reads <out>/data and <out>/semantic_ids, writes <out>/pretrain/{checkpoints, best, export}.
The export is built from the best validation checkpoint (NDCG@10), as the protocol asks.

With parallel.expert_parallel_size = ep > 1 every rank holds E / ep experts of each MoE
layer (onerec.distributed.expert_parallel); the trainer gathers them for checkpoints and
best weights, so the export holds the full expert set and resuming needs nothing special.

Training data stays on the host in compact form (onerec.data.splits.Examples: int32 items in
CSR, a few numbers per user) and each step gathers only its own batch's (history, target) rows
and copies them to the device. With the trainer's int32 permutation of the examples
(onerec.data.sampler) that is ~8 bytes per interaction per rank, where a dense
[num_examples, S + M + 1] int64 copy on every device took ~(S + M + 1) x 8
(bench/results/pretrain_data_memory_cpu.md).

With train.item_loss_weight > 0 the loss adds the item head's cross-entropy over the whole
catalogue (OneRecModel.item_logits). Validation ranks the plain beams whatever
eval.item_score_weight says: the rerank is an inference setting, chosen after training
(bench/validation.py --item-score-weight) and applied by evaluate, recommend and serve.

Shape legend: B batch, S history length, M session items, L code levels, N items.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from onerec.config import MoEConfig, RootConfig, TrainConfig, to_dict
from onerec.data.prepared import load_prepared
from onerec.data.splits import make_splits, validation_subset
from onerec.distributed.deepspeed import init_distributed
from onerec.distributed.expert_parallel import apply_expert_parallel
from onerec.errors import MissingInputError
from onerec.export import build_model, export_model
from onerec.inference.evaluate import evaluate_examples
from onerec.logging import RateMeter, RunLogger, expert_load_scalars
from onerec.model.onerec import lookup_codes
from onerec.paths import RunPaths
from onerec.stages import check_item_head
from onerec.tokenizer.semantic_ids import SemanticIds
from onerec.tokenizer.trie import build_trie
from onerec.train.losses import item_loss, next_token_loss
from onerec.train.trainer import AfterStepFn, Trainer

log = logging.getLogger("onerec.pretrain")


def batch_loss(
    engine,
    history_BS: torch.Tensor,
    target_BM: torch.Tensor,
    user_B: torch.Tensor | None,
    codes_NL: torch.Tensor,
    code_mask_LC: torch.Tensor,
    train: TrainConfig,
    moe: MoEConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch's training loss and its parts as scalars: the next-token cross-entropy, the
    MoE losses and, when train.item_loss_weight > 0, the item head's cross-entropy.

    engine: the model, or the DeepSpeed engine around it (which passes keyword arguments on).
    """
    history_codes_BSL = lookup_codes(history_BS, codes_NL)
    target_codes_BML = lookup_codes(target_BM, codes_NL)
    with_item_head = train.item_loss_weight > 0  # off: the head is not computed at all
    output = engine(history_codes_BSL, target_codes_BML, user_B, history_BS, with_item_logits=with_item_head)
    ntp, _ = next_token_loss(output.logits_BMLC, target_codes_BML, code_mask_LC, train.label_smoothing)
    loss = ntp + moe.aux_loss_weight * output.aux_loss + moe.z_loss_weight * output.z_loss
    scalars = {
        "ntp_loss": ntp.detach().item(),
        "aux_loss": output.aux_loss.detach().item(),
        "z_loss": output.z_loss.detach().item(),
    }
    if with_item_head:
        # The head scores one next item per history; with session_len > 1 that is the
        # session's first item, the one the history directly precedes.
        item_ce = item_loss(output.item_logits_BN, target_BM[:, 0])
        loss = loss + train.item_loss_weight * item_ce
        scalars["item_loss"] = item_ce.detach().item()
    # This rank's batch; with data parallelism each rank sees an unbiased sample.
    return loss, {**scalars, **expert_load_scalars(output.expert_load)}


def main(cfg: RootConfig, after_step: Optional[AfterStepFn] = None) -> Path:
    """after_step: called with each finished step's number (tests inject faults with it)."""
    check_item_head(cfg)  # before the process group starts (run_stage checks it too; tests call main directly)
    paths = RunPaths.of(cfg.run.out_dir)
    dist_info = init_distributed(cfg.run.device)
    device = dist_info.device
    if cfg.eval.item_score_weight > 0 and cfg.train.item_loss_weight == 0:
        log.warning(
            "eval.item_score_weight=%g will rerank the exported model's beams by its item head, which "
            "train.item_loss_weight=0 does not train", cfg.eval.item_score_weight,
        )
    torch.manual_seed(cfg.run.seed)

    prepared = load_prepared(paths.require(paths.data, "data"))
    semantic_ids = SemanticIds.load(paths.require(paths.semantic_ids, "tokenize"))
    splits = make_splits(prepared.sequences, cfg.data)
    train, valid = splits["train"], splits["valid"]
    # The splits hold their own compact copy of the items: drop the int64 sequences (items and
    # orders, 16 bytes per interaction) and the test split, which pretraining never reads.
    item_table = prepared.items
    del prepared, splits
    log.info("training examples: %d, validation users: %d", len(train), len(valid))

    codes_NL = semantic_ids.codes.to(device)
    trie = build_trie(semantic_ids.codes, list(semantic_ids.codebook_sizes)).to(device)
    model = build_model(cfg, semantic_ids).to(device)
    log.info("model parameters: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)
    # Every rank built all E experts from the same seed above, so sharding keeps ep=1 and
    # ep>1 the same function.
    apply_expert_parallel(model, cfg.parallel.expert_parallel_size)

    use_user_token = cfg.model.user_buckets > 0
    token_rate = RateMeter(cfg.train.log_every)

    def step_fn(engine, indices: torch.Tensor):
        batch = train.gather(indices.numpy())  # this step's rows only, gathered on the host
        history_BS = torch.from_numpy(batch.history).to(device)
        target_BM = torch.from_numpy(batch.target).to(device)
        user_B = torch.from_numpy(batch.user).to(device) if use_user_token else None
        loss, scalars = batch_loss(
            engine, history_BS, target_BM, user_B, codes_NL, model.code_mask_LC, cfg.train, cfg.model.moe
        )
        # Tokens = positions the model computes on, padding included (that is what costs time):
        # the encoder's start token + S history items, the decoder's M * (L + 1) inputs. Every
        # rank runs an equal share of the global batch, so the global count is world_size x ours.
        B, S = history_BS.shape
        M, L = target_BM.shape[1], codes_NL.shape[1]
        tokens = B * (S + 1 + M * (L + 1)) * dist_info.world_size
        return loss, {**scalars, "tokens": tokens, "tokens_per_s": token_rate.update(tokens)}

    rows = validation_subset(len(valid), cfg.eval.max_valid_users, cfg.run.seed)

    def eval_fn() -> dict[str, float]:
        metrics = evaluate_examples(
            model,
            valid.history[rows],
            valid.target[rows, 0],
            valid.user[rows] if use_user_token else None,
            codes_NL,
            trie,
            beam_width=cfg.eval.beam_width,
            ks=list(cfg.eval.ks),
            batch_size=cfg.eval.batch_size,
            device=device,
            desc="valid",
            distributed=dist_info.world_size > 1,  # each rank decodes its share of the users
            exclude_history=cfg.eval.exclude_history,
        )
        token_rate.reset()  # the next tokens_per_s covers training steps only
        return metrics

    config_dict = to_dict(cfg)
    run_logger = RunLogger(cfg.logging, paths.root, "pretrain", config_dict, rank=dist_info.rank)
    try:
        trainer = Trainer(
            cfg.train,
            model,
            num_examples=len(train),
            step_fn=step_fn,
            stage_dir=paths.pretrain,
            dist_info=dist_info,
            run_logger=run_logger,
            config_dict=config_dict,
            seed=cfg.run.seed,
            eval_fn=eval_fn,
            after_step=after_step,
        )
        result = trainer.fit()
        run_logger.summary({"best_valid_ndcg@10": result.best_metric, "best_step": result.best_step})
        if run_logger.uses_wandb:  # the report's expert-load heat map and codebook plots, as W&B media
            from onerec.report import training_figures  # matplotlib only when W&B receives it

            run_logger.log_figures(training_figures(paths.root))
    finally:
        run_logger.close()
    log.info(
        "pretraining done: %d steps, best valid NDCG@10 %.4f at step %d", result.steps, result.best_metric, result.best_step
    )
    if dist_info.is_main:
        if result.best_weights is None:  # the trainer reports only best weights this run wrote
            raise MissingInputError(
                f"{paths.pretrain / 'best'} holds no best weights of this training run (validation NDCG@10 "
                f"was never finite, or they were removed): nothing to export; start afresh with train.resume=none"
            )
        export_model(
            paths.export, result.best_weights, cfg, semantic_ids, list(item_table["raw_id"]), list(item_table["title"])
        )
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    return paths.pretrain
