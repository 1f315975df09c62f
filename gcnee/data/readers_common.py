"""Shared pieces of the raw-data readers: reports, line streaming, decoding, title cleanup.

The format readers live in ``readers_amazon`` and ``readers_tabular``; ``gcnee.data.readers`` is
the public entry point and documents the formats and their defaults.
"""

from __future__ import annotations

import gzip
import html
import io
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gcnee.data.errors import DataError
from gcnee.data.tables import Interactions, Items

MISSING_TITLE_MODES = ("drop", "id")
FIRST_BAD = 5  # line numbers of skipped lines kept per file
# Encoding value meaning "UTF-8 where the line is valid UTF-8, otherwise latin-1" (see readers.py)
UTF8_OR_LATIN1 = "utf-8|latin-1"


@dataclass
class FileReport:
    """What reading one file gave: data lines, skipped (malformed) lines and why.

    ``lines`` counts non-blank data lines (a header line is not counted); ``bad`` of them were
    skipped as malformed, ``reasons`` maps reason -> count and ``first_bad`` holds the 1-based
    physical line numbers of the first few. ``excluded`` counts well-formed lines left out on
    purpose (e.g. BookCrossing's implicit ratings); they are not part of ``bad``. ``repaired``
    counts kept lines whose quoting had to be repaired, by repair; ``header`` records whether the
    first line was taken as a header and how that was decided (``data.header`` or detected).
    """

    path: str
    lines: int
    bad: int
    reasons: dict[str, int]
    first_bad: list[int]
    excluded: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)


@dataclass
class RawData:
    """The interactions and titles a reader produced, with per-file reports.

    ``interactions`` are after title handling (``data.missing_title``); ``items`` has a title for
    every item in ``interactions`` and nothing else. ``*_before`` count what was read (malformed
    and excluded lines already gone) before items without a title were dropped.
    ``items_without_title`` counts distinct read items with no usable title (no metadata row, or
    an empty title), whichever mode is used.
    """

    interactions: Interactions
    items: Items
    files: list[FileReport]
    items_without_title: int
    users_before: int
    items_before: int
    interactions_before: int

    def summary(self) -> dict[str, Any]:
        """JSON-able counts (no arrays)."""
        return {
            "users_before": self.users_before, "items_before": self.items_before,
            "interactions_before": self.interactions_before,
            "items_without_title": self.items_without_title,
            "interactions": len(self.interactions), "items": len(self.items),
            "files": [asdict(f) for f in self.files],
        }


class LineReport:
    """Collects counts for one file while it streams; ``finish`` applies the bad-line limit."""

    def __init__(self, path: Path, max_bad_fraction: float,
                 header: dict[str, Any] | None = None) -> None:
        self.path = path
        self.header = dict(header or {})
        self.repaired: dict[str, int] = {}
        self.max_bad_fraction = max_bad_fraction
        self.lines = 0
        self.bad = 0
        self.reasons: dict[str, int] = {}
        self.first_bad: list[int] = []
        self.excluded: dict[str, int] = {}

    def skip(self, lineno: int, reason: str) -> None:
        self.bad += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.first_bad) < FIRST_BAD:
            self.first_bad.append(lineno)

    def exclude(self, reason: str) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + 1

    def repair(self, what: str) -> None:
        self.repaired[what] = self.repaired.get(what, 0) + 1

    def finish(self) -> FileReport:
        report = FileReport(str(self.path), self.lines, self.bad, dict(self.reasons),
                            list(self.first_bad), dict(self.excluded), dict(self.repaired),
                            dict(self.header))
        if self.lines and self.bad / self.lines > self.max_bad_fraction:
            err = DataError(
                f"{self.path}: {self.bad} of {self.lines} lines "
                f"({100 * self.bad / self.lines:.1f}%) are malformed, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}. {describe(report)}. Check that "
                "data.format / data.sep / data.encoding fit the file, or raise "
                "data.max_bad_fraction to skip them."
            )
            err.report = report  # type: ignore[attr-defined]
            raise err
        return report


def describe(report: FileReport) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in report.reasons.items()) or "none"
    first = ", ".join(map(str, report.first_bad)) or "-"
    return f"Reasons: {reasons}; first skipped lines: {first}"


def require_file(path: Path, key: str) -> Path:
    """``path`` if it is a file, else a ``DataError`` naming it and the config key behind it."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise DataError(f"{key}: file {what}: {path}")
    return path


def open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, gunzipped when it starts with the gzip magic number (any suffix)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        # a BufferedReader over GzipFile makes line iteration several times faster
        return io.BufferedReader(gzip.open(path, "rb"), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def iter_lines(path: Path, progress: bool = False) -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, line bytes without the line end)`` for non-blank lines.

    ``progress``: plain progress lines while a slow read goes on (``gcnee.progress``; a read
    shorter than the line interval prints nothing).
    """
    log = None
    if progress:
        from gcnee.progress import ProgressLog

        size = None if _is_gzip(path) else max(1, path.stat().st_size // 1_000_000)
        log = ProgressLog(f"data: reading {path.name}", size, "MB" if size else "line",
                          only_if_slow=True)
    done = 0
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            done += len(raw)
            if log is not None and not lineno % 20_000:
                log.update(count=done // 1_000_000 if log.total else lineno)
            raw = raw.rstrip(b"\r\n")
            if raw and not raw.isspace():
                yield lineno, raw
    if log is not None:
        log.done()


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def decoder(encoding: str):
    """``bytes -> str`` for ``encoding``; raises ``UnicodeDecodeError`` on undecodable bytes.

    ``UTF8_OR_LATIN1`` decodes each line as UTF-8 when it is valid UTF-8 and as latin-1
    otherwise: latin-1 files decode as latin-1, and UTF-8 text that was stored inside a latin-1
    file (BookCrossing's "Ã©" for "é") comes out repaired.
    """
    if encoding == UTF8_OR_LATIN1:
        def decode(raw: bytes) -> str:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")
        return decode
    try:
        "".encode(encoding)
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
    return lambda raw: raw.decode(encoding)


_TAG = re.compile(r"<[^<>]*>")
_SPACE = re.compile(r"\s+")


def clean_title(title: Any, strip_tags: bool = False) -> str:
    """A title with HTML entities decoded, whitespace collapsed (and tags removed if asked).

    Returns "" for a missing or non-string title, which the caller counts as missing.
    """
    if isinstance(title, list):  # a few metadata rows carry the title as a list of strings
        title = " ".join(t for t in title if isinstance(t, str))
    if not isinstance(title, str):
        return ""
    if strip_tags and "<" in title:
        title = _TAG.sub(" ", title)
    if "&" in title:
        title = html.unescape(title)
    return _SPACE.sub(" ", title).strip()


def parse_rating(text: str) -> float | None:
    """The rating as a finite float, or None when it is not a number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_timestamp(text: Any) -> int | None:
    """Seconds as int (``"881250949"``, ``"881250949.0"``, 881250949), or None."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return int(value) if math.isfinite(value) else None


class Columns:
    """Growing interaction columns (plain lists: cheap appends while streaming)."""

    def __init__(self) -> None:
        self.user: list[str] = []
        self.item: list[str] = []
        self.rating: list[float] = []
        self.timestamp: list[int] = []

    def add(self, user: str, item: str, rating: float, timestamp: int) -> None:
        self.user.append(user)
        self.item.append(item)
        self.rating.append(rating)
        self.timestamp.append(timestamp)

    def __len__(self) -> int:
        return len(self.user)


def finish(cols: Columns, titles: dict[str, str], missing_title: str, files: list[FileReport],
           extra: dict[str, dict[str, Any]] | None = None, source: str = "data.path") -> RawData:
    """Apply ``data.missing_title`` and build ``RawData``.

    ``titles`` maps item -> cleaned title ("" or absent = missing). Only items that occur in
    ``cols`` end up in ``RawData.items``.
    """
    if missing_title not in MISSING_TITLE_MODES:
        raise DataError(f"data.missing_title must be one of {', '.join(MISSING_TITLE_MODES)}, "
                        f"got {missing_title!r}")
    if not len(cols):
        paths = ", ".join(f.path for f in files)
        raise DataError(f"{source}: no interactions read from {paths}")
    read_items = set(cols.item)
    untitled = {i for i in read_items if not titles.get(i)}
    users_before = len(set(cols.user))
    n_before = len(cols)
    user, item, rating, timestamp = cols.user, cols.item, cols.rating, cols.timestamp
    if untitled and missing_title == "drop":
        keep = [i for i, it in enumerate(item) if it not in untitled]
        user = [user[i] for i in keep]
        item = [item[i] for i in keep]
        rating = [rating[i] for i in keep]
        timestamp = [timestamp[i] for i in keep]
        if not item:
            raise DataError(f"{source}: none of the {len(read_items)} items read has a title, "
                            "so data.missing_title=drop left no interactions (try "
                            "data.missing_title=id, or check data.items_file)")
    kept = read_items - untitled if missing_title == "drop" else read_items
    item_titles = {i: (titles.get(i) or i) for i in sorted(kept)}
    item_extra = {i: extra[i] for i in item_titles if extra and i in extra}
    inter = Interactions(np.array(user, dtype=str), np.array(item, dtype=str),
                         np.array(rating, dtype=np.float32), np.array(timestamp, dtype=np.int64))
    return RawData(inter, Items(item_titles, item_extra), files, len(untitled), users_before,
                   len(read_items), n_before)
