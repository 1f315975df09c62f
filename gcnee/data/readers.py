"""Raw-data readers: one per format, and ``read_raw`` to dispatch on ``data.format``.

Every reader returns ``RawData``: ``Interactions`` (user and item ids as str, float ratings,
int64 timestamps), ``Items`` (a title for every item kept) and one ``FileReport`` per file read.

Defaults (``null`` in the config means the format's default; ``data.sep`` / ``data.encoding`` /
``data.header``, when set, apply to every file of the format):

| data.format    | interactions_file         | items_file               | users_file            |
|----------------|---------------------------|--------------------------|-----------------------|
| amazon         | the one other *.json[.gz] | the one meta_*.json[.gz] | -                     |
| bookcrossing   | BX-Book-Ratings.csv       | BX-Books.csv             | BX-Users.csv (if any) |
| movielens-100k | u.data                    | u.item                   | -                     |
| movielens-1m   | ratings.dat               | movies.dat               | -                     |
| recbole        | the one *.inter           | the one *.item           | -                     |

| data.format    | sep                            | encoding                            | header |
|----------------|--------------------------------|-------------------------------------|--------|
| amazon         | - (JSON / Python-literal lines)| utf-8                               | -      |
| bookcrossing   | ``;``, double-quoted           | utf-8, else latin-1                 | yes    |
| movielens-100k | tab (u.data), ``|`` (u.item)   | utf-8 (u.data); utf-8, else latin-1 | no     |
| movielens-1m   | ``::``                         | utf-8, else latin-1                 | no     |
| recbole        | tab                            | utf-8                               | typed  |

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


def _amazon_files(folder: Path, data_cfg: Any) -> tuple[Path, Path]:
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


def read_raw(data_cfg: Any, seed: int = 0) -> RawData:
    """Read the raw files ``data_cfg`` (the ``data`` config section) points at.

    ``seed`` fixes BookCrossing's stand-in order (other formats ignore it). Raises ``DataError``
    for a missing folder or file (naming the config key), ambiguous Amazon/RecBole files, or too
    many malformed lines; ``ConfigError``-like bad values are ``DataError`` naming the key.
    """
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
    common = {"missing_title": data_cfg.missing_title,
              "max_bad_fraction": float(data_cfg.max_bad_fraction)}
    sep, encoding, header = data_cfg.sep, data_cfg.encoding, data_cfg.header

    if fmt == "amazon":
        reviews, meta = _amazon_files(folder, data_cfg)
        return read_amazon(reviews, meta, encoding=encoding or "utf-8", **common)
    if fmt == "recbole":
        if header is False:
            raise DataError("data.header=false: RecBole atomic files always start with a typed "
                            "header (user_id:token ...); leave data.header null")
        inter, item = _recbole_files(folder, data_cfg)
        return read_recbole(inter, item, sep=sep or "\t", encoding=encoding or "utf-8", **common)

    d_inter, d_items, d_users = DEFAULT_FILES[fmt]
    inter = _named(folder, data_cfg.interactions_file, d_inter, "data.interactions_file", fmt)
    items = _named(folder, data_cfg.items_file, d_items, "data.items_file", fmt)
    if fmt == "bookcrossing":
        users = (_named(folder, data_cfg.users_file, None, "data.users_file", fmt)
                 if data_cfg.users_file is not None
                 else (folder / d_users if (folder / d_users).is_file() else None))
        return read_bookcrossing(
            inter, items, users, sep=sep or ";", encoding=encoding or UTF8_OR_LATIN1,
            header=True if header is None else header, keep_implicit=data_cfg.keep_implicit,
            seed=seed, **common)
    if fmt == "movielens-100k":
        return read_movielens_100k(inter, items, sep=sep, encoding=encoding,
                                   header=bool(header), **common)
    return read_movielens_1m(inter, items, sep=sep or "::", encoding=encoding or UTF8_OR_LATIN1,
                             header=bool(header), **common)
