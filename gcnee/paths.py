"""Paths written into output files: relative, so that a run folder still works once moved.

A run folder (``<checkpoints_dir>/<run>``) is copied between machines and file systems; an
absolute path stored in one of its files would keep pointing at the old place. Writers store
``portable(path, run_dir)``: relative to the run folder when the path lies inside it, else
relative to the working directory when it lies there, else (a file elsewhere, such as a model
on another disk) absolute. Readers turn it back with ``resolve(stored, run_dir)``.
"""

from __future__ import annotations

import os
from pathlib import Path


def _inside(path: Path, base: Path) -> str | None:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return None


def portable(path: str | Path, run_dir: str | Path) -> str:
    """``path`` as stored in an output file of ``run_dir`` (see the module docstring)."""
    if not str(path):
        return ""
    p = Path(os.path.abspath(path))
    for base in (Path(os.path.abspath(run_dir)), Path.cwd()):
        rel = _inside(p, base)
        if rel is not None:
            return rel or "."
    return p.as_posix()


def resolve(stored: str | Path, run_dir: str | Path) -> Path:
    """The file a ``portable`` path names: absolute as is; relative to ``run_dir`` when it
    exists there, else relative to the working directory."""
    p = Path(stored)
    if p.is_absolute():
        return p
    in_run = Path(run_dir) / p
    return in_run if in_run.exists() or not p.exists() else p
