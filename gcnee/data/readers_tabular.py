"""Delimited raw formats: BookCrossing, MovieLens-100K, MovieLens-1M and RecBole atomic files."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gcnee.data.errors import DataError
from gcnee.data.readers_common import (
    UTF8_OR_LATIN1,
    Columns,
    FileReport,
    LineReport,
    RawData,
    clean_title,
    decoder,
    finish,
    iter_lines,
    parse_rating,
    parse_timestamp,
    require_file,
)

Splitter = Callable[[str], list[str]]


def plain_splitter(sep: str) -> Splitter:
    if not sep:
        raise DataError("data.sep must not be empty")
    return lambda text: text.split(sep)


def quoted_splitter(sep: str) -> Splitter:
    """Split a ``"a";"b";"c"`` line (double quotes, backslash escapes, as in BookCrossing).

    A line of only quoted fields without escapes takes a plain ``split``; anything else goes
    through ``csv`` in strict mode, whose errors become "bad quoting" lines. A record never spans
    lines: an unclosed quote is a malformed line, not a reason to swallow the next ones.
    """
    if len(sep) != 1:
        raise DataError(f"data.sep must be one character for quoted files, got {sep!r}")
    pair = f'"{sep}"'

    def split(text: str) -> list[str]:
        if len(text) > 1 and text[0] == '"' and text[-1] == '"' and "\\" not in text:
            parts = text[1:-1].split(pair)
            if text.count('"') == 2 * len(parts):  # no quote inside any field
                return parts
        return next(csv.reader([text], delimiter=sep, quotechar='"', escapechar="\\",
                               strict=True))

    return split


def read_header(path: Path, encoding: str, split: Splitter, key: str) -> list[str]:
    """The first non-blank line's fields (stripped)."""
    for _, raw in iter_lines(path):
        try:
            return [f.strip() for f in split(decoder(encoding)(raw))]
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{key}: cannot read the header line of {path}: {err}") from None
    raise DataError(f"{key}: file is empty: {path}")


def iter_rows(path: Path, report: LineReport, encoding: str, split: Splitter, *,
              skip_header: bool, exact: int | None = None,
              minimum: int = 1) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of well-formed data lines; the others are counted in ``report``.

    A line needs ``exact`` fields when given, else at least ``minimum``.
    """
    decode = decoder(encoding)
    lines = iter_lines(path)
    if skip_header:
        next(lines, None)
    for lineno, raw in lines:
        report.lines += 1
        try:
            fields = split(decode(raw))
        except UnicodeDecodeError:
            report.skip(lineno, "undecodable bytes")
            continue
        except csv.Error:
            report.skip(lineno, "bad quoting")
            continue
        if (len(fields) != exact) if exact is not None else (len(fields) < minimum):
            report.skip(lineno, "field count")
            continue
        yield lineno, fields


def read_ratings(path: Path, report: LineReport, encoding: str, split: Splitter, *,
                 skip_header: bool, exact: int | None, columns: tuple[int, int, int, int | None],
                 keep: Callable[[float], str | None] = lambda r: None) -> Columns:
    """Interactions from a delimited file; ``columns`` = indices of user, item, rating, time.

    Without a time column the line number stands in (file order). ``keep(rating)`` returns a
    reason to leave a well-formed line out (counted as excluded), or None to keep it.
    """
    u, i, r, t = columns
    cols = Columns()
    minimum = 1 + max(c for c in columns if c is not None)
    for lineno, fields in iter_rows(path, report, encoding, split, skip_header=skip_header,
                                    exact=exact, minimum=minimum):
        rating = parse_rating(fields[r])
        if rating is None:
            report.skip(lineno, "bad rating")
            continue
        stamp = lineno if t is None else parse_timestamp(fields[t])
        if stamp is None:
            report.skip(lineno, "bad timestamp")
            continue
        user, item = fields[u].strip(), fields[i].strip()
        if not user or not item:
            report.skip(lineno, "missing field")
            continue
        reason = keep(rating)
        if reason is not None:
            report.exclude(reason)
            continue
        cols.add(user, item, rating, stamp)
    return cols


def read_titles(path: Path, report: LineReport, encoding: str, split: Splitter, wanted: set[str],
                *, skip_header: bool, exact: int | None, minimum: int, id_col: int,
                title_col: int) -> dict[str, str]:
    """``{item: cleaned title}`` for the items in ``wanted``; the first non-empty title wins."""
    titles: dict[str, str] = {}
    for _, fields in iter_rows(path, report, encoding, split, skip_header=skip_header,
                               exact=exact, minimum=minimum):
        item = fields[id_col].strip()
        if item in wanted and not titles.get(item):
            titles[item] = clean_title(fields[title_col])
    return titles


def seeded_order(user: Sequence[str], item: Sequence[str], seed: int) -> np.ndarray:
    """Per-user order indices 0..n_u-1, shape (n,), for data without timestamps.

    Each row's key is a hash of ``(seed, user, item)``; a user's rows are ranked by key (file
    order breaks ties, i.e. duplicate pairs). The order depends on the seed and the rows, not on
    the order of lines in the file.
    """
    n = len(user)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    prefix = f"{seed}\x1f".encode()
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + f"{u}\x1f{i}".encode(), digest_size=8).digest(),
                        "little") >> 1 for u, i in zip(user, item)),
        dtype=np.int64, count=n)
    _, codes = np.unique(np.asarray(user, dtype=str), return_inverse=True)
    order = np.lexsort((np.arange(n), keys, codes))
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    group_start = starts[np.cumsum(np.r_[False, sorted_codes[1:] != sorted_codes[:-1]])]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def read_bookcrossing(
    ratings_path: str | Path, books_path: str | Path, users_path: str | Path | None = None, *,
    sep: str = ";", encoding: str = UTF8_OR_LATIN1, header: bool = True,
    keep_implicit: bool = False, seed: int = 0, missing_title: str = "drop",
    max_bad_fraction: float = 0.01, keys: dict[str, str] | None = None,
) -> RawData:
    """Read BookCrossing ratings (``User-ID;ISBN;Book-Rating``) and book titles (field 2).

    Rating 0 (implicit feedback) is excluded unless ``keep_implicit``. There are no timestamps:
    the timestamp column holds ``seeded_order`` indices (a per-user random order fixed by
    ``seed``). A line needs as many fields as the header has (3 ratings, 8 books, 3 users without
    a header). ``users_path`` is only checked and reported: samples need no user data.
    """
    keys = {"ratings": "data.interactions_file", "books": "data.items_file",
            "users": "data.users_file", **(keys or {})}
    ratings_path = require_file(Path(ratings_path), keys["ratings"])
    books_path = require_file(Path(books_path), keys["books"])
    split = quoted_splitter(sep)

    def n_fields(path: Path, default: int, key: str) -> int:
        return len(read_header(path, encoding, split, key)) if header else default

    report = LineReport(ratings_path, max_bad_fraction)
    cols = read_ratings(
        ratings_path, report, encoding, split, skip_header=header,
        exact=n_fields(ratings_path, 3, keys["ratings"]), columns=(0, 1, 2, None),
        keep=lambda r: None if keep_implicit or r != 0 else "implicit rating 0")
    files = [report.finish()]
    cols.timestamp = [0] * len(cols)  # replaced by seeded_order once the kept rows are known

    books = LineReport(books_path, max_bad_fraction)
    titles = read_titles(books_path, books, encoding, split, set(cols.item), skip_header=header,
                         exact=n_fields(books_path, 8, keys["books"]), minimum=2, id_col=0,
                         title_col=1)
    files.append(books.finish())
    if users_path is not None:
        users_path = require_file(Path(users_path), keys["users"])
        users = LineReport(users_path, max_bad_fraction)
        for _ in iter_rows(users_path, users, encoding, split, skip_header=header,
                           exact=n_fields(users_path, 3, keys["users"])):
            pass
        files.append(users.finish())
    raw = finish(cols, titles, missing_title, files, source=keys["ratings"])
    raw.interactions.timestamp = seeded_order(raw.interactions.user, raw.interactions.item, seed)
    return raw


def read_movielens_100k(
    data_path: str | Path, item_path: str | Path, *, sep: str | None = None,
    encoding: str | None = None, header: bool = False, missing_title: str = "drop",
    max_bad_fraction: float = 0.01, keys: dict[str, str] | None = None,
) -> RawData:
    """Read GroupLens ML-100K: ``u.data`` (user, item, rating, timestamp; tab-separated) and
    ``u.item`` (``|``-separated, latin-1, id in field 1 and title in field 2).

    ``sep``/``encoding``, when given, replace the defaults of both files.
    """
    keys = {"data": "data.interactions_file", "item": "data.items_file", **(keys or {})}
    data_path = require_file(Path(data_path), keys["data"])
    item_path = require_file(Path(item_path), keys["item"])
    report = LineReport(data_path, max_bad_fraction)
    cols = read_ratings(data_path, report, encoding or "utf-8", plain_splitter(sep or "\t"),
                        skip_header=header, exact=4, columns=(0, 1, 2, 3))
    files = [report.finish()]
    items = LineReport(item_path, max_bad_fraction)
    titles = read_titles(item_path, items, encoding or UTF8_OR_LATIN1, plain_splitter(sep or "|"),
                         set(cols.item), skip_header=header, exact=None, minimum=2, id_col=0,
                         title_col=1)
    files.append(items.finish())
    return finish(cols, titles, missing_title, files, source=keys["data"])


def read_movielens_1m(
    ratings_path: str | Path, movies_path: str | Path, *, sep: str = "::",
    encoding: str = UTF8_OR_LATIN1, header: bool = False, missing_title: str = "drop",
    max_bad_fraction: float = 0.01, keys: dict[str, str] | None = None,
) -> RawData:
    """Read ML-1M: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
    (``MovieID::Title::Genres``), ``::``-separated, latin-1."""
    keys = {"ratings": "data.interactions_file", "movies": "data.items_file", **(keys or {})}
    ratings_path = require_file(Path(ratings_path), keys["ratings"])
    movies_path = require_file(Path(movies_path), keys["movies"])
    split = plain_splitter(sep)
    report = LineReport(ratings_path, max_bad_fraction)
    cols = read_ratings(ratings_path, report, encoding, split, skip_header=header, exact=4,
                        columns=(0, 1, 2, 3))
    files = [report.finish()]
    movies = LineReport(movies_path, max_bad_fraction)
    titles = read_titles(movies_path, movies, encoding, split, set(cols.item), skip_header=header,
                         exact=3, minimum=3, id_col=0, title_col=1)
    files.append(movies.finish())
    return finish(cols, titles, missing_title, files, source=keys["ratings"])


RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


def recbole_header(path: Path, encoding: str, split: Splitter, key: str) -> list[tuple[str, str]]:
    """``[(name, type), ...]`` from a RecBole typed header (``user_id:token``)."""
    columns = []
    for field in read_header(path, encoding, split, key):
        name, _, kind = field.rpartition(":")
        if not name or kind not in RECBOLE_TYPES:
            raise DataError(
                f"{key}: {path} does not start with a RecBole typed header: column {field!r} "
                f"is not name:type with type in {', '.join(RECBOLE_TYPES)}")
        columns.append((name, kind))
    return columns


def _column(columns: list[tuple[str, str]], names: tuple[str, ...], path: Path, key: str,
            required: bool = True) -> int | None:
    found = [n for n, _ in columns]
    for name in names:
        if name in found:
            return found.index(name)
    if required:
        raise DataError(f"{key}: {path} has no {' or '.join(names)} column "
                        f"(columns: {', '.join(found)})")
    return None


def _typed(value: str, kind: str) -> Any:
    if kind == "token_seq":
        return value.split()
    if kind == "float_seq":
        return [parse_rating(v) for v in value.split()]
    if kind == "float":
        return parse_rating(value)
    return value


def read_recbole(
    inter_path: str | Path, item_path: str | Path, *, sep: str = "\t", encoding: str = "utf-8",
    missing_title: str = "drop", max_bad_fraction: float = 0.01,
    keys: dict[str, str] | None = None,
) -> RawData:
    """Read RecBole atomic files: ``.inter`` (``user_id``, ``item_id``, ``rating``, optional
    ``timestamp``) and ``.item`` (``item_id`` and a title column), with typed headers.

    The title column is ``movie_title``, else ``title``, else the first column whose name contains
    "title"; a ``token_seq`` title is its tokens joined by single spaces. The item file's other
    columns go to ``Items.extra`` typed by their header (``token_seq`` -> list of str,
    ``float``/``float_seq`` -> float / list of float). Without a timestamp column the line number
    stands in (file order). Every line needs as many fields as the header.
    """
    keys = {"inter": "data.interactions_file", "item": "data.items_file", **(keys or {})}
    inter_path = require_file(Path(inter_path), keys["inter"])
    item_path = require_file(Path(item_path), keys["item"])
    split = plain_splitter(sep)

    inter_cols = recbole_header(inter_path, encoding, split, keys["inter"])
    where = [_column(inter_cols, (name,), inter_path, keys["inter"], required=name != "timestamp")
             for name in ("user_id", "item_id", "rating", "timestamp")]
    report = LineReport(inter_path, max_bad_fraction)
    cols = read_ratings(inter_path, report, encoding, split, skip_header=True,
                        exact=len(inter_cols), columns=tuple(where))  # type: ignore[arg-type]
    files: list[FileReport] = [report.finish()]

    item_cols = recbole_header(item_path, encoding, split, keys["item"])
    id_col = _column(item_cols, ("item_id",), item_path, keys["item"])
    names = [n for n, _ in item_cols]
    title_col = _column(item_cols, ("movie_title", "title") + tuple(
        n for n in names if "title" in n), item_path, keys["item"])
    wanted = set(cols.item)
    titles: dict[str, str] = {}
    extra: dict[str, dict[str, Any]] = {}
    items = LineReport(item_path, max_bad_fraction)
    for _, fields in iter_rows(item_path, items, encoding, split, skip_header=True,
                               exact=len(item_cols)):
        item = fields[id_col].strip()
        if item not in wanted or titles.get(item):
            continue
        titles[item] = clean_title(fields[title_col])
        extra[item] = {name: _typed(fields[c], kind) for c, (name, kind) in enumerate(item_cols)
                       if c not in (id_col, title_col)}
    files.append(items.finish())
    return finish(cols, titles, missing_title, files, extra=extra, source=keys["inter"])
