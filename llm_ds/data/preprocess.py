"""Optional document cleaning, as the seed chapter describes it, with counts of what changed.

Order: NFKC normalisation, control and non-printing characters removed (emoji sequences kept:
zero-width joiners, variation selectors and tag characters stay), URLs replaced by a
placeholder, documents shorter than ``min_chars`` dropped, exact duplicates dropped by hash.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from llm_ds.config import DataConfig

# A URL ends before trailing sentence punctuation.
URL_RE = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]]", re.IGNORECASE)
_KEEP = {"\n", "\t", "\r", "\u200c", "\u200d"}  # whitespace, ZWNJ and ZWJ (emoji sequences)


def _is_removable(ch: str) -> bool:
    """Control (Cc), format (Cf) and surrogate (Cs) characters, except those emoji and text need."""
    if ch in _KEEP or "\U000e0020" <= ch <= "\U000e007f":  # tag characters build subdivision flags
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs")


@dataclass
class PreprocessStats:
    nfkc_changed: int = 0  # documents NFKC altered
    control_chars_removed: int = 0
    urls_replaced: int = 0
    too_short: int = 0  # documents dropped
    duplicates: int = 0  # documents dropped

    def summary(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in asdict(self).items())


class Preprocessor:
    """Applies the configured steps to a stream of documents, counting each one's effect."""

    def __init__(self, cfg: DataConfig):
        self.nfkc, self.strip_control = cfg.normalize_nfkc, cfg.strip_control
        self.url_placeholder, self.min_chars, self.dedup = cfg.replace_urls, cfg.min_chars, cfg.dedup
        self.stats = PreprocessStats()
        self._seen: set[bytes] = set()

    @property
    def is_identity(self) -> bool:
        return not (self.nfkc or self.strip_control or self.url_placeholder is not None or self.min_chars or self.dedup)

    def clean(self, text: str) -> str:
        """The text after normalisation, control-character removal and URL replacement."""
        if self.nfkc:
            normal = unicodedata.normalize("NFKC", text)
            self.stats.nfkc_changed += normal != text
            text = normal
        if self.strip_control:
            kept = "".join(ch for ch in text if not _is_removable(ch))
            self.stats.control_chars_removed += len(text) - len(kept)
            text = kept
        if self.url_placeholder is not None:
            text, n = URL_RE.subn(self.url_placeholder, text)
            self.stats.urls_replaced += n
        return text

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        for text in docs:
            text = self.clean(text)
            if len(text.strip()) < max(self.min_chars, 1):
                self.stats.too_short += bool(text.strip())
                continue
            if self.dedup:
                digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if digest in self._seen:
                    self.stats.duplicates += 1
                    continue
                self._seen.add(digest)
            yield text
