"""Settings come from CDS_ environment variables; the README documents every one of them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cds_service.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_table_lists_exactly_the_settings():
    documented = set(re.findall(r"^\| `(CDS_[A-Z0-9_]+)` \|", README.read_text(), re.MULTILINE))
    fields = {"CDS_" + f.name.upper() for f in dataclasses.fields(Settings)}
    assert documented == fields


def test_readme_numeric_defaults_are_the_settings_defaults():
    cells = dict(re.findall(r"^\| `(CDS_[A-Z0-9_]+)` \| ([^|]*) \|", README.read_text(), re.MULTILINE))
    defaults = Settings.from_env(environ={})
    checked = 0
    for f in dataclasses.fields(Settings):
        cell = cells["CDS_" + f.name.upper()].strip()
        if f.type in ("int", "float") and re.fullmatch(r"[0-9.]+", cell):
            assert float(cell) == float(getattr(defaults, f.name)), f.name
            checked += 1
    assert checked >= 20  # the table's numbers are checked, not skipped


def test_environment_and_overrides():
    env = {"CDS_OLDER_AGE_YEARS": "70", "CDS_AUTH_DISABLED": "yes", "CDS_FHIR_DEADLINE": "1.5",
           "CDS_FHIR_ALLOWLIST": "https://a.example/fhir, https://b.example/r4"}
    settings = Settings.from_env({"CDS_CHRONIC_DAYS": "90", "workers": 3}, environ=env)
    assert settings.older_age_years == 70 and settings.auth_disabled is True
    assert settings.fhir_deadline == 1.5 and settings.chronic_days == 90 and settings.workers == 3
    assert settings.fhir_allowlist_prefixes == ["https://a.example/fhir", "https://b.example/r4"]


def test_defaults_are_safe():
    settings = Settings.from_env(environ={})
    assert settings.auth_disabled is False and settings.demo_mode is False
    assert settings.fhir_allowlist_prefixes == []  # no outbound calls unless configured


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError):
        Settings.from_env({"no_such_setting": 1}, environ={})
