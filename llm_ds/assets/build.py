"""Rebuild the bundled corpus and tokenizer.

The corpus is the prose of the Python 3.11 documentation (reStructuredText sources as shipped
in Debian's ``python3.11-doc`` package, PSF licence). The tokenizer is a byte-level BPE trained
on that corpus, saved so that ``AutoTokenizer.from_pretrained(path)`` loads it.

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python -m llm_ds.assets.build --sources /tmp/pydoc/usr/share/doc/python3.11/html/_sources
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
CORPUS_PATH = ASSETS_DIR / "corpus" / "python-docs.jsonl"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
EOS_TOKEN = "<|endoftext|>"

# The mostly-prose parts of the documentation; the library reference is mostly API listings.
SECTIONS = ("tutorial", "howto", "faq", "whatsnew", "reference", "using", "extending")
# A document is one section of a page: a title line underlined with "=" or "-" starts the next.
_SECTION_START = re.compile(r"\n(?=[^\n]+\n[=\-]{3,}\n)")
_MIN_DOC_CHARS = 400


def split_sections(text: str) -> list[str]:
    """Split a page at its section titles, merging sections shorter than ``_MIN_DOC_CHARS`` forward."""
    docs: list[str] = []
    pending = ""
    for part in _SECTION_START.split(text):
        pending = f"{pending}\n{part}" if pending else part
        if len(pending) >= _MIN_DOC_CHARS:
            docs.append(pending.strip())
            pending = ""
    if pending.strip():
        if docs:
            docs[-1] = f"{docs[-1]}\n{pending.strip()}"
        else:
            docs.append(pending.strip())
    return docs


def build_corpus(sources_dir: Path, out_path: Path = CORPUS_PATH) -> int:
    """Write one JSON line per documentation section: ``{"text": ..., "source": "page.rst.txt#N"}``.

    Returns:
        The number of documents written.
    """
    files = sorted(p for s in SECTIONS for p in (sources_dir / s).rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no *.rst.txt files under {sources_dir}/{{{','.join(SECTIONS)}}}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_docs = 0
    with open(out_path, "w", encoding="utf-8") as out:
        for path in files:
            page = path.read_text(encoding="utf-8", errors="replace").strip()
            for i, text in enumerate(split_sections(page) if page else []):
                source = f"{path.relative_to(sources_dir)}#{i}"
                out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                n_docs += 1
    return n_docs


def train_tokenizer(corpus_path: Path = CORPUS_PATH, out_dir: Path = TOKENIZER_DIR, vocab_size: int = 8192) -> None:
    """Train a GPT-2-style byte-level BPE on the corpus and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus_path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    fast.model_max_length = 1 << 30  # packing cuts blocks; the tokenizer itself never truncates
    fast.save_pretrained(str(out_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=Path, required=True, help="the html/_sources folder of python3.11-doc")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    n = build_corpus(args.sources)
    train_tokenizer(vocab_size=args.vocab_size)
    print(f"wrote {n} documents to {CORPUS_PATH} and a {args.vocab_size}-token tokenizer to {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
