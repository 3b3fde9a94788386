"""Errors raised for bad input: each names the file and the DICOM attribute at fault."""

from __future__ import annotations


class InputError(ValueError):
    """An image that cannot be analysed, with the file and attribute that made it so."""

    def __init__(self, source: str, attribute: str, problem: str) -> None:
        self.source = source or "<in-memory image>"
        self.attribute = attribute
        self.problem = problem
        super().__init__(f"{self.source}: {attribute}: {problem}")
