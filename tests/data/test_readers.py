"""Raw-format readers on the fixtures in tests/fixtures (written for this project)."""

from __future__ import annotations

import collections
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gcnee.config import ConfigError, load_config
from gcnee.data.errors import DataError
from gcnee.data.readers import (
    RawData,
    read_amazon,
    read_movielens_1m,
    read_raw,
)
from gcnee.data.readers_common import clean_title
from gcnee.data.readers_tabular import quoted_splitter

FIX = Path(__file__).parent.parent / "fixtures"
ML_COUNTS = [5, 6, 7, 8, 9, 10, 11, 12]  # interactions per user in the MovieLens/RecBole fixtures


def read(fmt: str, path: Path | str, *overrides: str, seed: int = 0) -> RawData:
    cfg = load_config(None, [f"data.format={fmt}", f"data.path={path}", *overrides])
    return read_raw(cfg.data, seed=seed)


def per_user(raw: RawData) -> list[int]:
    return sorted(collections.Counter(raw.interactions.user.tolist()).values())


def rows(raw: RawData) -> list[tuple]:
    i = raw.interactions
    return list(zip(i.user.tolist(), i.item.tolist(), i.rating.tolist(), i.timestamp.tolist()))


# ------------------------------------------------------------------------------------ MovieLens

def test_movielens_100k_counts_and_latin1_title():
    raw = read("movielens-100k", FIX / "ml-100k-grouplens")
    assert (len(raw.interactions), raw.users_before, raw.items_before) == (68, 8, 20)
    assert per_user(raw) == ML_COUNTS
    assert raw.interactions.user.dtype.kind == "U" and raw.interactions.timestamp.dtype == np.int64
    first = (FIX / "ml-100k-grouplens" / "u.data").read_text().split("\n")[0].split("\t")
    u, i, r, t = first
    assert rows(raw)[0] == (u, i, float(r), int(t))  # file order kept
    assert raw.items.titles["19"] == "Misérables, Les (1995)"  # 0xE9 byte in u.item
    assert raw.items.titles["20"] == "Nénette et Boni (1996)"
    assert len(raw.items) == 20 and "21" not in raw.items.titles  # unrated items left out
    assert raw.items_without_title == 0
    assert [(f.lines, f.bad) for f in raw.files] == [(68, 0), (22, 0)]


def test_movielens_1m_matches_100k_fixture():
    raw = read("movielens-1m", FIX / "ml-1m")
    ml100k = read("movielens-100k", FIX / "ml-100k-grouplens")
    assert per_user(raw) == ML_COUNTS
    assert raw.items.titles == ml100k.items.titles
    assert sorted(r[:3] for r in rows(raw)) == sorted(r[:3] for r in rows(ml100k))


def test_recbole_typed_headers_match_grouplens():
    raw = read("recbole", FIX / "recbole")
    grouplens = read("movielens-100k", FIX / "ml-100k-grouplens")
    assert rows(raw) == rows(grouplens)
    assert raw.items.titles["19"] == "Misérables, Les"  # RecBole keeps the year apart
    assert raw.items.extra["1"] == {"release_year": "1995",
                                    "class": ["Animation", "Children's", "Comedy"]}


def test_recbole_title_column_and_malformed_lines():
    raw = read("recbole", FIX / "recbole" / "malformed", "data.max_bad_fraction=1")
    inter, item = raw.files
    assert (inter.lines, inter.bad, inter.reasons, inter.first_bad) == (
        10, 2, {"field count": 1, "bad rating": 1}, [5, 8])
    assert (item.lines, item.bad, item.reasons, item.first_bad) == (
        23, 1, {"undecodable bytes": 1}, [24])
    assert len(raw.interactions) == 8 and raw.items.titles["19"] == "Misérables, Les"
    assert raw.interactions.timestamp.dtype == np.int64  # "881250949.0" -> int


def test_recbole_needs_typed_header_and_one_file_each(tmp_path):
    (tmp_path / "a.inter").write_text("user_id\titem_id\trating\n1\t2\t3\n")
    (tmp_path / "a.item").write_text("item_id:token\ttitle:token_seq\n2\tX\n")
    with pytest.raises(DataError, match="typed header"):
        read("recbole", tmp_path)
    shutil.copy(FIX / "recbole" / "ml-100k.inter", tmp_path / "b.inter")
    with pytest.raises(DataError, match=r"exactly one \*\.inter.*data\.interactions_file"):
        read("recbole", tmp_path)
    raw = read("recbole", tmp_path, "data.interactions_file=b.inter", "data.missing_title=id")
    assert len(raw.interactions) == 68 and raw.items_without_title == 19
    with pytest.raises(DataError, match="data.header"):
        read("recbole", FIX / "recbole", "data.header=false")


def test_movielens_malformed_counts_and_line_numbers():
    raw = read("movielens-100k", FIX / "ml-100k-grouplens",
               "data.interactions_file=u-malformed.data", "data.max_bad_fraction=0.5")
    f = raw.files[0]
    assert f.lines == 13  # 14 physical lines, one blank
    assert f.bad == 4 and f.first_bad == [3, 6, 9, 14]
    assert f.reasons == {"field count": 1, "bad rating": 1, "bad timestamp": 1,
                         "undecodable bytes": 1}
    assert raw.interactions_before == 9

    raw = read("movielens-1m", FIX / "ml-1m", "data.interactions_file=ratings-malformed.dat",
               "data.max_bad_fraction=0.3")
    f = raw.files[0]
    assert (f.lines, f.bad, f.reasons, f.first_bad) == (
        10, 3, {"field count": 2, "bad rating": 1}, [2, 5, 8])


# ------------------------------------------------------------------------------------- Amazon

def test_amazon_2018_counts_titles_and_duplicates():
    raw = read("amazon", FIX / "amazon")
    assert (raw.users_before, raw.items_before, raw.interactions_before) == (8, 15, 69)
    # 9625990674 has an empty title, B00002SVP4 and B00002SWLG no metadata row
    assert raw.items_without_title == 3
    assert len(raw.interactions) == 55 and len(raw.items) == 12
    assert per_user(raw) == [4, 4, 6, 7, 8, 8, 9, 9]
    t = raw.items.titles
    assert t["7100027950"] == "Super Mario 64"  # whitespace junk
    assert t["7293000936"] == "Wipeout XL"  # HTML tags
    assert t["8176503290"] == "Spyro & Crash Bundle"  # entity
    assert t["6050036071"] == "Pokémon Crystal"
    assert t["B00000DMAX"] == "Tomb Raider II"  # first non-empty of duplicate rows
    assert "B00004SVYX" not in t  # metadata of unreviewed items is not kept
    assert not {"9625990674", "B00002SVP4", "B00002SWLG"} & set(raw.interactions.item)
    pairs = collections.Counter(zip(raw.interactions.user.tolist(),
                                    raw.interactions.item.tolist()))
    assert max(pairs.values()) == 2  # the duplicate review is kept


def test_amazon_gz_equals_plain_and_2014_literal():
    plain = read("amazon", FIX / "amazon")
    for folder in ("gz", "2014"):
        other = read("amazon", FIX / "amazon" / folder)
        assert rows(other) == rows(plain), folder
        assert other.items.titles == plain.items.titles, folder
    assert (FIX / "amazon" / "2014" / "meta_Video_Games.json").read_text().startswith("{'asin'")


def test_amazon_python_literal_reviews(tmp_path):
    lines = [json.loads(x) for x in (FIX / "amazon" / "Video_Games_5.json").open()]
    with gzip.open(tmp_path / "reviews.json.gz", "wt") as f:
        f.writelines(repr(d) + "\n" for d in lines)
    shutil.copy(FIX / "amazon" / "meta_Video_Games.json", tmp_path / "meta_x.json")
    assert rows(read("amazon", tmp_path)) == rows(read("amazon", FIX / "amazon"))


def test_amazon_missing_title_id():
    raw = read("amazon", FIX / "amazon", "data.missing_title=id")
    assert len(raw.interactions) == 69 and len(raw.items) == 15
    assert raw.items_without_title == 3
    assert raw.items.titles["B00002SVP4"] == "B00002SVP4"
    assert raw.items.titles["9625990674"] == "9625990674"


def test_amazon_malformed_lines_counted_then_limit():
    folder = FIX / "amazon" / "malformed"
    raw = read("amazon", folder, "data.max_bad_fraction=0.5")
    reviews, meta = raw.files
    assert reviews.lines == 13 and reviews.bad == 5
    assert reviews.reasons == {"bad json": 1, "missing field": 1, "bad rating": 1,
                               "not an object": 1, "undecodable bytes": 1}
    assert reviews.first_bad == [2, 4, 6, 8, 14]
    assert (meta.lines, meta.bad, meta.reasons, meta.first_bad) == (
        17, 1, {"missing field": 1}, [17])
    assert raw.interactions_before == 8

    with pytest.raises(DataError) as err:
        read("amazon", folder)  # default data.max_bad_fraction = 0.01
    msg = str(err.value)
    assert "Video_Games_malformed.json" in msg and "data.max_bad_fraction" in msg
    assert "5 of 13 lines" in msg and "bad json: 1" in msg and "2, 4, 6, 8, 14" in msg
    assert err.value.report.first_bad == [2, 4, 6, 8, 14]


def test_amazon_file_detection_errors(tmp_path):
    shutil.copy(FIX / "amazon" / "Video_Games_5.json", tmp_path / "a.json")
    with pytest.raises(DataError, match=r"no metadata file.*data\.items_file.*"
                                        r"data\.missing_title=id"):
        read("amazon", tmp_path)
    shutil.copy(FIX / "amazon" / "meta_Video_Games.json", tmp_path / "meta_a.json")
    shutil.copy(FIX / "amazon" / "gz" / "Video_Games_5.json.gz", tmp_path / "a.json.gz")
    with pytest.raises(DataError, match=r"a\.json, a\.json\.gz.*data\.interactions_file"):
        read("amazon", tmp_path)
    raw = read("amazon", tmp_path, "data.interactions_file=a.json.gz")
    assert len(raw.interactions) == 55


# -------------------------------------------------------------------------------- BookCrossing

def test_bookcrossing_counts_titles_and_repaired_book_line():
    raw = read("bookcrossing", FIX / "bookcrossing")
    ratings, books, users = raw.files
    assert (ratings.lines, ratings.bad, ratings.excluded) == (92, 0, {"implicit rating 0": 24})
    # the original's broken line 39: \" ends the title, the author lost its opening quote;
    # repaired (counted), not dropped
    assert (books.lines, books.bad, books.repaired) == (
        100, 0, {"backslash before a closing quote": 1})
    assert (users.lines, users.bad) == (9, 0)
    assert [f.header["header"] for f in raw.files] == [True, True, True]
    assert ratings.header["names"] == ["User-ID", "ISBN", "Book-Rating"]
    assert (raw.users_before, raw.items_before, raw.interactions_before) == (8, 33, 68)
    assert raw.items_without_title == 1  # 0440211727 (no row)
    assert len(raw.interactions) == 66 and per_user(raw) == [5, 5, 7, 8, 9, 9, 11, 12]
    t = raw.items.titles
    assert t["078946697X"] == ("DK Readers: Creating the X-Men, How It All Began "
                               "(Level 4: Proficient Readers)")
    assert t["2070423204"] == "L'Étranger"  # latin-1 byte 0xC9
    assert t["2253006327"] == "Le Café des Sept Pas"  # UTF-8 bytes in the file ("CafÃ©")
    assert t["0679781587"] == "Crime & Punishment"
    assert t["0375759778"] == "Prague : A Novel; Or, Four Friends"  # ';' inside quotes
    assert set(raw.interactions.rating.tolist()) <= set(range(1, 11))


def test_bookcrossing_keep_implicit():
    raw = read("bookcrossing", FIX / "bookcrossing", "data.keep_implicit=true")
    assert raw.interactions_before == 92 and raw.files[0].excluded == {}
    assert (raw.interactions.rating == 0).sum() == 24 - 1  # 1 implicit one of an untitled book


def test_bookcrossing_seeded_order():
    a = read("bookcrossing", FIX / "bookcrossing", seed=0)
    b = read("bookcrossing", FIX / "bookcrossing", seed=0)
    c = read("bookcrossing", FIX / "bookcrossing", seed=1)
    assert np.array_equal(a.interactions.timestamp, b.interactions.timestamp)
    assert not np.array_equal(a.interactions.timestamp, c.interactions.timestamp)
    for user in np.unique(a.interactions.user):  # order indices 0..n-1 per user
        ts = a.interactions.timestamp[a.interactions.user == user]
        assert sorted(ts.tolist()) == list(range(len(ts)))


def test_bookcrossing_order_ignores_file_order(tmp_path):
    lines = (FIX / "bookcrossing" / "BX-Book-Ratings.csv").read_bytes().split(b"\r\n")
    body = [x for x in lines[1:] if x]
    (tmp_path / "BX-Book-Ratings.csv").write_bytes(b"\r\n".join([lines[0], *body[::-1]]))
    shutil.copy(FIX / "bookcrossing" / "BX-Books.csv", tmp_path / "BX-Books.csv")
    shuffled = read("bookcrossing", tmp_path, "data.keep_implicit=true")
    original = read("bookcrossing", FIX / "bookcrossing", "data.keep_implicit=true")
    assert len(shuffled.files) == 2  # BX-Users.csv is optional
    assert sorted(rows(shuffled)) == sorted(rows(original))


def test_bookcrossing_malformed_ratings():
    raw = read("bookcrossing", FIX / "bookcrossing",
               "data.interactions_file=BX-Book-Ratings-malformed.csv", "data.max_bad_fraction=0.3")
    f = raw.files[0]
    assert (f.lines, f.bad, f.first_bad) == (14, 3, [4, 7, 11])
    assert f.reasons == {"field count": 1, "bad rating": 1, "bad quoting": 1}
    with pytest.raises(DataError, match="3 of 14 lines"):
        read("bookcrossing", FIX / "bookcrossing",
             "data.interactions_file=BX-Book-Ratings-malformed.csv")


def test_bad_fraction_boundary(tmp_path):
    # BX-Books.csv with line 39 cut short (an unclosed quote no reading repairs): 1 bad of 100
    # lines passes 0.01 (not more than) and stops 0.005
    for name in ("BX-Book-Ratings.csv", "BX-Users.csv"):
        shutil.copy(FIX / "bookcrossing" / name, tmp_path / name)
    lines = (FIX / "bookcrossing" / "BX-Books.csv").read_bytes().split(b"\r\n")
    lines[38] = b'"078946697X";"DK Readers: Creating the X-Men'
    (tmp_path / "BX-Books.csv").write_bytes(b"\r\n".join(lines))
    raw = read("bookcrossing", tmp_path, "data.max_bad_fraction=0.01")
    assert raw.files[1].reasons == {"bad quoting": 1}
    with pytest.raises(DataError, match="BX-Books.csv") as err:
        read("bookcrossing", tmp_path, "data.max_bad_fraction=0.005")
    assert err.value.report.first_bad == [39]


def test_quoted_splitter():
    split = quoted_splitter(";")
    assert split('"a";"b;c";"d"') == ["a", "b;c", "d"]
    assert split('"a";NULL') == ["a", "NULL"]
    assert split('"The \\"Best\\" Book";"x"') == ['The "Best" Book', "x"]
    assert split('"a";"b\\";c";"d"') == ["a", 'b";c', "d"]


def test_clean_title():
    assert clean_title("  A &amp; B\n\t C ") == "A & B C"
    assert clean_title("<b>Bold</b> title", strip_tags=True) == "Bold title"
    assert clean_title(None) == "" and clean_title("   ") == ""


# ------------------------------------------------------------------------------- bad input

def test_missing_folder_and_files_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.path.*nowhere"):
        read("movielens-100k", tmp_path / "nowhere")
    shutil.copy(FIX / "ml-100k-grouplens" / "u.data", tmp_path / "u.data")
    with pytest.raises(DataError, match=r"u\.item.*data\.items_file"):
        read("movielens-100k", tmp_path)
    with pytest.raises(DataError, match=r"data\.interactions_file.*nope\.data"):
        read("movielens-100k", FIX / "ml-100k-grouplens", "data.interactions_file=nope.data")
    with pytest.raises(DataError, match=r"data\.users_file.*BX-Users-x\.csv"):
        read("bookcrossing", FIX / "bookcrossing", "data.users_file=BX-Users-x.csv")
    with pytest.raises(DataError, match=r"data\.interactions_file.*ratings\.dat"):
        read_movielens_1m(tmp_path / "ratings.dat", FIX / "ml-1m" / "movies.dat")
    with pytest.raises(DataError, match=r"data\.items_file"):
        read_amazon(FIX / "amazon" / "Video_Games_5.json", tmp_path / "meta.json")


def test_bad_config_values():
    # checked when the config is loaded (gcnee.config.check_values), before any reading
    with pytest.raises(ConfigError, match="data.format must be one of amazon, bookcrossing"):
        read("netflix", FIX / "ml-1m")
    with pytest.raises(ConfigError, match="data.missing_title must be one of drop, id"):
        read("movielens-1m", FIX / "ml-1m", "data.missing_title=keep")
    with pytest.raises(DataError, match="data.encoding"):
        read("movielens-1m", FIX / "ml-1m", "data.encoding=klingon")


def test_all_titles_missing_with_drop(tmp_path):
    shutil.copy(FIX / "ml-1m" / "ratings.dat", tmp_path / "ratings.dat")
    (tmp_path / "movies.dat").write_text("999::Nothing Rated (2000)::Drama\n")
    with pytest.raises(DataError, match="missing_title"):
        read("movielens-1m", tmp_path)
    raw = read("movielens-1m", tmp_path, "data.missing_title=id")
    assert raw.items_without_title == 20 and raw.items.titles["7"] == "7"


def test_explicit_encoding_is_strict():
    # u.item is latin-1: read as strict UTF-8 the two accented titles are undecodable lines
    raw = read("movielens-100k", FIX / "ml-100k-grouplens", "data.encoding=utf-8",
               "data.max_bad_fraction=0.1", "data.missing_title=id")
    assert raw.files[1].reasons == {"undecodable bytes": 2}
    assert raw.items.titles["19"] == "19"


def test_header_option_skips_first_line(tmp_path):
    body = (FIX / "ml-1m" / "ratings.dat").read_text()
    (tmp_path / "ratings.dat").write_text("UserID::MovieID::Rating::Timestamp\n" + body)
    (tmp_path / "movies.dat").write_bytes(
        b"MovieID::Title::Genres\n" + (FIX / "ml-1m" / "movies.dat").read_bytes())
    raw = read("movielens-1m", tmp_path, "data.header=true")
    assert rows(raw) == rows(read("movielens-1m", FIX / "ml-1m"))
    assert raw.files[0].lines == 68
