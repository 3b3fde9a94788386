"""The normal reference library: de-identified normal studies of other people, matched to a query
that has no usable prior (import and index in library.py, selection rules in select.py)."""

from .library import AddReport, Library, ReferenceRecord, ReferenceRefused
from .select import ReferenceChoice, ReferenceQuery, ReferenceSelection, query_for, select_references

__all__ = ["AddReport", "Library", "ReferenceChoice", "ReferenceQuery", "ReferenceRecord", "ReferenceRefused",
           "ReferenceSelection", "query_for", "select_references"]
