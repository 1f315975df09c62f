"""Delimited raw formats: BookCrossing, MovieLens-100K, MovieLens-1M and RecBole atomic files."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


class QuotedSplitter:
    """Split a ``"a";"b";"c"`` line as BookCrossing files write it, repairing its quoting.

    Three ways of writing a quote inside a field occur in BookCrossing files, and are read:

    - the original dump's backslash escapes: ``"\\"O\\" Is for Outlaw"``;
    - common re-exports of it, written by a CSV tool that read those escapes as plain text
      (the field ``\\O\\" Is for Outlaw"``) and wrote that back with doubled quotes; the
      misreading is undone: the title is ``"O" Is for Outlaw`` again;
    - the dump's broken lines where a backslash stands before the closing quote and the next
      field lost its opening one: ``"... Readers)\\";Michael Teitelbaum";"2000"``.

    Interpretations are tried in that order (after a plain ``split`` for lines without quotes
    or backslashes inside fields); with ``expected`` fields the first that gives that many wins.
    ``last_repair`` names the repair the last line needed (None: none), so the reader can count
    repaired lines. A line no interpretation fits raises ``csv.Error`` ("bad quoting"). A record
    never spans lines: an unclosed quote is a malformed line, not a reason to swallow the next.
    """

    ESCAPED = "backslash-escaped quotes"
    REEXPORTED = "re-exported escaped quotes"
    STRAY = "backslash before a closing quote"

    def __init__(self, sep: str, expected: int | None = None) -> None:
        if len(sep) != 1:
            raise DataError(f"data.sep must be one character for quoted files, got {sep!r}")
        self.sep, self.expected = sep, expected
        self.pair = f'"{sep}"'
        self.last_repair: str | None = None

    def __call__(self, text: str) -> list[str]:
        self.last_repair = None
        if len(text) > 1 and text[0] == '"' and text[-1] == '"' and "\\" not in text:
            parts = text[1:-1].split(self.pair)
            if text.count('"') == 2 * len(parts):  # no quote inside any field
                return parts
        first_error: csv.Error | None = None
        parsed: list[str] | None = None
        for escapes in (True, False):
            try:
                fields, quoted, used = _tokenize(text, self.sep, escapes)
            except csv.Error as err:
                first_error = first_error or err
                continue
            if self.expected is not None and len(fields) != self.expected:
                parsed = parsed or fields
                continue
            if escapes:
                self.last_repair = self.ESCAPED if used else None
                return fields
            return self._repair(fields, quoted)
        if parsed is not None:  # it splits, with the wrong number of fields: "field count"
            return parsed
        raise first_error or csv.Error("bad quoting")

    def _repair(self, fields: list[str], quoted: list[bool]) -> list[str]:
        out = list(fields)
        for k, value in enumerate(fields):
            if "\\" not in value:
                continue
            if quoted[k] and value.endswith("\\") and k + 1 < len(fields) and not quoted[k + 1] \
                    and fields[k + 1].endswith('"'):
                out[k], out[k + 1] = value[:-1], fields[k + 1][:-1]
                self.last_repair = self.STRAY
            elif quoted[k] and value.endswith('"'):
                # The re-export read the dump's `"\"O...` as the field `\` closed by the quote:
                # put the quote back after the first backslash, drop the original closing quote
                # at the end, then undo the escapes.
                cut = value.index("\\") + 1
                original = value[:cut] + '"' + value[cut:-1]
                out[k] = original.replace('\\"', '"')
                self.last_repair = self.REEXPORTED
        return out


def _tokenize(text: str, sep: str, escapes: bool) -> tuple[list[str], list[bool], bool]:
    """(fields, whether each was quoted, whether a backslash escape was used) of one line.

    Quoted fields end at a quote that is not doubled (nor, with ``escapes``, preceded by a
    backslash); that quote must be followed by ``sep`` or the line end. Unquoted fields run to
    the next ``sep``. Raises ``csv.Error`` for an unclosed quote or text after a closing one.
    """
    fields: list[str] = []
    quoted: list[bool] = []
    used = False
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise csv.Error("unclosed quote")
                c = text[i]
                if escapes and c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    buf.append(text[i + 1])
                    used = used or text[i + 1] == '"'
                    i += 2
                elif c == '"':
                    if i + 1 < n and text[i + 1] == '"':
                        buf.append('"')
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    buf.append(c)
                    i += 1
            if i < n and text[i] != sep:
                raise csv.Error("text after a closing quote")
            fields.append("".join(buf))
            quoted.append(True)
        else:
            j = text.find(sep, i)
            j = n if j < 0 else j
            fields.append(text[i:j])
            quoted.append(False)
            i = j
        if i >= n:
            return fields, quoted, used
        i += 1  # the separator
        if i == n:  # a trailing separator ends with an empty field
            fields.append("")
            quoted.append(False)
            return fields, quoted, used


def quoted_splitter(sep: str, expected: int | None = None) -> QuotedSplitter:
    """A ``QuotedSplitter`` for ``sep`` (BookCrossing's ``;``), expecting ``expected`` fields."""
    return QuotedSplitter(sep, expected)


# ---- header lines ------------------------------------------------------------------------

def _norm(name: str) -> str:
    """``"User-ID"`` / ``"user_id"`` / ``"User ID"`` -> ``"userid"``."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _is_number(text: str) -> bool:
    return parse_rating(text) is not None


@dataclass(frozen=True)
class FileShape:
    """What a file of a format holds: its role (``interactions``, ``items``, ``users``: the
    ``data.header`` key), the accepted names of its leading columns (normalized, any of each
    tuple), and ``is_data(fields)``: whether a line is a data row of the expected shape."""

    role: str
    names: tuple[tuple[str, ...], ...]
    is_data: Callable[[list[str]], bool]
    shape: str  # the data row's shape in words, for messages


# ml-100k's u.data and ml-1m's ratings.dat hold the same four fields.
_MOVIELENS_RATINGS = FileShape(
    "interactions", (("userid", "user"), ("itemid", "movieid", "item"), ("rating",),
                     ("timestamp", "time")),
    lambda f: len(f) == 4 and _is_number(f[2]) and _is_number(f[3]),
    "4 fields: user, item, numeric rating, numeric timestamp")

SHAPES: dict[tuple[str, str], FileShape] = {
    ("bookcrossing", "interactions"): FileShape(
        "interactions", (("userid", "user"), ("isbn", "itemid", "bookid", "item"),
                         ("bookrating", "rating")),
        lambda f: len(f) == 3 and _is_number(f[2]), "3 fields, a numeric rating third"),
    ("bookcrossing", "items"): FileShape(
        "items", (("isbn", "itemid", "bookid"), ("booktitle", "title")),
        lambda f: len(f) >= 2 and bool(f[0].strip()) and (len(f) < 4 or _is_number(f[3])),
        "ISBN, title, author, a numeric year, ..."),
    ("bookcrossing", "users"): FileShape(
        "users", (("userid", "user"),), lambda f: f[0].strip().isdigit(),
        "a numeric user id first"),
    ("movielens-100k", "interactions"): _MOVIELENS_RATINGS,
    ("movielens-100k", "items"): FileShape(
        "items", (("movieid", "itemid", "id"), ("movietitle", "title")),
        lambda f: len(f) >= 2 and f[0].strip().isdigit(), "a numeric movie id, then the title"),
    ("movielens-1m", "interactions"): _MOVIELENS_RATINGS,
    ("movielens-1m", "items"): FileShape(
        "items", (("movieid", "itemid", "id"), ("title",), ("genres", "genre")),
        lambda f: len(f) >= 2 and f[0].strip().isdigit(), "a numeric movie id, then the title"),
}


def header_setting(header: Any, role: str) -> bool | None:
    """``data.header`` for one file: null/true/false as given, or the mapping's entry."""
    if header is None or isinstance(header, bool):
        return header
    value = header.get(role) if hasattr(header, "get") else None
    return None if value is None else bool(value)


def first_fields(path: Path, encoding: str, split: Splitter, key: str) -> list[str] | None:
    """The first non-blank line's fields (stripped); None when it does not split."""
    for _, raw in iter_lines(path):
        try:
            return [f.strip() for f in split(decoder(encoding)(raw))]
        except (UnicodeDecodeError, csv.Error):
            return None
    raise DataError(f"{key}: file is empty: {path}")


def read_header(path: Path, encoding: str, split: Splitter, key: str) -> list[str]:
    """The first non-blank line's fields (stripped); a ``DataError`` if it does not split."""
    for _, raw in iter_lines(path):
        try:
            return [f.strip() for f in split(decoder(encoding)(raw))]
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{key}: cannot read the header line of {path}: {err}") from None
    raise DataError(f"{key}: file is empty: {path}")


def decide_header(path: Path, encoding: str, split: Splitter, setting: bool | None,
                  fmt: str, role: str, key: str) -> tuple[bool, dict[str, Any]]:
    """Whether ``path`` starts with a header line, and the decision for the summary.

    ``setting`` (``data.header`` for this file) decides when not None. Otherwise: a first line
    whose leading names fit the format's column names is a header; one that parses as a data
    row of the expected shape is data; anything else is a ``DataError`` that quotes the line's
    names and says which key settles it. Nothing is dropped without being recorded.
    """
    spec = SHAPES[(fmt, role)]
    fields = first_fields(path, encoding, split, key)
    shown = fields if fields is not None else []
    header_key = f"data.header.{role}"
    if setting is not None:
        return setting, {"header": setting, "how": "data.header",
                         **({"names": shown} if setting else {})}
    if fields is not None and len(fields) >= len(spec.names) and all(
            _norm(name) in accepted for name, accepted in zip(fields, spec.names)):
        return True, {"header": True, "how": "detected", "names": fields}
    if fields is not None and spec.is_data(fields):
        return False, {"header": False, "how": "detected: the first line is a data row"}
    expected = ";".join("/".join(a) for a in spec.names)
    raise DataError(
        f"{key}: the first line of {path} is neither a {fmt} header (names {expected}, in any "
        f"case/punctuation) nor a data row ({spec.shape}); its fields are {shown}. Set "
        f"{header_key}=true to skip it as a header, or {header_key}=false to read it as data "
        "(a malformed first row is then counted among the skipped lines).")


def iter_rows(path: Path, report: LineReport, encoding: str, split: Splitter, *,
              skip_header: bool, exact: int | None = None,
              minimum: int = 1) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of well-formed data lines; the others are counted in ``report``.

    A line needs ``exact`` fields when given, else at least ``minimum``. Lines the splitter had
    to repair (``QuotedSplitter.last_repair``) are counted in ``report.repaired``.
    """
    decode = decoder(encoding)
    lines = iter_lines(path, progress=True)
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
        repair = getattr(split, "last_repair", None)
        if repair is not None:
            report.repair(repair)
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
    sep: str = ";", encoding: str = UTF8_OR_LATIN1, header: Any = None,
    keep_implicit: bool = False, seed: int = 0, missing_title: str = "drop",
    max_bad_fraction: float = 0.01, keys: dict[str, str] | None = None,
) -> RawData:
    """Read BookCrossing ratings (``User-ID;ISBN;Book-Rating``) and book titles (field 2).

    Rating 0 (implicit feedback) is excluded unless ``keep_implicit``. There are no timestamps:
    the timestamp column holds ``seeded_order`` indices (a per-user random order fixed by
    ``seed``). ``header`` is ``data.header`` (null: detected per file, see ``decide_header``;
    a bool for every file; or a mapping by role). A line needs as many fields as the header has
    (3 ratings, 8 books, 3 users without a header). Quoting is repaired as ``QuotedSplitter``
    describes. ``users_path`` is only checked and reported: samples need no user data.
    """
    keys = {"ratings": "data.interactions_file", "books": "data.items_file",
            "users": "data.users_file", **(keys or {})}
    ratings_path = require_file(Path(ratings_path), keys["ratings"])
    books_path = require_file(Path(books_path), keys["books"])

    def open_file(path: Path, role: str, default: int, key: str
                  ) -> tuple[QuotedSplitter, bool, LineReport]:
        probe = quoted_splitter(sep)
        skip, decision = decide_header(path, encoding, probe, header_setting(header, role),
                                       "bookcrossing", role, key)
        n = len(first_fields(path, encoding, probe, key) or []) if skip else default
        return quoted_splitter(sep, n), skip, LineReport(path, max_bad_fraction, decision)

    split, skip, report = open_file(ratings_path, "interactions", 3, keys["ratings"])
    cols = read_ratings(
        ratings_path, report, encoding, split, skip_header=skip, exact=split.expected,
        columns=(0, 1, 2, None),
        keep=lambda r: None if keep_implicit or r != 0 else "implicit rating 0")
    files = [report.finish()]
    cols.timestamp = [0] * len(cols)  # replaced by seeded_order once the kept rows are known

    split, skip, books = open_file(books_path, "items", 8, keys["books"])
    titles = read_titles(books_path, books, encoding, split, set(cols.item), skip_header=skip,
                         exact=split.expected, minimum=2, id_col=0, title_col=1)
    files.append(books.finish())
    if users_path is not None:
        users_path = require_file(Path(users_path), keys["users"])
        split, skip, users = open_file(users_path, "users", 3, keys["users"])
        for _ in iter_rows(users_path, users, encoding, split, skip_header=skip,
                           exact=split.expected):
            pass
        files.append(users.finish())
    raw = finish(cols, titles, missing_title, files, source=keys["ratings"])
    raw.interactions.timestamp = seeded_order(raw.interactions.user, raw.interactions.item, seed)
    return raw


def read_movielens_100k(
    data_path: str | Path, item_path: str | Path, *, sep: str | None = None,
    encoding: str | None = None, header: Any = None, missing_title: str = "drop",
    max_bad_fraction: float = 0.01, keys: dict[str, str] | None = None,
) -> RawData:
    """Read GroupLens ML-100K: ``u.data`` (user, item, rating, timestamp; tab-separated) and
    ``u.item`` (``|``-separated, latin-1, id in field 1 and title in field 2).

    ``sep``/``encoding``, when given, replace the defaults of both files. ``header`` is
    ``data.header`` (null: detected per file; the GroupLens files have none).
    """
    keys = {"data": "data.interactions_file", "item": "data.items_file", **(keys or {})}
    data_path = require_file(Path(data_path), keys["data"])
    item_path = require_file(Path(item_path), keys["item"])
    enc, split = encoding or "utf-8", plain_splitter(sep or "\t")
    skip, decision = decide_header(data_path, enc, split, header_setting(header, "interactions"),
                                   "movielens-100k", "interactions", keys["data"])
    report = LineReport(data_path, max_bad_fraction, decision)
    cols = read_ratings(data_path, report, enc, split, skip_header=skip, exact=4,
                        columns=(0, 1, 2, 3))
    files = [report.finish()]
    enc, split = encoding or UTF8_OR_LATIN1, plain_splitter(sep or "|")
    skip, decision = decide_header(item_path, enc, split, header_setting(header, "items"),
                                   "movielens-100k", "items", keys["item"])
    items = LineReport(item_path, max_bad_fraction, decision)
    titles = read_titles(item_path, items, enc, split, set(cols.item), skip_header=skip,
                         exact=None, minimum=2, id_col=0, title_col=1)
    files.append(items.finish())
    return finish(cols, titles, missing_title, files, source=keys["data"])


def read_movielens_1m(
    ratings_path: str | Path, movies_path: str | Path, *, sep: str = "::",
    encoding: str = UTF8_OR_LATIN1, header: Any = None, missing_title: str = "drop",
    max_bad_fraction: float = 0.01, keys: dict[str, str] | None = None,
) -> RawData:
    """Read ML-1M: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
    (``MovieID::Title::Genres``), ``::``-separated, latin-1. ``header`` is ``data.header``
    (null: detected per file; the GroupLens files have none)."""
    keys = {"ratings": "data.interactions_file", "movies": "data.items_file", **(keys or {})}
    ratings_path = require_file(Path(ratings_path), keys["ratings"])
    movies_path = require_file(Path(movies_path), keys["movies"])
    split = plain_splitter(sep)
    skip, decision = decide_header(ratings_path, encoding, split,
                                   header_setting(header, "interactions"), "movielens-1m",
                                   "interactions", keys["ratings"])
    report = LineReport(ratings_path, max_bad_fraction, decision)
    cols = read_ratings(ratings_path, report, encoding, split, skip_header=skip, exact=4,
                        columns=(0, 1, 2, 3))
    files = [report.finish()]
    skip, decision = decide_header(movies_path, encoding, split, header_setting(header, "items"),
                                   "movielens-1m", "items", keys["movies"])
    movies = LineReport(movies_path, max_bad_fraction, decision)
    titles = read_titles(movies_path, movies, encoding, split, set(cols.item), skip_header=skip,
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
    typed = {"header": True, "how": "RecBole typed header"}
    report = LineReport(inter_path, max_bad_fraction, {**typed, "names": [
        f"{n}:{k}" for n, k in inter_cols]})
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
    items = LineReport(item_path, max_bad_fraction, {**typed, "names": [
        f"{n}:{k}" for n, k in item_cols]})
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
