"""Revisions of the index schema, one file each (see dicom_node.migrations)."""
