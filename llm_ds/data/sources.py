"""Text sources: local files (txt, json/jsonl, parquet, csv) and Hugging Face datasets, and their mixing.

Every reader yields documents (strings) in a fixed order. Bytes that are not UTF-8 are replaced
with U+FFFD and counted in ``ReadStats``, never fatal.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_ds.config import SourceConfig, UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
SUFFIX_FORMATS = {
    ".txt": "txt",
    ".md": "txt",
    ".rst": "txt",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
OFFLINE_HINT = (
    "to train from local files instead, set data.sources: [{path: /data/*.jsonl, text_field: text}] "
    "(or hub: a local dataset folder)"
)


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message is one line naming the file and the fix."""


@dataclass
class ReadStats:
    documents: int = 0
    bad_utf8_chars: int = 0  # undecodable bytes replaced by U+FFFD

    def decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            self.bad_utf8_chars += text.count("\ufffd") - raw.count("\ufffd".encode())
            return text


def expand_paths(patterns: list[str]) -> list[Path]:
    """Resolve files, directories (their readable files, recursively) and globs, sorted, deduplicated."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"data source {pattern!r}: the glob matches no file")
            files.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIX_FORMATS)
            if not matches:
                raise DataError(
                    f"data source {pattern!r}: the directory holds no {'/'.join(sorted(SUFFIX_FORMATS))} file"
                )
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data source {pattern!r}: no such file or directory")
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def source_files(source: SourceConfig) -> list[Path]:
    """The local files a source reads (none for a hub dataset)."""
    return expand_paths([source.path]) if source.path else []


def file_format(path: Path, declared: str | None) -> str:
    fmt = declared or SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown format {path.suffix!r}; set `format` on the source (txt, json, jsonl, parquet, csv)"
        )
    return fmt


def iter_documents(
    files: list[Path], text_field: str = "text", stats: ReadStats | None = None, fmt: str | None = None
) -> Iterator[str]:
    """Yield the non-empty documents of local files in order: a whole text file, or one record's ``text_field``."""
    stats = stats if stats is not None else ReadStats()
    readers = {
        "txt": _iter_text_file,
        "jsonl": _iter_json_lines,
        "json": _iter_json,
        "parquet": _iter_parquet,
        "csv": _iter_csv,
    }
    for path in files:
        for text in readers[file_format(path, fmt)](path, text_field, stats):
            if text.strip():
                stats.documents += 1
                yield text


def iter_source(source: SourceConfig, text_field: str, stats: ReadStats, streaming: bool = False) -> Iterator[str]:
    """The documents of one configured source."""
    field = source.text_field or text_field
    if source.hub:
        yield from _iter_hub(source, field, stats, streaming)
    else:
        yield from iter_documents(source_files(source), field, stats, source.format)


def mix_sources(iterators: list[Iterator[str]], weights: list[float], mode: str, seed: int) -> Iterator[str]:
    """Concatenate sources in order, or interleave them drawing each document's source by weight.

    Interleaving is reproducible from ``seed`` and stops when the first source runs out (as
    ``datasets.interleave_datasets``' default), so the mixture keeps its proportions.
    """
    if mode == "concat" or len(iterators) == 1:
        for it in iterators:
            yield from it
        return
    p = np.asarray(weights, dtype=np.float64)
    p /= p.sum()
    rng = np.random.default_rng([seed, 1])
    while True:
        try:
            yield next(iterators[rng.choice(len(iterators), p=p)])
        except StopIteration:
            return


def _iter_text_file(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    yield stats.decode(path.read_bytes())


def _record_text(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{where}: no field {text_field!r} (set text_field on the source or data.text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def _iter_json_lines(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = stats.decode(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not a JSON object (one document per line expected)") from None
            yield _record_text(record, text_field, f"{path}:{lineno}")


def _iter_json(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """A ``.json`` file: a JSON array of records, or JSON lines (as ``datasets`` accepts both)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head.startswith(b"["):
        yield from _iter_json_lines(path, text_field, stats)
        return
    try:
        records = json.loads(stats.decode(path.read_bytes()))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    for i, record in enumerate(records):
        yield _record_text(record, text_field, f"{path}: record {i}")


def _iter_parquet(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            f"set text_field on the source or data.text_field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _iter_csv(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:  # line by line: a newline byte is never inside a UTF-8 character
        reader = csv.DictReader(stats.decode(raw) for raw in f)
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise DataError(
                f"{path}:1: no column {text_field!r} in the header "
                f"({', '.join(reader.fieldnames or [])}); set text_field on the source or data.text_field"
            )
        for row in reader:
            if row[text_field] is None:
                raise DataError(f"{path}:{reader.line_num}: the row has no {text_field!r} value")
            yield row[text_field]


def _iter_hub(source: SourceConfig, text_field: str, stats: ReadStats, streaming: bool) -> Iterator[str]:
    import datasets

    name = source.describe()
    try:
        ds = datasets.load_dataset(
            source.hub, source.config, split=source.split, revision=source.revision, streaming=streaming
        )
    except Exception as exc:
        offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = (
            "the hub is offline (HF_HUB_OFFLINE=1)"
            if offline
            else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
        raise DataError(f"data source {name}: could not be loaded ({why}); {OFFLINE_HINT}") from None
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise DataError(
            f"data source {name}: no column {text_field!r} (columns: {', '.join(columns)}); "
            f"set text_field on the source or data.text_field"
        )
    for i, example in enumerate(ds):
        text = _record_text(example, text_field, f"data source {name}: example {i}")
        if text.strip():
            stats.documents += 1
            yield text


def hub_commit(source: SourceConfig) -> str | None:
    """The commit a hub dataset name's revision stands for: asked of the hub, or, offline, the one the local
    hub cache holds for it (where ``datasets`` would read it offline); None where neither knows."""
    if source.revision and len(source.revision) == 40 and all(c in "0123456789abcdef" for c in source.revision):
        return source.revision  # a commit already
    from huggingface_hub import HfApi, constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().dataset_info(source.hub, revision=source.revision).sha
        except Exception:  # unreachable, unknown or private: the local cache may still know it
            pass
    try:
        folder = snapshot_download(source.hub, repo_type="dataset", revision=source.revision, local_files_only=True)
    except Exception:
        return None
    return Path(folder).name


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
