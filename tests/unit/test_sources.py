import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_ds.config import BUNDLED_CORPUS, SourceConfig
from llm_ds.data.sources import DataError, ReadStats, expand_paths, iter_documents, iter_source, mix_sources

DOCS = ["First document, with a comma.", "Second one\nspans two lines.", "Third: ünïcode and emoji 🙂."]


def write_all_formats(folder, docs=DOCS, field="text"):
    (folder / "a.jsonl").write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    (folder / "b.json").write_text(json.dumps([{field: d} for d in docs]))
    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), folder / "c.parquet")
    import csv

    with open(folder / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", field])
        w.writeheader()
        w.writerows({"id": i, field: d} for i, d in enumerate(docs))
    for i, d in enumerate(docs):
        (folder / f"e{i}.txt").write_text(d)


def test_bundled_corpus_is_a_few_mb_of_documents():
    docs = list(iter_documents([BUNDLED_CORPUS]))
    assert len(docs) > 1000
    assert 2_000_000 < sum(map(len, docs)) < 10_000_000


@pytest.mark.parametrize("pattern", ["a.jsonl", "b.json", "c.parquet", "d.csv", "e*.txt"])
def test_every_local_format_gives_the_same_documents(tmp_path, pattern):
    write_all_formats(tmp_path, field="body")
    stats = ReadStats()
    docs = list(iter_source(SourceConfig(path=str(tmp_path / pattern)), "body", stats))
    assert docs == DOCS
    assert stats.documents == 3 and stats.bad_utf8_chars == 0


def test_directory_source_reads_every_known_file(tmp_path):
    write_all_formats(tmp_path)
    assert len(list(iter_source(SourceConfig(path=str(tmp_path)), "text", ReadStats()))) == 5 * 3


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"content": "no text field"}\n', r"bad.jsonl:2: no field 'text'"),
        ("bad2.jsonl", '{"text": "ok"}\nnot json\n', r"bad2.jsonl:2: not a JSON object"),
        ("bad.csv", "id,content\n1,hello\n", r"bad.csv:1: no column 'text' in the header \(id, content\)"),
        ("bad.xml", "<doc/>", r"bad.xml: unknown format '.xml'; set `format` on the source"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=expected):
        list(iter_source(SourceConfig(path=str(tmp_path / name)), "text", ReadStats()))


def test_parquet_without_the_column(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: content\)"):
        list(iter_source(SourceConfig(path=str(tmp_path / "p.parquet")), "text", ReadStats()))


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(DataError, match=r"'.*nothing.txt': no such file or directory"):
        expand_paths([str(tmp_path / "nothing.txt")])
    with pytest.raises(DataError, match=r"'.*\*.parquet': the glob matches no file"):
        expand_paths([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"the directory holds no"):
        expand_paths([str(tmp_path / "empty")])


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, na\xefve".encode("latin-1"))
    (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "ok \xff\xfe here"}\n')
    stats = ReadStats()
    docs = list(iter_documents(expand_paths([str(tmp_path)]), "text", stats))
    assert "caf\ufffd au lait, na\ufffdve" in docs
    assert "ok \ufffd\ufffd here" in docs
    assert stats.bad_utf8_chars == 4


def go_offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE for this test, also where huggingface_hub and datasets were imported before it (they read
    it once, at import): otherwise they try the network and, behind a proxy that answers, back off for a while."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_hub_dataset_offline_says_so_and_how_to_use_local_files(monkeypatch):
    go_offline(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = SourceConfig(hub="wikipedia", config="20220301.en")
    with pytest.raises(DataError) as err:
        list(iter_source(source, "text", ReadStats()))
    msg = str(err.value)
    assert "hub:wikipedia/20220301.en[train]" in msg and "offline" in msg and "data.sources: [{path:" in msg


def test_hub_loader_reads_a_local_dataset_folder(tmp_path, monkeypatch):
    go_offline(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "mydataset" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": DOCS}), folder / "train-00000-of-00001.parquet")
    for streaming in (False, True):
        stats = ReadStats()
        docs = list(iter_source(SourceConfig(hub=str(tmp_path / "mydataset")), "text", stats, streaming=streaming))
        assert docs == DOCS and stats.documents == 3
    with pytest.raises(DataError, match=r"no column 'body'"):
        list(iter_source(SourceConfig(hub=str(tmp_path / "mydataset"), text_field="body"), "text", ReadStats()))


def test_concat_keeps_source_order():
    assert list(mix_sources([iter("ab"), iter("cd")], [1, 1], "concat", seed=0)) == list("abcd")


def test_interleave_is_reproducible_and_follows_weights():
    def mixed(seed):
        sources = [iter([f"a{i}" for i in range(20000)]), iter([f"b{i}" for i in range(20000)])]
        return list(mix_sources(sources, [3.0, 1.0], "interleave", seed))

    first = mixed(1)
    assert first == mixed(1)
    assert first != mixed(2)
    share_a = np.mean([d.startswith("a") for d in first])
    assert share_a == pytest.approx(0.75, abs=0.02)
    # Within each source the order is kept; it stops when the first source runs out.
    a_docs = [d for d in first if d.startswith("a")]
    assert a_docs == [f"a{i}" for i in range(len(a_docs))]
    assert len(a_docs) == 20000
