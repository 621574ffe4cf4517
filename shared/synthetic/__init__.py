"""The multi-site synthetic OMOP generator with a planted truth.

``generate_network(out_dir, n_sites=3, n_patients=30_000, seed=0, background_ratio=0.25,
chunk_size=100_000)`` writes::

    out_dir/truth.json                         the answer key (``Truth``)
    out_dir/sites/site_01/lake/<table>/        one Delta table per ``shared.omop.SCHEMAS``
    out_dir/sites/site_02/lake/...             (person, observation_period, visit_occurrence,
    ...                                         condition_occurrence, drug_exposure, death,
                                                concept)

Modules: ``model`` (planted parameters and sites), ``persons`` (per-person facts),
``events`` (records that make them true), ``writer`` (Arrow tables, Delta appends),
``answer_key`` (docs/cohort_rules.md on the per-person facts), ``breslow`` (a one-covariate
Cox fit), ``truth`` (truth.json), ``vocabulary`` (codes and concepts), ``days`` (dates),
``network`` (the entry point).
"""

from shared.synthetic.network import generate_network, site_lake
from shared.synthetic.truth import Truth

__all__ = ["Truth", "generate_network", "site_lake"]
