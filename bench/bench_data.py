"""Data pipeline benchmark: tokenize+pack throughput, padding waste, the cache, and the cache build's peak
memory against the corpus size.

    make bench-data        # writes bench/results/data.json and prints a table
    BENCH_CORPUS_MB=16,64 make bench-data   # other corpus sizes for the memory figures

Figures are medians of alternated repeats in one run; compare ratios, not absolute times.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine_info, spread

from llm_ds.config import BUNDLED_CORPUS, DataConfig
from llm_ds.data import cache
from llm_ds.data.pipeline import build_arrays, cache_key, cache_root, load_or_build_arrays
from llm_ds.data.sources import iter_documents
from llm_ds.model import build_tokenizer

OUT = Path(__file__).resolve().parent / "results" / "data.json"
REPEATS = int(os.environ.get("BENCH_REPEATS", 3))
PREPARE_AND_REPORT_PEAK = """
import sys
from llm_ds.cli import main
status = main()
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")), end="")
sys.exit(status)
"""
CORPUS_MB = sorted(int(mb) for mb in os.environ.get("BENCH_CORPUS_MB", "16,48,128").split(","))


def tokenize_throughput(tokenizer) -> dict:
    """Tokens per second of read + clean + split + tokenize + pack (no cache), num_proc 1 and 2 alternated."""
    runs: dict[int, list[float]] = {1: [], 2: []}
    n_tokens = 0
    for _ in range(REPEATS):
        for num_proc in (1, 2):
            cfg = DataConfig(num_proc=num_proc)
            start = time.perf_counter()
            arrays, _ = build_arrays(cfg, tokenizer, seed=0)
            elapsed = time.perf_counter() - start
            n_tokens = len(arrays["train"]) + len(arrays["val"])
            runs[num_proc].append(n_tokens / elapsed)
    return {
        "tokens": n_tokens,
        **{f"num_proc_{k}_tokens_per_s": spread(v) for k, v in runs.items()},
        "speedup_2_vs_1": statistics.median(runs[2]) / statistics.median(runs[1]),
    }


def padding_waste(tokenizer) -> dict:
    """The real-token fraction of the seed's padded batches (truncate and pad to max_length) versus packing."""
    docs = list(iter_documents([BUNDLED_CORPUS]))
    lengths = np.asarray([len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]])
    out = {"documents": len(docs), "median_doc_tokens": float(np.median(lengths)), "packed_real_token_fraction": 1.0}
    for max_length in (512, 1024):
        real = np.minimum(lengths, max_length)
        fraction = float(real.sum() / (len(docs) * max_length))
        out[f"padded_{max_length}_real_token_fraction"] = fraction
        out[f"padded_{max_length}_tokens_dropped_by_truncation"] = int((lengths - real).sum())
        out[f"packed_vs_padded_{max_length}_real_token_ratio"] = 1.0 / fraction
    return out


def cache_reuse(tokenizer) -> dict:
    """Time of a first (building) and second (cached, memory-mapped) load, and the cache's size."""
    builds, hits = [], []
    size = 0
    for _ in range(REPEATS):
        root = Path(tempfile.mkdtemp(prefix="llm-ds-bench-"))
        try:
            cfg = DataConfig(cache_dir=str(root))
            for bucket in (builds, hits):
                start = time.perf_counter()
                load_or_build_arrays(cfg, tokenizer, seed=0, is_builder=True)
                bucket.append(time.perf_counter() - start)
            size = cache.cache_size_bytes(cache_root(cfg), cache_key(cfg, tokenizer, 0))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "first_build_s": spread(builds),
        "cached_load_s": spread(hits),
        "cache_bytes": size,
        "corpus_bytes": BUNDLED_CORPUS.stat().st_size,
    }


def prepare_peak_rss(corpus: Path, cache_dir: Path) -> dict:
    """``llm-ds prepare`` of one JSON-lines corpus in a process of its own: its peak RSS and wall time.

    The peak is the process's own high-water mark (VmHWM), read as it ends: getrusage's maxrss would count
    this benchmark's memory, which the child holds between fork and exec."""
    cmd = [sys.executable, "-c", PREPARE_AND_REPORT_PEAK, "prepare",
           "--set", f"data.paths=[{corpus}]", "--set", f"data.cache_dir={cache_dir}"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llm-ds prepare failed:\n{proc.stdout}{proc.stderr}")
    peak_kib = int(proc.stdout.rsplit("VmHWM:", 1)[1].split()[0])
    return {
        "corpus_bytes": corpus.stat().st_size,
        "cache_bytes": sum(f.stat().st_size for f in cache_dir.rglob("*.bin")),
        "peak_rss_bytes": peak_kib * 1024,
        "seconds": time.perf_counter() - start,
    }


def peak_rss_against_corpus() -> dict:
    """The cache build's peak memory as the corpus grows (the bundled documents repeated, numbered): the
    tokens go to the cache files as they are made, so it should stay flat; holding them would add the
    cache's size and more."""
    docs = list(iter_documents([BUNDLED_CORPUS]))
    runs = []
    with tempfile.TemporaryDirectory(prefix="llm-ds-bench-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w") as f:
            i = 0
            for mb in CORPUS_MB:
                while f.tell() < mb * 1e6:
                    f.write(json.dumps({"text": f"[{i}] {docs[i % len(docs)]}"}) + "\n")
                    i += 1
                f.flush()
                runs.append(prepare_peak_rss(corpus, Path(tmp) / f"cache-{mb}"))
    return {
        "runs": runs,
        "rss_growth_bytes": runs[-1]["peak_rss_bytes"] - runs[0]["peak_rss_bytes"],
        "cache_growth_bytes": runs[-1]["cache_bytes"] - runs[0]["cache_bytes"],
    }


def main() -> None:
    import tokenizers
    import torch
    import transformers

    tokenizer = build_tokenizer(DataConfig().tokenizer)
    result = {
        "machine": machine_info(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "repeats": REPEATS,
        "tokenize_pack": tokenize_throughput(tokenizer),
        "padding": padding_waste(tokenizer),
        "cache": cache_reuse(tokenizer),
        "build_memory": peak_rss_against_corpus(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    t, p, c = result["tokenize_pack"], result["padding"], result["cache"]
    print(f"{'measure':<52}{'median':>14}")
    print(f"{'tokenize+pack tokens/s, num_proc 1':<52}{t['num_proc_1_tokens_per_s']['median']:>14,.0f}")
    print(f"{'tokenize+pack tokens/s, num_proc 2':<52}{t['num_proc_2_tokens_per_s']['median']:>14,.0f}")
    print(f"{'  speed-up 2 vs 1':<52}{t['speedup_2_vs_1']:>14.2f}")
    for n in (512, 1024):
        print(f"{f'real-token fraction, padded to {n} (seed)':<52}{p[f'padded_{n}_real_token_fraction']:>14.3f}")
    print(f"{'real-token fraction, packed':<52}{1.0:>14.3f}")
    print(f"{'  packed / padded-1024 real tokens per batch':<52}{p['packed_vs_padded_1024_real_token_ratio']:>14.2f}")
    print(f"{'cache: first build s':<52}{c['first_build_s']['median']:>14.2f}")
    print(f"{'cache: second (cached) load s':<52}{c['cached_load_s']['median']:>14.4f}")
    print(f"{'cache: size MB (corpus MB)':<52}{c['cache_bytes'] / 1e6:>8.2f} ({c['corpus_bytes'] / 1e6:.2f})")
    m = result["build_memory"]
    for run in m["runs"]:
        label = f"prepare peak RSS MB, corpus {run['corpus_bytes'] / 1e6:.0f} MB (cache {run['cache_bytes'] / 1e6:.0f})"
        print(f"{label:<52}{run['peak_rss_bytes'] / 1e6:>14.0f}")
    growth = f"{m['rss_growth_bytes'] / 1e6:.0f} / {m['cache_growth_bytes'] / 1e6:.0f}"
    print(f"{'  RSS growth MB / cache growth MB':<52}{growth:>14}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
