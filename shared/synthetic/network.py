"""``generate_network``: a multi-site synthetic OMOP network with a planted truth.

Randomness: ``SeedSequence(seed)`` spawns one child for the site parameters and one per
site; a site's child spawns one per block of ``BLOCK_SIZE`` persons. A block is the unit
of randomness, a chunk (``chunk_size`` persons, whole blocks) the unit of writing, so the
tables depend on the seed and the network's size but not on ``chunk_size``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from shared.synthetic.answer_key import SiteCohortTally, apply_cohort_rules
from shared.synthetic.events import background_records, cud_records
from shared.synthetic.model import (
    AGE_REFERENCE,
    COVARIATES,
    PlantedModel,
    SiteParameters,
    site_parameters,
)
from shared.synthetic.persons import simulate_background_persons, simulate_cud_persons
from shared.synthetic.truth import (
    SiteTruth,
    Truth,
    crude_hazard_ratio,
    effect_in_treated,
    expected_cohort,
    network_cohort,
)
from shared.synthetic.writer import SiteLake, block_tables, person_ids

GENERATOR_VERSION = "1.0.0"
BLOCK_SIZE = 5_000
TRUTH_FILE = "truth.json"


def site_lake(out_dir: Path, site_id: str) -> Path:
    """Folder of a site's Delta tables: ``out_dir/sites/<site_id>/lake``."""
    return out_dir / "sites" / site_id / "lake"


def _blocks(total: int) -> list[int]:
    return [min(BLOCK_SIZE, total - start) for start in range(0, total, BLOCK_SIZE)]


def _generate_site(
    out_dir: Path,
    site: SiteParameters,
    model: PlantedModel,
    seed: np.random.SeedSequence,
    chunk_size: int,
) -> SiteCohortTally:
    """Write one site's tables block by block; return its answer-key tally."""
    cud_blocks, background_blocks = _blocks(site.n_cud), _blocks(site.n_background)
    seeds = seed.spawn(len(cud_blocks) + len(background_blocks))
    lake = SiteLake(site_lake(out_dir, site.site_id), chunk_size)
    tally = SiteCohortTally()
    first = 1
    for size, block_seed in zip(cud_blocks, seeds[: len(cud_blocks)], strict=True):
        rng = np.random.default_rng(block_seed)
        persons = simulate_cud_persons(rng, site, model, size)
        records = cud_records(rng, persons)
        tally.add(apply_cohort_rules(persons))
        ids = person_ids(site.number, first, size)
        observation = (persons.observation_start, persons.observation_end)
        lake.add(block_tables(ids, persons.demographics, observation, persons.death, records), size)
        first += size
    for size, block_seed in zip(background_blocks, seeds[len(cud_blocks) :], strict=True):
        rng = np.random.default_rng(block_seed)
        background = simulate_background_persons(rng, site, model, size)
        records = background_records(rng, background)
        ids = person_ids(site.number, first, size)
        observation = (background.observation_start, background.observation_end)
        lake.add(
            block_tables(ids, background.demographics, observation, background.death, records), size
        )
        first += size
    lake.close()
    return tally


def generate_network(
    out_dir: Path,
    *,
    n_sites: int = 3,
    n_patients: int = 30_000,
    seed: int = 0,
    background_ratio: float = 0.25,
    chunk_size: int = 100_000,
) -> Truth:
    """Write a synthetic OMOP network and its answer key; return the answer key.

    ``n_patients`` CUD patients (split 0.5/0.3/0.2 for three sites) plus
    ``background_ratio * n_patients`` persons without CUD. Each site's Delta tables go to
    ``out_dir/sites/<site_id>/lake/<table>``; the answer key to ``out_dir/truth.json``.
    """
    if n_sites < 1 or n_patients < 1 or background_ratio < 0 or chunk_size < 1:
        raise ValueError(
            f"generate_network needs n_sites >= 1, n_patients >= 1, background_ratio >= 0 and "
            f"chunk_size >= 1; got n_sites={n_sites}, n_patients={n_patients}, "
            f"background_ratio={background_ratio}, chunk_size={chunk_size}"
        )
    out_dir = Path(out_dir)
    model = PlantedModel()
    n_background = round(background_ratio * n_patients)
    parameters_seed, *site_seeds = np.random.SeedSequence(seed).spawn(1 + n_sites)
    sites = site_parameters(
        model, n_sites, n_patients, n_background, np.random.default_rng(parameters_seed)
    )
    tallies = {
        site.site_id: _generate_site(out_dir, site, model, site_seed, chunk_size)
        for site, site_seed in zip(sites, site_seeds, strict=True)
    }
    network, rows, site_of_row = network_cohort(tallies)
    truth = Truth(
        generator_version=GENERATOR_VERSION,
        seed=seed,
        n_sites=n_sites,
        n_patients=n_patients,
        n_background=n_background,
        background_ratio=background_ratio,
        block_size=BLOCK_SIZE,
        beta_treatment=model.beta_treatment,
        hr_conditional=model.hr_conditional,
        covariates=list(COVARIATES),
        age_reference=AGE_REFERENCE,
        delta=model.outcome_coefficients,
        propensity_coefficients=model.propensity_coefficients,
        anaesthesia_probability=model.anaesthesia_probability,
        edge_case_probabilities=model.edge_case_probabilities,
        sites={site.site_id: _site_truth(site) for site in sites},
        marginal_effect_in_treated=effect_in_treated(rows),
        marginal_effect_in_treated_by_site={
            site_id: effect_in_treated(tally.rows()) for site_id, tally in tallies.items()
        },
        expected_cohort={
            site_id: expected_cohort(tally.n_cud, tally.attrition, tally.rows())
            for site_id, tally in tallies.items()
        },
        expected_cohort_network=network,
        crude_hr=crude_hazard_ratio(rows, site_of_row),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRUTH_FILE).write_text(truth.to_json())
    return truth


def _site_truth(site: SiteParameters) -> SiteTruth:
    fields = asdict(site)
    fields.pop("number")
    white, black, asian, other = site.race_probabilities
    fields["race_probabilities"] = {"white": white, "black": black, "asian": asian, "other": other}
    return SiteTruth(lake=f"sites/{site.site_id}/lake", **fields)
