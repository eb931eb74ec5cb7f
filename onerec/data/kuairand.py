"""KuaiRand-Pure (Kuaishou short video), the processed partial release.

Files under data.root:
- val.parquet, test.parquet: one logged impression a row (user_id, video_id, time_ms,
  is_click, is_like, is_follow, long_view, watch_ratio, ...), the last two weeks.
- user_sequences.parquet: per user the last <= 50 watches before those weeks (watch_seq,
  like_seq, long_watch_seq), in order, without timestamps.
- item_features.parquet: one row per video (author, tag, duration, type, counts...).

Interactions are the earlier watches followed by every impression, in time order. The
feedback columns are the signals a reward model learns: is_click, is_like, is_follow,
long_view, watch_ratio, plus `logged` (1 for an impression with all signals recorded, 0 for
an earlier watch, whose watch_ratio and follow are unknown and stored as NaN / 0). The user
sequences the generator trains on are the clicked items only (sequence_column = is_click).

Videos have no text: each item gets a numeric feature vector (see `item_feature_matrix`)
that the tokenizer quantises instead of a text embedding (tokenizer.encoder: features).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onerec.data.errors import BadRows, DataError
from onerec.data.readers import INT64_MAX, INT64_MIN, read_parquet, require_file, times_in_range
from onerec.data.schema import RawItems, RawLog

SIGNALS = ("is_click", "is_like", "is_follow", "long_view", "watch_ratio")
IMPRESSION_COLUMNS = ("user_id", "video_id", "time_ms", *SIGNALS)
# Per-video counts that describe popularity and engagement; log1p'd, then standardised.
COUNT_FEATURES = (
    "show_cnt", "play_cnt", "play_duration", "complete_play_cnt", "valid_play_cnt", "long_time_play_cnt",
    "short_time_play_cnt", "like_cnt", "comment_cnt", "follow_cnt", "share_cnt", "collect_cnt", "download_cnt",
)
AUTHOR_HASH_DIMS = 16  # a fixed random +-1 code per author, so one author's videos sit together


def _read(path: Path, columns: tuple[str, ...]) -> pa.Table:
    require_file(path, path.stem)
    table = read_parquet(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(path.name, 1, missing[0], f"column missing; expected at least {', '.join(columns)}")
    return table


def _numbers(table: pa.Table, column: str, file: str, bad: BadRows, keep: np.ndarray) -> np.ndarray:
    """A column as float64; a null or non-finite value is a bad row (row numbers are 1-based).
    A time column must also fit int64, and an integer one is returned exactly (as int64)."""
    data = table.column(column)
    values = data.cast(pa.float64()).to_numpy(zero_copy_only=False)
    null = data.is_null().to_numpy(zero_copy_only=False)
    usable = ~null & (times_in_range(values) if column == "time_ms" else np.isfinite(values))
    for row in np.flatnonzero(~usable & keep):  # one report per bad row, not per row
        if null[row]:
            reason = "missing id" if column in ("user_id", "video_id") else "missing value"
            bad.bad(reason, file, int(row) + 1, column, "expected a number, got null")
        elif column == "time_ms" and np.isfinite(values[row]):
            bad.bad("time out of range", file, int(row) + 1, column,
                    f"expected a time within int64 (|t| < 9.2e18), got {values[row]:g}")
        else:
            reason = "time out of range" if column == "time_ms" else "non-finite number"
            bad.bad(reason, file, int(row) + 1, column, f"expected a finite number, got {values[row]}")
        keep[row] = False
    if column == "time_ms" and pa.types.is_integer(data.type):  # exact, even beyond 2**53
        return pc.fill_null(data, 0).cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False)
    return values


def _as_list(value) -> list:
    return json.loads(value) if isinstance(value, str) else list(value or [])


def load_kuairand(root: Path, bad: BadRows) -> RawLog:
    parts = []
    for name in ("val.parquet", "test.parquet"):
        table = _read(root / name, IMPRESSION_COLUMNS)
        keep = np.ones(table.num_rows, dtype=bool)
        columns = {c: _numbers(table, c, name, bad, keep) for c in IMPRESSION_COLUMNS}
        rows = np.flatnonzero(keep)
        parts.append((name, rows, {c: v[rows] for c, v in columns.items()}))

    history_path = root / "user_sequences.parquet"
    users: list[str] = []
    items: list[str] = []
    order: list[int] = []
    lines: list[int] = []
    history = {s: [] for s in SIGNALS}
    if history_path.is_file():
        table = _read(history_path, ("user_id", "last_time_ms", "watch_seq"))
        data = table.select([c for c in ("user_id", "last_time_ms", "watch_seq", "like_seq", "long_watch_seq")
                             if c in table.column_names]).to_pylist()
        for row, record in enumerate(data, start=1):
            if record["user_id"] is None:
                bad.bad("missing id", history_path.name, row, "user_id", "expected a number, got null")
                continue
            try:
                watched = [int(v) for v in _as_list(record["watch_seq"])]
                liked = {int(v) for v in _as_list(record.get("like_seq"))}
                long_watched = {int(v) for v in _as_list(record.get("long_watch_seq"))}
            except (TypeError, ValueError) as err:
                bad.bad("malformed value", history_path.name, row, "watch_seq", f"expected a list of video ids ({err})")
                continue
            try:  # the watches get last_time_ms - k, which must stay finite and within int64
                last = record["last_time_ms"]
                usable = np.isfinite(float(last)) and INT64_MIN + len(watched) <= int(last) <= INT64_MAX
            except (TypeError, ValueError):
                usable = False
            if not usable:
                bad.bad("time out of range", history_path.name, row, "last_time_ms",
                        f"expected a finite time within int64 (|t| < 9.2e18), got {last}")
                continue
            last = int(last)
            # No timestamps: space the watches 1 ms apart, ending at the user's last_time_ms.
            for position, video in enumerate(watched):
                users.append(str(record["user_id"]))
                items.append(str(video))
                order.append(last - (len(watched) - 1 - position))
                lines.append(row)
                history["is_click"].append(1.0)
                history["is_like"].append(float(video in liked))
                history["is_follow"].append(0.0)
                history["long_view"].append(float(video in long_watched))
                history["watch_ratio"].append(np.nan)
    logged = [np.zeros(len(users), dtype=np.float32)]
    feedback = {s: [np.asarray(history[s], dtype=np.float32)] for s in SIGNALS}
    for name, rows, columns in parts:
        users += [str(int(u)) for u in columns["user_id"]]
        items += [str(int(v)) for v in columns["video_id"]]
        order += columns["time_ms"].astype(np.int64).tolist()
        lines += (rows + 1).tolist()
        logged.append(np.ones(len(rows), dtype=np.float32))
        for s in SIGNALS:
            feedback[s].append(columns[s].astype(np.float32))
    feedback_arrays = {s: np.concatenate(v) for s, v in feedback.items()}
    feedback_arrays["logged"] = np.concatenate(logged)
    return RawLog.from_lists(
        users,
        items,
        order,
        feedback_arrays,
        file="val.parquet+test.parquet",
        lines=lines,
        noun="row",
        has_time=True,
        item_table=load_item_table(root, bad),
        sequence_column="is_click",
        # 5,877 of the 228,329 impressions are logged twice (same user, video, ms and signals, same source
        # log); the published KuaiRand results were made with them, so they stay (counted in meta)
        keep_duplicate_rows=True,
    )


def load_item_table(root: Path, bad: BadRows) -> RawItems:
    path = root / "item_features.parquet"
    table = _read(path, ("video_id", "author_id", "tag", "video_duration"))
    rows = np.arange(1, table.num_rows + 1)
    null_id = table.column("video_id").is_null().to_numpy(zero_copy_only=False)
    if null_id.any():
        for row in np.flatnonzero(null_id):
            bad.bad("missing id", path.name, int(row) + 1, "video_id", "expected a number, got null")
        table, rows = table.filter(pa.array(~null_id)), rows[~null_id]
    ids = table.column("video_id").cast(pa.int64()).to_numpy(zero_copy_only=False)
    author = table.column("author_id").to_pylist()
    tag = [t or "" for t in table.column("tag").to_pylist()]
    titles = [f"video {int(v)} (author {a}, tag {t})" for v, a, t in zip(ids, author, tag)]
    return RawItems(
        ids=[str(int(v)) for v in ids],
        fields={"title": titles, "tag": tag, "author": [str(a) for a in author]},
        file=path.name,
        lines=rows.tolist(),
        features=item_feature_matrix(table),
    )


def item_feature_matrix(table: pa.Table) -> np.ndarray:
    """[items, F] float32: standardised log counts, engagement rates, duration, multi-hot tags,
    one-hot video and upload type, and a hashed author code. Missing numbers become the mean."""
    def column(name: str) -> np.ndarray:
        if name not in table.column_names:
            return np.full(table.num_rows, np.nan)
        return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)

    numeric = [np.log1p(np.clip(column(c), 0, None)) for c in (*COUNT_FEATURES, "video_duration")]
    plays = np.clip(column("play_cnt"), 1, None)
    for name in ("complete_play_cnt", "long_time_play_cnt", "like_cnt", "share_cnt"):
        numeric.append(column(name) / plays)
    numeric.append(column("play_progress"))
    dense = np.stack(numeric, axis=1)
    # standardise over the known values; a missing value (or a column the file lacks) becomes 0
    known = np.isfinite(dense)
    count = known.sum(axis=0).clip(min=1)
    mean = np.where(known, dense, 0.0).sum(axis=0) / count
    std = np.sqrt(np.where(known, (dense - mean) ** 2, 0.0).sum(axis=0) / count)
    dense = np.where(known, (dense - mean) / np.where(std > 0, std, 1.0), 0.0)

    blocks = [dense]
    tags = [[t for t in (value or "").split(",") if t] for value in table.column("tag").to_pylist()]
    vocabulary = sorted({t for row in tags for t in row}, key=lambda t: (len(t), t))
    position = {t: i for i, t in enumerate(vocabulary)}
    multi_hot = np.zeros((table.num_rows, len(vocabulary)))
    for row, row_tags in enumerate(tags):
        for t in row_tags:
            multi_hot[row, position[t]] = 1.0
    blocks.append(multi_hot)
    for name in ("video_type", "upload_type"):
        if name in table.column_names:
            values = [v or "" for v in table.column(name).to_pylist()]
            kinds = sorted(set(values))
            blocks.append(np.asarray([[v == k for k in kinds] for v in values], dtype=np.float64))
    authors = table.column("author_id").cast(pa.int64()).to_numpy(zero_copy_only=False)
    # A deterministic hash (not Python's salted hash): same author -> same +-1 code in every run.
    bits = (authors[:, None] * 2654435761 + np.arange(AUTHOR_HASH_DIMS)[None, :] * 40503) % 1000003 % 2
    blocks.append((2.0 * bits - 1.0) / np.sqrt(AUTHOR_HASH_DIMS))
    return np.concatenate(blocks, axis=1).astype(np.float32)
