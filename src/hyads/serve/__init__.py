"""Inspection-station service: FastAPI app (REST API + a single web page)."""

from .app import ServiceSettings, create_app

__all__ = ["ServiceSettings", "create_app"]
