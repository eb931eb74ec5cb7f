"""MovieLens-100K: RecBole atomic files (ml-100k.inter/.item) or GroupLens u.data/u.item.

Feedback column: rating (1-5). Item text fields: title, year, genres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onerec.data.errors import BadRows, DataError
from onerec.data.readers import check_one_time_kind, open_text, parse_number, parse_time, require_file, split_lines
from onerec.data.schema import RawItems, RawLog

GROUPLENS_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def load_movielens(root: Path, bad: BadRows) -> RawLog:
    if (root / "ml-100k.inter").is_file():
        return _load_atomic(root, bad)
    if (root / "u.data").is_file():
        return _load_grouplens(root, bad)
    raise FileNotFoundError(f"{root}: expected ml-100k.inter (RecBole atomic files) or u.data (GroupLens)")


def _interactions(path: Path, rows, columns: tuple[int, int, int, int], bad: BadRows) -> RawLog:
    user_col, item_col, rating_col, time_col = columns
    users, items, ratings, times, lines = [], [], [], [], []
    first_of_kind: dict[bool, int] = {}
    for number, fields in rows:
        rating = parse_number(fields[rating_col], bad, path.name, number, "rating")
        timestamp = parse_time(fields[time_col], bad, path.name, number, "timestamp")
        if rating is None or timestamp is None:
            continue
        user, item = fields[user_col].strip(), fields[item_col].strip()
        if not user or not item:
            bad.bad("missing id", path.name, number, "user_id" if not user else "item_id", "expected an id, got an empty value")
            continue
        users.append(user)
        items.append(item)
        ratings.append(rating)
        times.append(timestamp[0])
        first_of_kind.setdefault(timestamp[1], number)
        lines.append(number)
    check_one_time_kind(first_of_kind, path.name, "timestamp")
    return RawLog.from_lists(
        users, items, times, {"rating": np.asarray(ratings, dtype=np.float32)}, file=path.name, lines=lines, has_time=True,
    )


def _load_atomic(root: Path, bad: BadRows) -> RawLog:
    inter_path = require_file(root / "ml-100k.inter", "interactions")
    with open_text(inter_path) as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
    names = [h.split(":")[0] for h in header]
    try:
        columns = tuple(names.index(n) for n in ("user_id", "item_id", "rating", "timestamp"))
    except ValueError:
        raise DataError(inter_path.name, 1, "header", f"expected user_id, item_id, rating, timestamp; got {names}") from None
    log = _interactions(inter_path, split_lines(inter_path, "\t", len(names), bad, skip_header=True), columns, bad)
    item_path = root / "ml-100k.item"
    if item_path.is_file():
        require_file(item_path, "items")
        with open_text(item_path) as handle:
            header = handle.readline().rstrip("\r\n").split("\t")
        names = [h.split(":")[0] for h in header]
        col = {n: names.index(n) for n in ("item_id", "movie_title", "release_year", "class") if n in names}
        if "item_id" not in col:
            raise DataError(item_path.name, 1, "header", "no item_id column")
        ids, titles, years, genres, lines = [], [], [], [], []
        for number, fields in split_lines(item_path, "\t", len(names), bad, skip_header=True):
            if not fields[col["item_id"]].strip():
                bad.bad("missing id", item_path.name, number, "item_id", "expected an id, got an empty value")
                continue
            ids.append(fields[col["item_id"]].strip())
            titles.append(fields[col["movie_title"]] if "movie_title" in col else "")
            years.append(fields[col["release_year"]] if "release_year" in col else "")
            genres.append(fields[col["class"]] if "class" in col else "")
            lines.append(number)
        log.item_table = RawItems(ids, {"title": titles, "year": years, "genres": genres}, item_path.name, lines)
    return log


def _load_grouplens(root: Path, bad: BadRows) -> RawLog:
    data_path = require_file(root / "u.data", "interactions")
    log = _interactions(data_path, split_lines(data_path, "\t", 4, bad), (0, 1, 2, 3), bad)
    item_path = root / "u.item"
    if item_path.is_file():
        require_file(item_path, "items")
        ids, titles, years, genres, lines = [], [], [], [], []
        for number, fields in split_lines(item_path, "|", 5 + len(GROUPLENS_GENRES), bad, encoding="latin-1"):
            if not fields[0].strip():
                bad.bad("missing id", item_path.name, number, "movie id", "expected an id, got an empty value")
                continue
            title = fields[1].strip()
            year = title[-5:-1] if title.endswith(")") and title[-5:-1].isdigit() else fields[2][-4:]
            flags = fields[5 : 5 + len(GROUPLENS_GENRES)]
            ids.append(fields[0].strip())
            titles.append(title[:-7].strip() if title.endswith(f"({year})") else title)
            years.append(year)
            genres.append(" ".join(g for g, f in zip(GROUPLENS_GENRES, flags) if f.strip() == "1"))
            lines.append(number)
        log.item_table = RawItems(ids, {"title": titles, "year": years, "genres": genres}, item_path.name, lines)
    return log
