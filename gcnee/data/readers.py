"""Raw-data readers: one per format, and ``read_raw`` to dispatch on ``data.format``.

Every reader returns ``RawData``: ``Interactions`` (user and item ids as str, float ratings,
int64 timestamps), ``Items`` (a title for every item kept) and one ``FileReport`` per file read.

Defaults (``null`` in the config means the format's default; ``data.sep`` / ``data.encoding``,
when set, apply to every file of the format; ``data.header`` may be set per file):

| data.format    | interactions_file         | items_file               | users_file            |
|----------------|---------------------------|--------------------------|-----------------------|
| amazon         | the one other *.json[.gz] | the one meta_*.json[.gz] | -                     |
| bookcrossing   | BX-Book-Ratings.csv       | BX-Books.csv             | BX-Users.csv (if any) |
| movielens-100k | u.data                    | u.item                   | -                     |
| movielens-1m   | ratings.dat               | movies.dat               | -                     |
| recbole        | the one *.inter           | the one *.item           | -                     |

| data.format    | sep                            | encoding                            | header   |
|----------------|--------------------------------|-------------------------------------|----------|
| amazon         | - (JSON / Python-literal lines)| utf-8                               | -        |
| bookcrossing   | ``;``, double-quoted           | utf-8, else latin-1                 | detected |
| movielens-100k | tab (u.data), ``|`` (u.item)   | utf-8 (u.data); utf-8, else latin-1 | detected |
| movielens-1m   | ``::``                         | utf-8, else latin-1                 | detected |
| recbole        | tab                            | utf-8                               | typed    |

**Header lines** (``data.header``: null = detect, true/false for every file, or per file as
``{interactions: .., items: .., users: ..}``): a first line whose leading names fit the
format's columns (``User-ID;ISBN;Book-Rating``, any case or punctuation) is a header; a first
line that parses as a data row of the expected shape is data; anything else stops the read
with the line's names and the key that settles it. Each file's ``FileReport.header`` records
what was decided and how, so no row is lost silently.

**BookCrossing quoting**: the original dump's backslash-escaped quotes (``"\\"O\\" Is for
Outlaw"``), common re-exports of it (quotes doubled around the misread text
``\\O\\" Is for Outlaw"``) and the dump's lines with a backslash before a closing quote are read
and repaired (``QuotedSplitter``); the repaired lines are counted per file
(``FileReport.repaired``).

**Amazon without metadata**: with no ``meta_*`` file and ``data.missing_title=id`` the items
are titled by their ASIN (prompts then carry ids, not titles; a warning says so); otherwise
the error says where the metadata file comes from.

"utf-8, else latin-1" decodes each line as UTF-8 when it is valid UTF-8 and as latin-1 otherwise:
latin-1 files read correctly, and UTF-8 text stored inside them (BookCrossing's "Ã©") is repaired.
An explicit ``data.encoding`` is applied strictly. Gzipped files are recognised by their content.

Rules shared by all formats:

- **Malformed lines** (bad JSON, wrong field count, bad quoting, undecodable bytes, non-numeric
  rating or timestamp, missing field) are skipped and counted per file with reasons and the first
  line numbers. When a file's ``bad / lines`` exceeds ``data.max_bad_fraction`` the read stops
  with a ``DataError`` that carries the report. Blank lines are ignored; header lines are not
  counted as lines.
- **Titles** are cleaned (HTML entities decoded, whitespace collapsed; Amazon also loses HTML
  tags). An empty title, or an item without a metadata row, is a missing title:
  ``data.missing_title=drop`` drops such items and their interactions, ``id`` titles them by their
  id. ``RawData.items_without_title`` counts them either way.
- **Duplicate (user, item) pairs** are all kept, in file order; the sample builder decides.
- **Timestamps**: seconds where the format has them. BookCrossing has none: each user's ratings
  get order indices 0..n-1 ranked by a hash of ``(seed, user, item)`` (``seeded_order``), so the
  order is fixed by the seed and does not depend on the order of lines in the file. RecBole files
  without a ``timestamp`` column use the line number.
- **BookCrossing** rating 0 is implicit feedback, excluded (and counted in the ratings file's
  ``FileReport.excluded``) unless ``data.keep_implicit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gcnee.data.errors import DataError
from gcnee.data.readers_amazon import read_amazon
from gcnee.data.readers_common import UTF8_OR_LATIN1, FileReport, RawData
from gcnee.data.readers_tabular import (
    read_bookcrossing,
    read_movielens_1m,
    read_movielens_100k,
    read_recbole,
    seeded_order,
)

__all__ = [
    "FORMATS", "FileReport", "RawData", "read_raw", "read_amazon", "read_bookcrossing",
    "read_movielens_100k", "read_movielens_1m", "read_recbole", "seeded_order",
]

FORMATS = ("amazon", "bookcrossing", "movielens-100k", "movielens-1m", "recbole")
# Default file names: (interactions, items, users)
DEFAULT_FILES = {
    "bookcrossing": ("BX-Book-Ratings.csv", "BX-Books.csv", "BX-Users.csv"),
    "movielens-100k": ("u.data", "u.item", None),
    "movielens-1m": ("ratings.dat", "movies.dat", None),
}


def _named(folder: Path, name: str | None, default: str | None, key: str,
           fmt: str) -> Path | None:
    """The configured file, or the format's default; a missing one names the key to set."""
    if name is not None:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{key}: file not found: {path} ({key}={name!r} inside "
                            f"data.path={str(folder)!r})")
        return path
    if default is None:
        return None
    path = folder / default
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path} ({default} is the {fmt} default; "
                        f"set {key} if your file has another name)")
    return path


def _the_one(folder: Path, candidates: list[Path], what: str, key: str) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise DataError(f"data.path: expected exactly one {what} in {folder}, found: {found}. "
                    f"Set {key} to choose the file.")


AMAZON_META_HELP = (
    "prompts need item titles, which Amazon keeps in a metadata file beside the reviews: "
    "Amazon Review Data (2018, https://nijianmo.github.io/amazon/) publishes "
    "meta_<Category>.json.gz next to each <Category>.json.gz (the 2014 release: "
    "meta_<Category>.json.gz). Put it in {folder} (or name it with data.items_file), or set "
    "data.missing_title=id to run with item ids in place of titles")


def _amazon_files(folder: Path, data_cfg: Any) -> tuple[Path, Path | None]:
    json_files = sorted(p for p in folder.iterdir()
                        if p.is_file() and p.name.endswith((".json", ".json.gz")))
    meta = [p for p in json_files if p.name.startswith("meta_")]
    reviews = [p for p in json_files if not p.name.startswith("meta_")]
    if data_cfg.interactions_file is not None:
        reviews_path = _named(folder, data_cfg.interactions_file, None,
                              "data.interactions_file", "amazon")
    else:
        reviews_path = _the_one(folder, reviews, "reviews file (*.json or *.json.gz, not meta_*)",
                                "data.interactions_file")
    if data_cfg.items_file is not None:
        meta_path = _named(folder, data_cfg.items_file, None, "data.items_file", "amazon")
    elif not meta and data_cfg.missing_title == "id":
        meta_path = None  # titles = ids; read_amazon warns
    elif not meta:
        raise DataError(f"data.path: no metadata file (meta_*.json or meta_*.json.gz) in "
                        f"{folder}: " + AMAZON_META_HELP.format(folder=folder))
    else:
        meta_path = _the_one(folder, meta, "metadata file (meta_*.json or meta_*.json.gz)",
                             "data.items_file")
    return reviews_path, meta_path  # type: ignore[return-value]


def _recbole_files(folder: Path, data_cfg: Any) -> tuple[Path, Path]:
    paths = []
    for key, suffix in (("interactions_file", ".inter"), ("items_file", ".item")):
        name = getattr(data_cfg, key)
        if name is not None:
            paths.append(_named(folder, name, None, f"data.{key}", "recbole"))
        else:
            found = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
            paths.append(_the_one(folder, found, f"*{suffix} file", f"data.{key}"))
    return paths[0], paths[1]


def _check_basics(data_cfg: Any) -> Path:
    fmt = data_cfg.format
    if fmt not in FORMATS:
        raise DataError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 0 <= data_cfg.max_bad_fraction <= 1:
        raise DataError(f"data.max_bad_fraction must be in [0, 1], got "
                        f"{data_cfg.max_bad_fraction}")
    folder = Path(data_cfg.path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise DataError(f"data.path: folder {what}: {folder}")
    return folder


def resolve_files(data_cfg: Any) -> dict[str, Path | None]:
    """``{"interactions", "items", "users"}`` -> the files the format reads (None: none).

    Reads nothing but the folder listing, so a missing or ambiguous file is reported at once
    (``DataError`` naming the key to set), before any stage runs.
    """
    folder = _check_basics(data_cfg)
    fmt = data_cfg.format
    if fmt == "amazon":
        reviews, meta = _amazon_files(folder, data_cfg)
        return {"interactions": reviews, "items": meta, "users": None}
    if fmt == "recbole":
        if data_cfg.header is False or (
                hasattr(data_cfg.header, "get")
                and False in (data_cfg.header.get("interactions"), data_cfg.header.get("items"))):
            raise DataError("data.header=false: RecBole atomic files always start with a typed "
                            "header (user_id:token ...); leave data.header null")
        inter, item = _recbole_files(folder, data_cfg)
        return {"interactions": inter, "items": item, "users": None}
    d_inter, d_items, d_users = DEFAULT_FILES[fmt]
    inter = _named(folder, data_cfg.interactions_file, d_inter, "data.interactions_file", fmt)
    items = _named(folder, data_cfg.items_file, d_items, "data.items_file", fmt)
    users = None
    if fmt == "bookcrossing":
        users = (_named(folder, data_cfg.users_file, None, "data.users_file", fmt)
                 if data_cfg.users_file is not None
                 else (folder / d_users if (folder / d_users).is_file() else None))
    return {"interactions": inter, "items": items, "users": users}


check_files = resolve_files  # the CLI's name for it: validation before any stage runs


def read_raw(data_cfg: Any, seed: int = 0) -> RawData:
    """Read the raw files ``data_cfg`` (the ``data`` config section) points at.

    ``seed`` fixes BookCrossing's stand-in order (other formats ignore it). Raises ``DataError``
    for a missing folder or file (naming the config key), ambiguous Amazon/RecBole files, a
    first line that is neither header nor data, or too many malformed lines; ``ConfigError``-like
    bad values are ``DataError`` naming the key.
    """
    files = resolve_files(data_cfg)
    fmt = data_cfg.format
    common = {"missing_title": data_cfg.missing_title,
              "max_bad_fraction": float(data_cfg.max_bad_fraction)}
    sep, encoding, header = data_cfg.sep, data_cfg.encoding, data_cfg.header
    inter, items, users = files["interactions"], files["items"], files["users"]

    if fmt == "amazon":
        return read_amazon(inter, items, encoding=encoding or "utf-8", **common)
    if fmt == "recbole":
        return read_recbole(inter, items, sep=sep or "\t", encoding=encoding or "utf-8",
                            **common)
    if fmt == "bookcrossing":
        return read_bookcrossing(
            inter, items, users, sep=sep or ";", encoding=encoding or UTF8_OR_LATIN1,
            header=header, keep_implicit=data_cfg.keep_implicit, seed=seed, **common)
    if fmt == "movielens-100k":
        return read_movielens_100k(inter, items, sep=sep, encoding=encoding, header=header,
                                   **common)
    return read_movielens_1m(inter, items, sep=sep or "::", encoding=encoding or UTF8_OR_LATIN1,
                             header=header, **common)
