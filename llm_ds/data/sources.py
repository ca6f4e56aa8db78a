"""Local text sources: files, directories and globs of .txt, .jsonl and .json."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Input data that cannot be used; the message is one line naming the file and the fix."""


def expand_paths(patterns: list[str]) -> list[Path]:
    """Resolve files, directories (their readable files, recursively) and globs, sorted, deduplicated."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"data.paths: the glob {pattern!r} matches no file")
            files.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
            if not matches:
                raise DataError(
                    f"data.paths: the directory {pattern!r} holds no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} file"
                )
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data.paths: {pattern!r}: no such file or directory")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Yield documents in a fixed order: a whole text file, or one JSON line's ``text_field``.

    Bytes that are not UTF-8 are replaced (U+FFFD) rather than failing the run.
    """
    for path in files:
        if path.suffix in JSON_SUFFIXES:
            yield from _iter_json_lines(path, text_field)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text


def _iter_json_lines(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not a JSON object (one document per line expected)") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{lineno}: no field {text_field!r} (set data.text_field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text")
            if text.strip():
                yield text
