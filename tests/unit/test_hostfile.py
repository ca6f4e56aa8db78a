import pytest

from launcher.hostfile import Host, HostfileError, parse_hostfile, parse_hostfile_text
from llm_ds.config import PACKAGE_DIR

HOSTFILES = sorted((PACKAGE_DIR.parent / "hostfiles").iterdir())


@pytest.mark.parametrize("path", HOSTFILES, ids=lambda p: p.name)
def test_shipped_hostfiles_parse(path):
    assert all(h.slots > 0 for h in parse_hostfile(path))


def test_comments_and_blank_lines():
    text = "# nodes\n\nnode-1 slots=4  # first\n10.0.0.2 slots=8\n"
    assert parse_hostfile_text(text) == [Host("node-1", 4), Host("10.0.0.2", 8)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node-1 slots=0\n", "hostfile:1: slots=0 for node-1"),
        ("node-1 slots=x\n", "hostfile:1: slots=x"),
        ("node-1\n", "hostfile:1: expected '<host> slots=<n>'"),
        ("a slots=1\nb slots=1\na slots=2\n", "hostfile:3: host 'a' already listed on line 1"),
        ("$(reboot) slots=1\n", "is not a DNS name or IP address"),
        ("# only comments\n", "no hosts"),
    ],
)
def test_bad_hostfiles(text, expected):
    with pytest.raises(HostfileError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        parse_hostfile_text(text)
