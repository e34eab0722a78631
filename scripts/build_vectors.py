#!/usr/bin/env python
"""Rebuild the calibrated vectors that ship with ifsteer (or build them for your own model).

    OMP_NUM_THREADS=1 python scripts/build_vectors.py --quick
    python scripts/build_vectors.py --model path/to/model --out my-vectors/

Seeded and resumable: rerun the same command to continue. Options: --help, and docs/shipped.md.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ifsteer.shipped.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
