from llm_ds.config import DataConfig
from llm_ds.data.preprocess import Preprocessor


def run(docs, **options):
    pre = Preprocessor(DataConfig(**options))
    return list(pre(docs)), pre.stats


def test_no_options_changes_nothing():
    docs = ["ﬁne\x00 text at https://example.org", "ﬁne\x00 text at https://example.org"]
    out, stats = run(docs)
    assert out == docs and stats.duplicates == 0


def test_nfkc():
    out, stats = run(["ﬁne ｆｕｌｌ ①", "plain"], normalize_nfkc=True)
    assert out == ["fine full 1", "plain"] and stats.nfkc_changed == 1


def test_control_characters_go_emoji_stay():
    family, flag, heart = (
        "👨\u200d👩\u200d👧",
        "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
        "❤\ufe0f",
    )
    text = f"a\x00b\u200bc\x1b[0m\tend\n {family} {flag} {heart} 🙂"
    out, stats = run([text], strip_control=True)
    assert out == [f"abc[0m\tend\n {family} {flag} {heart} 🙂"]
    assert stats.control_chars_removed == 3


def test_urls_replaced_sentence_punctuation_kept():
    out, stats = run(["See https://x.org/a?b=1. Or www.python.org, or (http://a.b/c)."], replace_urls="<url>")
    assert out == ["See <url>. Or <url>, or (<url>)."] and stats.urls_replaced == 3


def test_min_chars_and_exact_duplicates():
    out, stats = run(["short", "long enough", "long enough", "  ", "another long one"], min_chars=8, dedup=True)
    assert out == ["long enough", "another long one"]
    assert stats.too_short == 1 and stats.duplicates == 1
