"""Structured Report writing and delivery to the PACS."""
