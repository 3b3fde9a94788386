"""Prior study retrieval (query, selection rules, retrieve, cache)."""
