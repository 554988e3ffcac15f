"""B12 / neck-pain CDS Hooks 2.0 service."""

from cds_service.app import create_app

__all__ = ["create_app"]
