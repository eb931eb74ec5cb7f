"""Where a generic log's files are: one file, a directory or glob of shards, or a URL.

A file option (data.interactions_file, data.items_file) names, relative to data.root unless it
is absolute or a URL:
    a file            log.parquet, log.csv, log.csv.gz, log.csv.zst
    a directory       every data file under it (recursively), in name order; files starting
                      with "_" or "." (Spark's _SUCCESS, checksums) are not data
    a glob            shards/part-*.parquet
    a URL             any fsspec filesystem: s3://, gs://, hf://, https://, file://, memory://
                      (s3 and gs need their fsspec package: s3fs, gcsfs)
Shards are read in name order, one after the other; without a time column that order is the
time order. The kind of each file comes from its name (.parquet / .pq, or .csv / .tsv / .txt
with an optional .gz / .zst / .bz2), else from data.format.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import IO

import fsspec
import pyarrow as pa

from onerec.data.errors import DataError
from onerec.errors import ConfigError, MissingInputError

COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: its filesystem, path there, name in messages, kind and codec."""

    fs: fsspec.AbstractFileSystem
    path: str
    name: str
    kind: str  # "csv" | "parquet"
    compression: str | None = None

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def open_binary(self) -> IO[bytes]:
        """The file's bytes, decompressed, as a Python binary stream."""
        raw = self.fs.open(self.path, "rb")
        if self.compression is None:
            return raw
        return io.BufferedReader(_RawAdapter(pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), self.compression)))

    def open_arrow(self):
        """The file's bytes, decompressed, as an Arrow input stream (for pyarrow's CSV reader)."""
        if self.is_local:
            return pa.input_stream(self.path, compression=self.compression)
        return pa.input_stream(pa.PythonFile(self.fs.open(self.path, "rb"), mode="r"), compression=self.compression)

    def open_text(self, encoding: str = "utf-8-sig") -> IO[str]:
        """The file as text, for the line-by-line reader (newline="" as the csv module wants)."""
        return io.TextIOWrapper(self.open_binary(), encoding=encoding, newline="")

    def size(self) -> int:
        return int(self.fs.size(self.path) or 0)


class _RawAdapter(io.RawIOBase):
    """An Arrow input stream (a decompressor) as a Python raw stream, for TextIOWrapper."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def is_url(location: str) -> bool:
    return "://" in location


def location_of(option: str, root: str) -> str:
    """A file option as a path or URL: as given when absolute or a URL, else under data.root."""
    if not root or is_url(option) or option.startswith("/"):
        return option
    if is_url(root):
        return root.rstrip("/") + "/" + option
    return posixpath.join(root, option)


def _kind_and_codec(path: str, default_kind: str) -> tuple[str, str | None]:
    name = posixpath.basename(path).lower()
    codec = None
    for suffix, name_codec in COMPRESSION.items():
        if name.endswith(suffix):
            codec, name = name_codec, name[: -len(suffix)]
            break
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet", codec
    if name.endswith(TEXT_SUFFIXES):
        return "csv", codec
    return default_kind, codec


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    if name.startswith(("_", ".")):
        return False
    bare = name.lower()
    for suffix in COMPRESSION:
        bare = bare.removesuffix(suffix)
    return bare.endswith(PARQUET_SUFFIXES + TEXT_SUFFIXES)


def _filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(location)
    except ImportError as err:  # e.g. s3:// without s3fs
        raise ConfigError(f"{location}: {err}") from None
    except ValueError as err:  # an unknown protocol
        raise ConfigError(f"{location}: {err}") from None


def resolve_files(option: str, root: str, what: str, default_kind: str) -> list[SourceFile]:
    """The files a file option names (see the module docstring), in read order. Names in
    messages are relative to data.root where the files are under it."""
    location = location_of(option, root)
    fs, path = _filesystem(location)
    if any(c in path for c in GLOB_CHARACTERS):
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not paths:
            raise MissingInputError(f"{location}: no {what} matches this pattern")
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if _is_data_file(p))
        if not paths:
            raise MissingInputError(f"{location}: the {what} directory holds no .parquet or .csv files")
    elif fs.isfile(path):
        paths = [path]
    else:
        raise MissingInputError(f"{location}: {what} not found")
    base = _filesystem(root)[1].rstrip("/") + "/" if root else ""
    files = []
    for p in paths:
        name = p[len(base):] if base and p.startswith(base) else (p if not is_url(location) else f"{location.split('://')[0]}://{p}")
        kind, codec = _kind_and_codec(p, default_kind)
        files.append(SourceFile(fs, p, name, kind, codec))
    for file in files:
        if file.size() == 0:
            raise DataError(file.name, 1, "*", "the file is empty")
    return files
