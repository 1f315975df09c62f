"""Amazon review data (2014 and 2018 releases): reviews and metadata as JSON / Python lines."""

from __future__ import annotations

import ast
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gcnee.data.errors import DataError, DataWarning
from gcnee.data.readers_common import (
    Columns,
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

REVIEW_FIELDS = ("reviewerID", "asin", "overall", "unixReviewTime")


def iter_records(path: Path, report: LineReport, encoding: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` per line that parses as a JSON object or a Python dict literal.

    Strict JSON is tried first (the 2018 release); a line that is not JSON is tried as a Python
    literal (the 2014 release's metadata, written with ``str(dict)``). Other lines are skipped and
    counted in ``report``: "undecodable bytes", "bad json" or "not an object".
    """
    decode = decoder(encoding)
    # JSONDecoder.raw_decode skips json.loads' per-call overhead (type and encoding checks)
    raw_decode = json.JSONDecoder().raw_decode
    for lineno, raw in iter_lines(path, progress=True):
        report.lines += 1
        try:
            text = decode(raw).strip()
        except UnicodeDecodeError:
            report.skip(lineno, "undecodable bytes")
            continue
        try:
            obj, end = raw_decode(text)
            if end != len(text):
                raise ValueError("trailing text")
        except ValueError:
            try:
                obj = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                report.skip(lineno, "bad json")
                continue
        if not isinstance(obj, dict):
            report.skip(lineno, "not an object")
            continue
        yield lineno, obj


def _text(value: Any) -> str:
    return value.strip() if type(value) is str else str(value).strip()


def read_amazon(
    reviews_path: str | Path,
    meta_path: str | Path | None,
    *,
    encoding: str = "utf-8",
    missing_title: str = "drop",
    max_bad_fraction: float = 0.01,
    reviews_key: str = "data.interactions_file",
    meta_key: str = "data.items_file",
) -> RawData:
    """Read Amazon reviews (``reviewerID, asin, overall, unixReviewTime``) and item titles.

    Both files are JSON lines or the 2014 release's Python-literal lines, plain or gzipped.
    Titles are cleaned (HTML tags and entities, whitespace); an empty title, or an item with no
    metadata row, counts as missing (``missing_title``). With duplicate metadata rows for an
    ``asin`` the first non-empty title wins. ``*_key`` name the config keys in error messages.

    ``meta_path=None`` (no metadata file) needs ``missing_title="id"``: every item is titled
    by its ASIN, and a ``DataWarning`` says that prompts then carry no titles.
    """
    reviews_path = require_file(Path(reviews_path), reviews_key)
    if meta_path is None and missing_title != "id":
        raise DataError(f"{meta_key}: no metadata file given; prompts need item titles "
                        "(set data.missing_title=id to title items by their ASIN)")
    if meta_path is not None:
        meta_path = require_file(Path(meta_path), meta_key)
    cols = Columns()
    report = LineReport(reviews_path, max_bad_fraction)
    for lineno, obj in iter_records(reviews_path, report, encoding):
        try:
            user, item = obj["reviewerID"], obj["asin"]
            rating, stamp = obj["overall"], obj["unixReviewTime"]
        except KeyError:
            report.skip(lineno, "missing field")
            continue
        rating = parse_rating(rating)
        if rating is None:
            report.skip(lineno, "bad rating")
            continue
        stamp = parse_timestamp(stamp)
        if stamp is None:
            report.skip(lineno, "bad timestamp")
            continue
        user, item = _text(user), _text(item)
        if not user or not item:
            report.skip(lineno, "missing field")
            continue
        cols.add(user, item, rating, stamp)
    files = [report.finish()]

    wanted = set(cols.item)  # keep titles of reviewed items only: metadata files are large
    titles: dict[str, str] = {}
    if meta_path is None:
        warnings.warn(
            f"no Amazon metadata file beside {reviews_path.name}: the {len(wanted):,} items are "
            "titled by their ASIN (data.missing_title=id), so prompts carry item ids, not "
            "titles; the LLM's accuracy depends on titles (get meta_<Category>.json.gz from "
            "https://nijianmo.github.io/amazon/)", DataWarning, stacklevel=2)
        return finish(cols, titles, missing_title, files, source=reviews_key)
    meta_report = LineReport(meta_path, max_bad_fraction)
    for lineno, obj in iter_records(meta_path, meta_report, encoding):
        asin = obj.get("asin")
        if asin is None:
            meta_report.skip(lineno, "missing field")
            continue
        asin = _text(asin)
        if asin in wanted and not titles.get(asin):
            titles[asin] = clean_title(obj.get("title"), strip_tags=True)
    files.append(meta_report.finish())
    return finish(cols, titles, missing_title, files, source=reviews_key)
