"""Real-file shapes (issue #18): headers detected per file, BookCrossing's escaped quotes in
the original dump and in re-exports, Amazon reviews without metadata, imbalanced labels.

Fixtures (written for the project): ``tests/fixtures/bookcrossing-headerless`` (a ratings and
a users file starting directly with data, a headed books file), ``bookcrossing-dump`` (quotes
escaped ``\\"`` as the original dump writes them), ``bookcrossing-reexport`` (the same books as
re-exports write them), ``amazon/no-meta`` (reviews only), ``ml-1m-positive`` (95 % positive).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

from gcnee.config import ConfigError, load_config
from gcnee.data.errors import DataError, DataWarning
from gcnee.data.readers import read_raw
from gcnee.data.stage import format_summary, prepare

FIX = Path(__file__).parent.parent / "fixtures"
RATINGS = 21  # lines of the BookCrossing fixtures' ratings (3 of them implicit 0)


def cfg(fmt: str, path: Path | str, *overrides: str):
    return load_config(None, [f"data.format={fmt}", f"data.path={path}", *overrides])


def read(fmt: str, path: Path | str, *overrides: str):
    return read_raw(cfg(fmt, path, *overrides).data)


# ------------------------------------------------------------------------------ header lines

def test_headerless_bookcrossing_ratings_keep_every_row():
    folder = FIX / "bookcrossing-headerless"
    first = (folder / "BX-Book-Ratings.csv").read_text().splitlines()[0]
    assert first == '"43842";"0739432540";"0"'  # the shape of the report
    raw = read("bookcrossing", folder, "data.keep_implicit=true")
    ratings, books, users = raw.files
    assert ratings.lines == RATINGS and ratings.bad == 0  # the first row is data, not a header
    assert ratings.header == {"header": False, "how": "detected: the first line is a data row"}
    assert len(raw.interactions) == RATINGS
    assert ("43842", "0739432540", 0.0) in set(zip(raw.interactions.user.tolist(),
                                                   raw.interactions.item.tolist(),
                                                   raw.interactions.rating.tolist()))
    # decided per file: the books file in the same folder has its header, the users file none
    assert books.header["header"] is True and books.header["names"][:2] == ["ISBN", "Book-Title"]
    assert (users.lines, users.bad, users.header["header"]) == (4, 0, False)


def test_headed_bookcrossing_ratings_keep_the_header_out():
    raw = read("bookcrossing", FIX / "bookcrossing-dump", "data.keep_implicit=true")
    ratings = raw.files[0]
    assert ratings.lines == RATINGS and ratings.bad == 0
    assert ratings.header == {"header": True, "how": "detected",
                              "names": ["User-ID", "ISBN", "Book-Rating"]}
    assert "User-ID" not in set(raw.interactions.user.tolist())
    assert len(raw.interactions) == RATINGS


def test_header_names_that_do_not_fit_are_reported_by_name(tmp_path):
    shutil.copy(FIX / "bookcrossing-dump" / "BX-Books.csv", tmp_path / "BX-Books.csv")
    body = (FIX / "bookcrossing-headerless" / "BX-Book-Ratings.csv").read_text()
    (tmp_path / "BX-Book-Ratings.csv").write_text('"uid";"book";"score"\n' + body)
    with pytest.raises(DataError) as err:
        read("bookcrossing", tmp_path)
    msg = str(err.value)
    assert "['uid', 'book', 'score']" in msg and "data.header.interactions=true" in msg
    # set for that file alone: skipped as a header, and the summary says who decided
    raw = read("bookcrossing", tmp_path, "data.header.interactions=true",
               "data.keep_implicit=true")
    assert raw.files[0].lines == RATINGS
    assert raw.files[0].header == {"header": True, "how": "data.header",
                                   "names": ["uid", "book", "score"]}
    assert raw.files[1].header["how"] == "detected"


def test_per_file_header_setting_false_reads_the_first_line_as_data(tmp_path):
    # data.header.items=false on a headed books file: its header becomes one malformed line,
    # counted (nothing vanishes silently)
    raw = read("bookcrossing", FIX / "bookcrossing-dump", "data.header.items=false",
               "data.max_bad_fraction=0.5")
    books = raw.files[1]
    assert books.header == {"header": False, "how": "data.header"}
    assert books.lines == 7 and books.bad == 0  # 8 fields like a book: read, never rated
    assert "ISBN" not in raw.items.titles


def test_movielens_header_detected_without_setting(tmp_path):
    body = (FIX / "ml-1m" / "ratings.dat").read_text()
    (tmp_path / "ratings.dat").write_text("UserID::MovieID::Rating::Timestamp\n" + body)
    shutil.copy(FIX / "ml-1m" / "movies.dat", tmp_path / "movies.dat")
    raw = read("movielens-1m", tmp_path)
    plain = read("movielens-1m", FIX / "ml-1m")
    assert raw.interactions.user.tolist() == plain.interactions.user.tolist()
    assert raw.files[0].header["header"] is True and raw.files[1].header["header"] is False
    assert raw.files[0].lines == plain.files[0].lines == 68


def test_header_setting_is_validated_when_loading():
    with pytest.raises(ConfigError, match="data.header.books"):
        load_config(None, ["data.header.books=true"])
    with pytest.raises(ConfigError, match="data.header.items"):
        load_config(None, ["data.header.items=maybe"])


# ---------------------------------------------------------------------- BookCrossing quoting

@pytest.mark.parametrize("folder, repair", [
    ("bookcrossing-dump", "backslash-escaped quotes"),
    ("bookcrossing-reexport", "re-exported escaped quotes"),
])
def test_escaped_quote_styles_give_the_right_titles(folder, repair):
    raw = read("bookcrossing", FIX / folder)
    ratings, books, users = raw.files
    titles = raw.items.titles
    assert titles["0451167317"] == '"O" Is for Outlaw'
    assert titles["0060973129"] == 'Decision in Normandy: The "Real" Story'
    assert titles["0375759778"] == "Prague : A Novel"
    assert books.bad == 0 and books.repaired == {repair: 2}  # counted, not dropped
    assert users.bad == 0 and users.repaired == {repair: 1}
    assert raw.items_without_title == 0
    # every book's ratings are kept: the escaped titles' books most of all
    assert sum(raw.interactions.item == "0451167317") == 4


def test_both_styles_read_the_same_data():
    dump = read("bookcrossing", FIX / "bookcrossing-dump")
    reexport = read("bookcrossing", FIX / "bookcrossing-reexport")
    assert dump.items.titles == reexport.items.titles
    assert dump.interactions.item.tolist() == reexport.interactions.item.tolist()


def test_summary_counts_repaired_lines():
    _, summary = prepare(cfg("bookcrossing", FIX / "bookcrossing-reexport",
                             "data.min_history=2", "data.label_op='>='",
                             "data.label_threshold=5").data, seed=0)
    books = summary["files"][1]
    assert books["repaired"] == {"re-exported escaped quotes": 2}
    text = format_summary(summary)
    assert "repaired [re-exported escaped quotes: 2]" in text
    assert "header (detected): ISBN, Book-Title" in text


# ---------------------------------------------------------------------- Amazon without metadata

def test_amazon_reviews_without_metadata_run_with_missing_title_id():
    folder = FIX / "amazon" / "no-meta"
    assert not list(folder.glob("meta_*"))
    with pytest.warns(DataWarning, match="prompts carry item ids, not titles"):
        raw = read("amazon", folder, "data.missing_title=id")
    assert len(raw.interactions) == raw.interactions_before == 69 and len(raw.files) == 1
    assert all(title == item for item, title in raw.items.titles.items())
    assert raw.items_without_title == len(raw.items)


def test_amazon_without_metadata_explains_where_titles_come_from():
    with pytest.raises(DataError) as err:
        read("amazon", FIX / "amazon" / "no-meta")
    msg = str(err.value)
    assert "prompts need item titles" in msg and "meta_<Category>.json.gz" in msg
    assert "data.missing_title=id" in msg


def test_amazon_without_metadata_data_stage_summary_warns():
    data = cfg("amazon", FIX / "amazon" / "no-meta", "data.missing_title=id",
               "data.min_history=2").data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, summary = prepare(data, seed=0)
    assert any("no Amazon metadata file" in w for w in summary["warnings"])
    assert "WARNING: no Amazon metadata file" in format_summary(summary)
    assert len(prepared.splits["train"]) > 0


# ---------------------------------------------------------------------- imbalanced labels

def _positive(*overrides: str):
    c = cfg("movielens-1m", FIX / "ml-1m-positive", "data.few_shot_count=30", *overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return prepare(c.data, seed=0, llm_cfg=c.llm, eval_cfg=c.eval)


def test_95_percent_positives_balanced_stratified_and_warning():
    prepared, summary = _positive()
    rate = summary["splits"]["train"]["positive_rate"]
    assert 0.93 <= rate <= 0.97
    assert summary["classes"]["few_shot"]["negatives"] < 10  # a plain draw: the prior
    warning = next(w for w in summary["warnings"] if w.startswith("the train split's"))
    assert "outside [0.1, 0.9]" in warning and "data.few_shot_balance=balanced" in warning

    prepared, summary = _positive("data.few_shot_balance=balanced")
    few = prepared.few_shot()
    assert len(few) == 30 and sum(s.label for s in few) == 15  # equal classes
    assert summary["classes"]["few_shot"] == {"samples": 30, "positives": 15, "negatives": 15}
    assert any("outside [0.1, 0.9]" in w for w in summary["warnings"])  # the split still is

    prepared, summary = _positive("data.few_shot_balance=stratified")
    few = prepared.few_shot()
    n_pos = round(30 * rate)
    assert len(few) == 30 and sum(s.label for s in few) == n_pos  # the split's rate

    text = format_summary(summary)
    assert f"few-shot training samples: 30 ({n_pos} positive, {30 - n_pos} negative" in text
    assert "test evaluation subset (eval.max_samples=2000)" in text
    assert "WARNING: the train split's positive rate" in text


def test_balanced_with_too_few_negatives_takes_all_of_them():
    prepared, summary = _positive("data.few_shot_count=null", "data.few_shot_fraction=0.5",
                                  "data.few_shot_balance=balanced")
    n_neg = sum(1 - s.label for s in prepared.splits["train"])
    few = prepared.few_shot()
    assert sum(1 - s.label for s in few) == n_neg  # every negative, the rest positives
    assert len(few) == round(0.5 * len(prepared.splits["train"]))
