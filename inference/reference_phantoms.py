"""Synthetic normal reference libraries and no-prior query patients (tests and benchmarks only).

Built from inference.phantoms' chest radiographs: each person's anatomy comes from their own
patient ID, so every normal and every query is a different person. A normal is the lesion-free
prior of a "new_nodule" pair (repositioned: shift, rotation, scale; its own exposure and noise);
a query is that pair's current image (with a nodule of the given size) or, without a nodule,
the current of a "resolved_nodule" pair (lesion-free). Sex and birth date vary per person.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from .phantoms import PatientInfo, TruthRegion, make_chest_pair


@dataclass(frozen=True)
class Query:
    dataset: object  # pydicom Dataset
    nodule: TruthRegion | None  # None: a normal query


def _person(kind: str, i: int) -> PatientInfo:
    year = 1940 + (i * 7) % 50  # ages ~35..85 at the 2024 studies
    return PatientInfo(patient_id=f"{kind}{i:04d}", patient_name=f"{kind.title()}^Person{i}",
                       birth_date=f"{year}0{1 + i % 9}15", sex="MF"[i % 2], current_date=date(2024, 6, 1),
                       prior_date=date(2023, 6, 1), current_accession=f"{kind[:3]}{i:05d}C",
                       prior_accession=f"{kind[:3]}{i:05d}P")


def make_normal_library(n: int, size: int = 512, seed: int = 100) -> list:
    """`n` normal chest PA radiographs of `n` different people."""
    return [make_chest_pair(seed + i, "new_nodule", size, patient=_person("NORMAL", i)).prior for i in range(n)]


def make_query(i: int, nodule_mm: float | None, size: int = 512, seed: int = 9000) -> Query:
    """Query person `i` (never in a library from make_normal_library), with or without a nodule."""
    patient = _person("QUERY", i)
    if nodule_mm is None:
        pair = make_chest_pair(seed + i, "resolved_nodule", size, patient=patient)
        return Query(pair.current, None)
    pair = make_chest_pair(seed + i, "new_nodule", size, patient=patient, lesion_size_mm=nodule_mm)
    return Query(pair.current, pair.truth.regions[0])
