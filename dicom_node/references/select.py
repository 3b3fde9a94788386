"""Which normal references a query is compared against: pure functions, each choice explained.

Rules, in order (the first that leaves nothing is the reason printed for single-image mode):
1. same modality group (CR/DX/DR/RG are one: radiographs), same body region, same view;
   a paired body part's laterality must match (unpaired: U, B or empty are all the same);
2. the thumbnail descriptor must be of the kind the query's was computed with;
3. the nearest by distance = (1 - descriptor NCC) + SEX_WEIGHT if both sexes are known and
   differ + AGE_WEIGHT per decade between age bands (an unknown band counts one decade); the
   descriptor is the vision encoder's embedding where the query and the reference have one of the
   same kind (the same model and weights, encoder.py), the thumbnail otherwise;
4. the first `count`, nearest first; ties by SOP Instance UID (the same library always gives
   the same choice).
"""

from __future__ import annotations

from dataclasses import dataclass

from .library import ReferenceRecord

XR_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
BODY_REGIONS = {"THORAX": "CHEST", "LUNG": "CHEST", "CHEST": "CHEST"}
SEX_WEIGHT = 0.10
AGE_WEIGHT = 0.05


@dataclass(frozen=True)
class ReferenceQuery:
    modality: str
    body_part: str
    view: str
    laterality: str
    sex: str
    age_band: str
    descriptor_kind: str
    descriptor: tuple[float, ...]
    encoder_kind: str = ""
    encoder_descriptor: tuple[float, ...] = ()


@dataclass(frozen=True)
class ReferenceChoice:
    record: ReferenceRecord
    rank: int
    distance: float
    similarity: float
    why: str


@dataclass(frozen=True)
class ReferenceSelection:
    chosen: list[ReferenceChoice]
    reason: str  # why nothing matched (single-image mode), or how many candidates there were


def query_for(image, header: dict, encoder=None) -> ReferenceQuery:
    """The query's selection keys from its ImageInput and a few header attributes
    (PatientSex, PatientAge, PatientBirthDate, StudyDate as strings); `encoder` (encoder.encoder_for)
    adds the vision encoder's descriptor."""
    from pydicom.dataset import Dataset

    from inference.references import DESCRIPTOR_KIND, descriptor

    from ..priors.rules import normalise_laterality, normalise_view
    from .library import _age_band

    ds = Dataset()
    for key in ("PatientAge", "PatientBirthDate", "StudyDate"):
        if header.get(key):
            setattr(ds, key, str(header[key]))
    sex = str(header.get("PatientSex", "") or "").upper()
    return ReferenceQuery(
        modality=image.modality.upper(), body_part=image.body_part.upper(), view=normalise_view(image.view),
        laterality=normalise_laterality(image.laterality), sex=sex if sex in ("M", "F", "O") else "",
        age_band=_age_band(ds), descriptor_kind=DESCRIPTOR_KIND,
        descriptor=tuple(float(v) for v in descriptor(image)),
        encoder_kind=encoder.kind if encoder is not None else "",
        encoder_descriptor=tuple(float(v) for v in encoder(image)) if encoder is not None else ())


def modality_group(modality: str) -> str:
    modality = modality.upper()
    return "XR" if modality in XR_MODALITIES else modality


def body_region(body_part: str) -> str:
    body_part = body_part.upper().replace(" ", "")
    return BODY_REGIONS.get(body_part, body_part)


def select_references(records: list[ReferenceRecord], query: ReferenceQuery, count: int) -> ReferenceSelection:
    from inference.references import descriptor_similarity

    if not records:
        return ReferenceSelection([], "the reference library is empty")
    qmod, qbody = modality_group(query.modality), body_region(query.body_part)
    same = [r for r in records if modality_group(r.modality) == qmod]
    if not same:
        return ReferenceSelection([], f"no reference of modality {query.modality} ({len(records)} in the library)")
    same_body = [r for r in same if body_region(r.body_part) == qbody]
    if not same_body:
        return ReferenceSelection([], f"no {query.modality} reference of body part {query.body_part or '(none)'}")
    same_view = [r for r in same_body if r.view == query.view]
    if not same_view:
        views = sorted({r.view or "(none)" for r in same_body})
        return ReferenceSelection([], f"no {query.modality} {qbody} reference of view {query.view or '(none)'} "
                                      f"(the library has {', '.join(views)})")
    same_side = [r for r in same_view if r.laterality == query.laterality]
    if not same_side:
        return ReferenceSelection([], f"no {query.modality} {qbody} {query.view} reference of laterality "
                                      f"{query.laterality or '(unpaired)'}")
    kind = [r for r in same_side if r.descriptor_kind == query.descriptor_kind]
    if not kind:
        return ReferenceSelection([], f"no reference descriptor of kind {query.descriptor_kind}: re-import the library")
    scored = []
    for r in kind:
        by_encoder = bool(query.encoder_kind) and r.encoder_kind == query.encoder_kind
        sim = (descriptor_similarity(query.encoder_descriptor, r.encoder_descriptor) if by_encoder
               else descriptor_similarity(query.descriptor, r.descriptor))
        dist = (1.0 - sim) + _sex_term(query.sex, r.sex) + AGE_WEIGHT * _decades(query.age_band, r.age_band)
        scored.append((dist, r.sop_instance_uid, sim, by_encoder, r))
    scored.sort(key=lambda t: (t[0], t[1]))
    chosen = []
    n = len(scored)
    for rank, (dist, _, sim, by_encoder, r) in enumerate(scored[:count], 1):
        chosen.append(ReferenceChoice(r, rank, round(dist, 4), round(sim, 4), _why(query, r, sim, by_encoder, rank, n)))
    return ReferenceSelection(chosen, f"{n} matching reference(s) of {query.modality} {qbody} {query.view}")


def _sex_term(a: str, b: str) -> float:
    return SEX_WEIGHT if a in ("M", "F") and b in ("M", "F") and a != b else 0.0


def _decades(a: str, b: str) -> float:
    if not a or not b:
        return 1.0
    return abs(int(a.split("-")[0]) - int(b.split("-")[0])) / 10


def _why(q: ReferenceQuery, r: ReferenceRecord, sim: float, by_encoder: bool, rank: int, n: int) -> str:
    side = f" {r.laterality}" if r.laterality else ""
    if q.sex and r.sex:
        sex = f"sex {r.sex} {'matches' if q.sex == r.sex else f'differs (query {q.sex})'}"
    else:
        sex = f"sex {r.sex or 'unknown'} (query {q.sex or 'unknown'})"
    return (f"same {r.modality} {r.body_part} {r.view}{side}; {sex}; age {r.age_band or 'unknown'} "
            f"(query {q.age_band or 'unknown'}); {_similarity_name(q, by_encoder)} similarity {sim:.2f}; rank {rank} of {n}")


def _similarity_name(q: ReferenceQuery, by_encoder: bool) -> str:
    if by_encoder:
        return f"vision-encoder ({q.encoder_kind.split(':')[1]})"
    return "thumbnail" if not q.encoder_kind else f"thumbnail (no {q.encoder_kind.split(':')[1]} embedding stored)"
