#!/usr/bin/env python
"""The prepared GPU check: ``python scripts/gpu_check.py [--tiny] [--out logs/gpu_check]
[--budget-s 480] [--parts load,lora_bf16,...]`` from the repository root (``gcnee bench gpu``
runs the same; what it measures: ``gcnee/bench/gpu.py``, docs/scale.md)."""

import sys
from pathlib import Path

# The repository's gcnee, also where the package is not installed (a copied checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gcnee.bench.gpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
