"""The data shipped under data/ are the files data/README.md describes, byte for byte."""

import hashlib
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
ROW = re.compile(r"^\| (?P<path>[\w./-]+) \|.*\| (?P<sha256>[0-9a-f]{64}) \|$")


def listed_hashes() -> dict[str, str]:
    rows = (ROW.match(line) for line in (DATA / "README.md").read_text().splitlines())
    return {row["path"]: row["sha256"] for row in rows if row}


def test_readme_lists_every_shipped_file():
    shipped = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and p.name != "README.md"}
    assert shipped == set(listed_hashes())


@pytest.mark.parametrize("path, sha256", sorted(listed_hashes().items()))
def test_file_matches_its_sha256(path, sha256):
    assert hashlib.sha256((DATA / path).read_bytes()).hexdigest() == sha256
