"""The differencing guard: no two study cohorts at a site may differ by a handful of persons.

Two releases about cohorts that differ by one person (say, one study with and one without
a rare exclusion) describe that person by subtraction, however large each cohort is. So
the site keeps, per study comparison (its resolved study id ``STUDY__COMPARISON``, the key
of its analysis dataset), the sorted person ids of its final cohort, in its own workdir:
they never leave the site. A new cohort whose symmetric difference with any earlier
study's cohort holds 1 to ``min_cell_count - 1`` persons is refused before anything is
computed, naming the earlier study, never the persons or their number.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from shared.errors import DisclosureRefused

_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class CohortRegistry:
    """Sorted person ids of each study's cohort at this site, kept under ``folder``."""

    def __init__(self, folder: Path, site_id: str) -> None:
        self._folder = folder
        self._site_id = site_id
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, study_key: str) -> Path:
        return self._folder / f"{_SAFE.sub('_', study_key)}.npy"

    def _earlier(self, study_key: str) -> list[tuple[str, NDArray[np.int64]]]:
        own = self._path(study_key)
        return [
            (path.stem, np.load(path)) for path in sorted(self._folder.glob("*.npy")) if path != own
        ]

    def check_and_record(self, study_key: str, person_ids: NDArray[np.int64], min_cell_count: int) -> None:
        """Refuse ``study_key`` when its cohort differs from an earlier one by 1 to ``min_cell_count - 1``
        persons; otherwise keep its person ids (replacing those of its own earlier build)."""
        cohort = np.unique(np.asarray(person_ids, dtype=np.int64))
        with self._lock:
            for earlier_key, earlier in self._earlier(study_key):
                differing = np.setxor1d(cohort, earlier, assume_unique=True).size
                if 0 < differing < min_cell_count:
                    raise DisclosureRefused(
                        f"site {self._site_id!r} refused study {study_key!r}: its cohort differs from the "
                        f"cohort of earlier study {earlier_key!r} at this site by fewer persons than the "
                        f"site's minimum cell count {min_cell_count}, so comparing the two would describe "
                        f"those persons. Fix: change the cohort definition so that the cohorts are equal "
                        f"or differ by at least {min_cell_count} persons."
                    )
            partial = self._path(study_key).with_suffix(".partial.npy")
            np.save(partial, cohort)
            partial.replace(self._path(study_key))
