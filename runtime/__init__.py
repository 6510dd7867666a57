"""Everything that executes compiled artefacts: backends, latency harness, fidelity metrics, reports."""
