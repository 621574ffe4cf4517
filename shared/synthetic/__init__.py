"""The multi-site synthetic OMOP generator with a planted truth.

``generate_network(out_dir, n_sites=3, n_patients=30_000, seed=0, background_ratio=0.25,
chunk_size=100_000, antidepressant_ratio=0.12)`` writes::

    out_dir/truth.json                         the answer key (``Truth``)
    out_dir/sites/site_01/lake/<table>/        one Delta table per ``shared.omop.SCHEMAS``
    out_dir/sites/site_02/lake/...             (person, observation_period, visit_occurrence,
    ...                                         condition_occurrence, drug_exposure, death,
                                                concept)

Persons: ``n_patients`` CUD patients (comparison A, studies/ketamine_cud.yaml),
``background_ratio * n_patients`` persons without CUD, and ``antidepressant_ratio *
n_patients`` CUD patients with depression who start an antidepressant (comparison B1 of
the reference protocol; its ``comparisons`` entry in truth.json).

Modules: ``model`` (planted parameters and sites), ``persons`` (per-person facts),
``events`` (records that make them true), ``antidepressants`` (comparison B1's planted
comparators, their facts and records), ``writer`` (Arrow tables, Delta appends),
``answer_key`` (docs/cohort_rules.md on the per-person facts), ``breslow`` (a one-covariate
Cox fit), ``truth`` (truth.json), ``vocabulary`` (codes and concepts), ``days`` (dates),
``network`` (the entry point).
"""

from shared.synthetic.network import generate_network, site_lake
from shared.synthetic.truth import Truth

__all__ = ["Truth", "generate_network", "site_lake"]
