"""Shared fixtures: an app factory with a private data directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from cds_service import create_app


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., Flask]:
    """Build an app with its own data directory; keyword arguments override settings."""

    def factory(**overrides: Any) -> Flask:
        config: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "auth_disabled": True}
        config.update(overrides)
        return create_app(config)

    return factory


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask):
    return app.test_client()
