"""Reproducible benchmark of the CDS Hooks service (see bench/README.md)."""
