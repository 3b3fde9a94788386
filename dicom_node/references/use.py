"""Selected references as analysis inputs: the ImageInput of each and the ReferenceUse naming it."""

from __future__ import annotations

from .library import Library
from .select import ReferenceSelection


def load_references(library: Library, selection: ReferenceSelection):
    from inference.pixels import load_image
    from inference.types import ReferenceUse

    images, uses = [], []
    for choice in selection.chosen:
        r = choice.record
        images.append(load_image(library.path_of(r)))
        uses.append(ReferenceUse(source=r.file, why=choice.why, sop_instance_uid=r.sop_instance_uid,
                                 sop_class_uid=r.sop_class_uid, series_instance_uid=r.series_uid,
                                 study_instance_uid=r.study_uid))
    return images, uses
