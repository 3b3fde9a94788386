"""The operations web UI: pages, access, readiness and metrics of the node's HTTP service."""
