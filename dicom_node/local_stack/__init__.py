"""Real peer processes on loopback for the quickstart and the integration tests: Redis,
Orthanc (as the PACS), the node's own processes. Same code for both, so the tests
exercise exactly what a new user runs."""
