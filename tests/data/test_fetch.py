"""The ml-100k fetcher: extraction and checksums on a fake wheel; one real fetch marked slow."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from gcnee.data import fetch
from gcnee.data.errors import DataError

FAKE = {
    "ml-100k.inter": b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t5\t9\n",
    "ml-100k.item": b"item_id:token\tmovie_title:token_seq\n2\tHeat\n",
    "ml-100k.user": b"user_id:token\tage:token\n1\t30\n",
}


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole/__init__.py", b"")
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", b"not wanted")
        for name, data in files.items():
            zf.writestr(fetch.MEMBER_DIR + name, data)
    return path


@pytest.fixture
def fake_pypi(monkeypatch, tmp_path):
    """Pins the fake files' checksums and replaces the download; counts the downloads."""
    monkeypatch.setattr(fetch, "CHECKSUMS",
                        {n: hashlib.sha256(d).hexdigest() for n, d in FAKE.items()})
    calls = []

    def download(tmp: Path) -> Path:
        calls.append(tmp)
        return make_wheel(tmp / "recbole-1.2.1-py3-none-any.whl", FAKE)

    monkeypatch.setattr(fetch, "_download_wheel", download)
    return calls


def test_fetch_extracts_only_data_files_and_is_idempotent(fake_pypi, tmp_path):
    dest = tmp_path / "data" / "ml-100k"
    assert fetch.fetch_ml100k(dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(FAKE)
    for name, data in FAKE.items():
        assert (dest / name).read_bytes() == data
    assert len(fake_pypi) == 1
    fetch.fetch_ml100k(dest)
    assert len(fake_pypi) == 1  # present with good checksums: no download


def test_fetch_replaces_a_corrupted_file(fake_pypi, tmp_path):
    dest = tmp_path / "ml"
    fetch.fetch_ml100k(dest)
    (dest / "ml-100k.item").write_bytes(b"tampered")
    fetch.fetch_ml100k(dest)
    assert len(fake_pypi) == 2
    assert (dest / "ml-100k.item").read_bytes() == FAKE["ml-100k.item"]


def test_checksum_mismatch_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "CHECKSUMS", {n: "0" * 64 for n in FAKE})
    wheel = make_wheel(tmp_path / "w.whl", FAKE)
    with pytest.raises(DataError, match="checksum mismatch.*data.path"):
        fetch.extract_ml100k(wheel, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_wheel_without_the_files(monkeypatch, tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", {})
    with pytest.raises(DataError, match="has no recbole/dataset_example/ml-100k/ml-100k.inter"):
        fetch.extract_ml100k(wheel, tmp_path / "out")


def test_download_failure_says_what_was_tried(monkeypatch, tmp_path):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found"

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DataError) as err:
        fetch.fetch_ml100k(tmp_path / "ml")
    msg = str(err.value)
    assert "pip download recbole==1.2.1 --no-deps" in msg
    assert "No matching distribution" in msg
    assert "data.path" in msg and "u.data/u.item" in msg and "movielens-100k" in msg


@pytest.mark.slow
def test_real_fetch_from_pypi(tmp_path):
    dest = fetch.fetch_ml100k(tmp_path / "ml-100k")
    assert sorted(p.name for p in dest.iterdir()) == sorted(fetch.CHECKSUMS)
    lines = (dest / "ml-100k.inter").read_text().splitlines()
    assert len(lines) == 100_001  # header + 100k ratings
