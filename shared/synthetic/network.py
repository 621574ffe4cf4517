"""``generate_network``: a multi-site synthetic OMOP network with a planted truth.

Randomness: ``SeedSequence(seed)`` spawns one child for the site parameters, one per
site, then one more per site for its antidepressant starters (``SeedSequence.spawn``
numbers its children, so the first ``1 + n_sites`` are those of generator 1.0, which had
no starters: the CUD and background persons did not change). A site's child spawns one
per block of ``BLOCK_SIZE`` persons, CUD then background; a site's starters child one per
block of starters. A block is the unit of randomness, a chunk (``chunk_size`` persons,
whole blocks) the unit of writing, so the tables depend on the seed and the network's
size but not on ``chunk_size``.

Person ids at a site: CUD patients, background persons, then antidepressant starters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.synthetic.answer_key import (
    RESTRICTED_RULES,
    SiteCohortTally,
    apply_antidepressant_rules,
    apply_antidepressant_rules_to_starters,
    apply_cohort_rules,
    apply_cohort_rules_to_starters,
)
from shared.synthetic.antidepressants import (
    AntidepressantStarters,
    antidepressant_records,
    simulate_antidepressant_starters,
)
from shared.synthetic.events import BlockRecords, background_records, cud_records
from shared.synthetic.model import (
    AGE_REFERENCE,
    COVARIATES,
    PlantedModel,
    SiteParameters,
    site_parameters,
)
from shared.synthetic.persons import (
    BackgroundPersons,
    CudPersons,
    simulate_background_persons,
    simulate_cud_persons,
)
from shared.synthetic.truth import (
    ComparisonTruth,
    SiteTruth,
    Truth,
    crude_hazard_ratio,
    effect_in_treated,
    expected_cohort,
    network_cohort,
)
from shared.synthetic.vocabulary import ANTIDEPRESSANTS
from shared.synthetic.writer import SiteLake, block_tables, person_ids

GENERATOR_VERSION = "1.1.0"  # 1.1: antidepressant starters (comparison B1)
BLOCK_SIZE = 5_000
TRUTH_FILE = "truth.json"
ANTIDEPRESSANT_RATIO = 0.12  # antidepressant starters per CUD patient (comparison B1)

_Persons = CudPersons | BackgroundPersons | AntidepressantStarters


def site_lake(out_dir: Path, site_id: str) -> Path:
    """Folder of a site's Delta tables: ``out_dir/sites/<site_id>/lake``."""
    return out_dir / "sites" / site_id / "lake"


def _blocks(total: int) -> list[int]:
    return [min(BLOCK_SIZE, total - start) for start in range(0, total, BLOCK_SIZE)]


@dataclass
class _SiteWriter:
    """One site's lake, the answer keys of both comparisons, and the next person number."""

    lake: SiteLake
    site: SiteParameters
    model: PlantedModel
    vs_anaesthetics: SiteCohortTally = field(default_factory=SiteCohortTally)
    vs_antidepressants: SiteCohortTally = field(
        default_factory=lambda: SiteCohortTally(rules=RESTRICTED_RULES)
    )
    first: int = 1

    def write(self, persons: _Persons, records: BlockRecords) -> None:
        """Append one block's tables, its persons numbered after the previous blocks'."""
        size = len(persons.observation_start)
        ids = person_ids(self.site.number, self.first, size)
        observation = (persons.observation_start, persons.observation_end)
        tables = block_tables(ids, persons.demographics, observation, persons.death, records)
        self.lake.add(tables, size)
        self.first += size


def _write_cud_block(writer: _SiteWriter, rng: np.random.Generator, size: int) -> None:
    persons = simulate_cud_persons(rng, writer.site, writer.model, size)
    records = cud_records(rng, persons)
    writer.vs_anaesthetics.add(apply_cohort_rules(persons))
    writer.vs_antidepressants.add(apply_antidepressant_rules(persons, records.conditions))
    writer.write(persons, records)


def _write_background_block(writer: _SiteWriter, rng: np.random.Generator, size: int) -> None:
    background = simulate_background_persons(rng, writer.site, writer.model, size)
    writer.write(background, background_records(rng, background))


def _write_starters_block(writer: _SiteWriter, rng: np.random.Generator, size: int) -> None:
    starters = simulate_antidepressant_starters(rng, writer.site, writer.model, size)
    records = antidepressant_records(rng, starters)
    writer.vs_anaesthetics.add(apply_cohort_rules_to_starters(starters))
    writer.vs_antidepressants.add(
        apply_antidepressant_rules_to_starters(starters, records.conditions)
    )
    writer.write(starters, records)


def _generate_site(
    out_dir: Path,
    site: SiteParameters,
    model: PlantedModel,
    seeds: tuple[np.random.SeedSequence, np.random.SeedSequence],
    chunk_size: int,
) -> _SiteWriter:
    """Write one site's tables block by block; return its writer with both answer keys.

    ``seeds``: the site's child (CUD and background blocks) and its starters' child.
    """
    site_seed, starters_seed = seeds
    cud_blocks, background_blocks = _blocks(site.n_cud), _blocks(site.n_background)
    block_seeds = site_seed.spawn(len(cud_blocks) + len(background_blocks))
    starter_blocks = _blocks(site.n_antidepressant)
    writer = _SiteWriter(SiteLake(site_lake(out_dir, site.site_id), chunk_size), site, model)
    for size, block_seed in zip(cud_blocks, block_seeds[: len(cud_blocks)], strict=True):
        _write_cud_block(writer, np.random.default_rng(block_seed), size)
    for size, block_seed in zip(background_blocks, block_seeds[len(cud_blocks) :], strict=True):
        _write_background_block(writer, np.random.default_rng(block_seed), size)
    for size, block_seed in zip(
        starter_blocks, starters_seed.spawn(len(starter_blocks)), strict=True
    ):
        _write_starters_block(writer, np.random.default_rng(block_seed), size)
    writer.lake.close()
    return writer


def generate_network(
    out_dir: Path,
    *,
    n_sites: int = 3,
    n_patients: int = 30_000,
    seed: int = 0,
    background_ratio: float = 0.25,
    chunk_size: int = 100_000,
    antidepressant_ratio: float = ANTIDEPRESSANT_RATIO,
) -> Truth:
    """Write a synthetic OMOP network and its answer key; return the answer key.

    ``n_patients`` CUD patients (split 0.5/0.3/0.2 for three sites) plus
    ``background_ratio * n_patients`` persons without CUD, plus ``antidepressant_ratio *
    n_patients`` CUD patients with depression who start an antidepressant (comparison
    B1's comparators, ``antidepressants.py``). Each site's Delta tables go to
    ``out_dir/sites/<site_id>/lake/<table>``; the answer key to ``out_dir/truth.json``.
    """
    if (
        n_sites < 1
        or n_patients < 1
        or background_ratio < 0
        or antidepressant_ratio < 0
        or chunk_size < 1
    ):
        raise ValueError(
            f"generate_network needs n_sites >= 1, n_patients >= 1, background_ratio >= 0, "
            f"antidepressant_ratio >= 0 and chunk_size >= 1; got n_sites={n_sites}, "
            f"n_patients={n_patients}, background_ratio={background_ratio}, "
            f"antidepressant_ratio={antidepressant_ratio}, chunk_size={chunk_size}"
        )
    out_dir = Path(out_dir)
    model = PlantedModel()
    n_background = round(background_ratio * n_patients)
    n_antidepressant = round(antidepressant_ratio * n_patients)
    parameters_seed, *children = np.random.SeedSequence(seed).spawn(1 + 2 * n_sites)
    site_seeds, starters_seeds = children[:n_sites], children[n_sites:]
    sites = site_parameters(
        model,
        n_sites,
        n_patients,
        n_background,
        np.random.default_rng(parameters_seed),
        n_antidepressant,
    )
    writers = [
        _generate_site(out_dir, site, model, seeds, chunk_size)
        for site, seeds in zip(sites, zip(site_seeds, starters_seeds, strict=True), strict=True)
    ]
    truth = Truth(
        generator_version=GENERATOR_VERSION,
        seed=seed,
        n_sites=n_sites,
        n_patients=n_patients,
        n_background=n_background,
        background_ratio=background_ratio,
        n_antidepressant=n_antidepressant,
        antidepressant_ratio=antidepressant_ratio,
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
        **_cohort_truth({w.site.site_id: w.vs_anaesthetics for w in writers}),
        comparisons={
            "vs_antidepressants": _antidepressant_truth(
                model, {w.site.site_id: w.vs_antidepressants for w in writers}
            )
        },
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRUTH_FILE).write_text(truth.to_json())
    return truth


def _antidepressant_truth(
    model: PlantedModel, tallies: dict[str, SiteCohortTally]
) -> ComparisonTruth:
    """Comparison B1's planted HR and expected cohorts (per site and network)."""
    _, rows, _ = network_cohort(tallies)
    missing = rows.covariates[:, COVARIATES.index("depression")] == 0
    return ComparisonTruth(
        comparison_id="vs_antidepressants",
        exposure="ketamine (RxNorm 6130)",
        comparator=", ".join(f"{c.name} ({c.code})" for c in ANTIDEPRESSANTS),
        restriction="depression (ICD-10-CM F32.*, F33.*) on or before index",
        beta_treatment=model.beta_treatment,
        hr_conditional=model.hr_conditional,
        without_depression_in_window={
            "exposed": int((missing & rows.exposed).sum()),
            "comparator": int((missing & ~rows.exposed).sum()),
        },
        **_cohort_truth(tallies),
    )


def _cohort_truth(tallies: dict[str, SiteCohortTally]) -> dict[str, Any]:
    """A comparison's answer key from its per-site tallies: the marginal effect in the
    treated (network and per site), the expected cohort (per site and network), crude HR."""
    network, rows, site_of_row = network_cohort(tallies)
    return {
        "marginal_effect_in_treated": effect_in_treated(rows),
        "marginal_effect_in_treated_by_site": {
            site_id: effect_in_treated(tally.rows()) for site_id, tally in tallies.items()
        },
        "expected_cohort": {
            site_id: expected_cohort(tally.n_cud, tally.attrition, tally.rows())
            for site_id, tally in tallies.items()
        },
        "expected_cohort_network": network,
        "crude_hr": crude_hazard_ratio(rows, site_of_row),
    }


def _site_truth(site: SiteParameters) -> SiteTruth:
    fields = asdict(site)
    fields.pop("number")
    white, black, asian, other = site.race_probabilities
    fields["race_probabilities"] = {"white": white, "black": black, "asian": asian, "other": other}
    return SiteTruth(lake=f"sites/{site.site_id}/lake", **fields)
