"""Where the two real OMOP exports are (../shared/data/omop next to the checkout).

A clean clone may live elsewhere (CI clones to a temporary folder), so the well-known
locations are tried in order; ``FEDRWE_OMOP_SAMPLES`` overrides them.
"""

from __future__ import annotations

import os
from pathlib import Path


def omop_samples() -> Path:
    """The folder holding ``mimic_iv_demo/`` and ``synthea27nj/``; a clear error if none is found."""
    candidates = [
        *([Path(os.environ["FEDRWE_OMOP_SAMPLES"])] if os.environ.get("FEDRWE_OMOP_SAMPLES") else []),
        Path(__file__).resolve().parents[2] / "shared" / "data" / "omop",
        Path("/work/shared/data/omop"),
    ]
    for candidate in candidates:
        if (candidate / "synthea27nj").is_dir() and (candidate / "mimic_iv_demo").is_dir():
            return candidate
    raise FileNotFoundError(
        f"the OMOP samples are not in any of {[str(c) for c in candidates]}. Fix: set "
        f"FEDRWE_OMOP_SAMPLES to the folder holding mimic_iv_demo/ and synthea27nj/."
    )


SAMPLES = omop_samples()
