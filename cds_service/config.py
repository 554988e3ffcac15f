"""Settings: every `CDS_` environment variable, in one place.

`Settings.from_env(overrides)` reads the environment and applies a mapping of overrides (the
`config` argument of `create_app`).  Override keys are the field names (`max_body_bytes`) or the
environment names (`CDS_MAX_BODY_BYTES`).  README.md's configuration table documents every field;
`tests/test_config.py` checks that the table and this class agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cds_service.cors import OriginPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
"""Where a wheel installs the default `cards/` and `valuesets/` (see setup.py)."""
ENV_PREFIX = "CDS_"


def _default_knowledge_dir(name: str) -> str:
    """The default `cards` or `valuesets` folder: the copy shipped inside an installed package,
    else the repository's own folder (source checkout, editable install)."""
    shipped = PACKAGE_DATA / name
    return str(shipped if shipped.is_dir() else REPO_ROOT / name)


def _default_data_dir() -> str:
    """`data/` in the source tree; for an installed package, `data/` in the working directory
    (never inside site-packages)."""
    return str(Path("data").resolve() if PACKAGE_DATA.is_dir() else REPO_ROOT / "data")


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Field `foo_bar` is read from `CDS_FOO_BAR`."""

    # --- knowledge files -------------------------------------------------------------------
    cards_dir: str = field(default_factory=lambda: _default_knowledge_dir("cards"))
    """Folder with the card definitions (text, links, override reasons)."""
    valuesets_dir: str = field(default_factory=lambda: _default_knowledge_dir("valuesets"))
    """Folder with the FHIR ValueSet JSON files the facts are matched against."""

    # --- clinical rule parameters (defaults from issue #2; sources in docs/rules.md) -------
    older_age_years: int = 75
    chronic_days: int = 84
    recent_test_days: int = 56
    result_lookback_days: int = 365
    b12_low_below_ng_l: float = 180.0
    b12_normal_above_ng_l: float = 350.0
    active_b12_low_below_pmol_l: float = 25.0
    """NICE NG239 active B12 (holotranscobalamin): below this, deficiency."""
    active_b12_normal_above_pmol_l: float = 70.0
    """NICE NG239 active B12: above this, deficiency unlikely (25-70 indeterminate)."""
    pending_result_days: int = 30
    """A registered/preliminary B12, active-B12 or MMA result this recent means the test is in
    progress (no new suggestion); an older one is treated as abandoned."""
    pregnancy_days: int = 294
    """A "pregnant" record counts for this many days after its date (42 weeks, the longest
    pregnancy) unless a later record ends it."""
    b12_order_loinc: str = "2132-9"
    validation_cache_size: int = 8192
    """R4B validation verdicts remembered per worker (a digest and a boolean each); 0: off."""
    gate_memo_entries: int = 32768
    """Resources whose gate verdict is remembered per worker, keyed by a hash of their bytes
    (`cds_service.gate_memo`: the length, type, logical id and subject reference are kept, no
    clinical content; about 9 MiB when full); 0: off."""
    order_intent: str = "proposal"
    acid_suppressant_min_days: int = 365
    """An acid suppressant counts once taken this long (AAFP 2017: more than 12 months)."""
    pending_order_max_days: int = 90
    """An active B12/MMA order older than this is stale and no longer suppresses the card."""
    encounter_diagnosis_days: int = 180
    """An encounter diagnosis without a clinical status counts only while this recent."""

    # --- alert governance (suppression periods are data: cards/suppression.json) -----------
    encounter_lockout_hours: int = 24
    """order-select / order-sign do not repeat a card kind already shown in the same encounter
    within this many hours, unless the situation changed; 0 turns the lockout off."""
    silent_services: str = ""
    """Comma-separated service ids in silent mode: evaluated and recorded, no cards returned."""
    silent_card_kinds: str = ""
    """Comma-separated card kinds in silent mode (low-b12, mma-test, b12-test), on every service."""

    # --- protocol limits -------------------------------------------------------------------
    max_body_bytes: int = 32 * 1024 * 1024
    """Request body limit (413 above it).  Fits a 10,000-resource prefetch of resources averaging
    up to 3.3 KiB: EHR-shaped resources (generated narrative, identifiers, local codes) average
    1.8 KiB (bench/memory.py), so 10,000 of them are 18 MiB."""
    body_budget_bytes: int = 0
    """Bytes of request bodies one worker holds at once (being read, waiting for a thread, or in
    the app); a request past it waits unread.  0: `body_budget_for(threads)`."""
    body_budget_wait: float = 10.0
    """Seconds a request waits for room in the body budget before a 503 with Retry-After."""
    max_json_depth: int = 64
    max_string_length: int = 4096
    max_header_bytes: int = 8192
    """Longest request line or single header field (name and value) accepted; 431 above it."""
    request_header_timeout: float = 20.0
    """Seconds a new connection has to send complete request headers (408 and closed after)."""
    request_body_timeout: float = 60.0
    """Seconds to receive a whole request body once its headers are in (408 after)."""

    # --- CORS --------------------------------------------------------------------------------
    cors_origins: str = "*"
    """`*`, or comma-separated exact origins and `scheme://*.domain` patterns (cds_service/cors.py)."""

    # --- FHIR fallback -----------------------------------------------------------------------
    fhir_connect_timeout: float = 0.5
    fhir_read_timeout: float = 2.0
    fhir_deadline: float = 3.0
    """Overall budget (seconds) for all FHIR fallback requests of one hook call."""
    fhir_max_pages: int = 5
    fhir_max_response_bytes: int = 10 * 1024 * 1024
    fhir_allowlist: str = ""
    """Comma-separated URL prefixes that `fhirServer` may point to. Empty: no outbound calls."""

    # --- security ----------------------------------------------------------------------------
    auth_disabled: bool = False
    trusted_issuers: str = "{}"
    """JSON object: issuer -> {"jwks": URL or file path, "jku": [allowed URLs], "tenants": [...]}."""
    admin_issuers: str = "{}"
    """JSON object like `trusted_issuers`: issuers whose tokens may read the feedback report (and
    nothing else).  With neither this nor `admin_scope` set, the report is closed to everyone."""
    admin_scope: str = ""
    """A scope that a token must carry (in its space-separated `scope` claim) to read the report;
    when set it is required of every report token, from any trusted or admin issuer."""
    public_base_url: str = ""
    """Externally visible base URL (scheme://host[:port][/prefix]) used for the JWT `aud` check."""
    jwt_leeway_seconds: int = 60
    jwks_cache_seconds: int = 3600
    patient_hash_key: str = ""
    """Secret for the keyed hash of patient ids stored with issued cards (generated and kept in
    the data directory when empty)."""

    # --- storage -----------------------------------------------------------------------------
    data_dir: str = field(default_factory=_default_data_dir)
    database_url: str = ""
    """`postgresql://...` for shared storage across replicas; empty: SQLite in `data_dir`."""

    # --- serving -----------------------------------------------------------------------------
    demo_mode: bool = False
    """Serve the demo EHR page at `/` and trust the built-in demo signing key."""
    dev_mode: bool = False
    """Development (`b12-cds serve --dev`, `b12-cds evaluate`): hook answers carry the explanation
    of the decision (as in demo mode). Never in production: it holds patient data."""
    demo_allow_remote: bool = False
    """Let `b12-cds serve` run demo mode on a non-loopback address (it mints trusted tokens)."""
    log_level: str = "INFO"
    workers: int = 2
    bind: str = "127.0.0.1:8080"

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> "Settings":
        """Build settings from `CDS_*` variables, then apply `overrides`."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = _coerce(f, raw)
        for key, value in (overrides or {}).items():
            name = key[len(ENV_PREFIX):].lower() if key.startswith(ENV_PREFIX) else key
            if name not in fields:
                raise ValueError(f"unknown setting {key!r}")
            values[name] = _coerce(fields[name], value) if isinstance(value, str) else value
        return cls(**values)

    # Derived views -------------------------------------------------------------------------
    @property
    def cors_policy(self) -> "OriginPolicy":
        from cds_service.cors import OriginPolicy

        return OriginPolicy.parse(self.cors_origins)

    def body_budget_for(self, threads: int) -> int:
        """The body budget of a worker with `threads` app threads: `CDS_BODY_BUDGET_BYTES`, else
        room for two bodies at the limit (one when the worker has a single thread).  A worker
        runs Python on one core at a time, so more large requests at once add memory, not speed;
        requests of typical size (300 KiB) still fill every thread."""
        if self.body_budget_bytes > 0:
            return self.body_budget_bytes
        return min(max(threads, 1), 2) * self.max_body_bytes

    @property
    def fhir_allowlist_prefixes(self) -> list[str]:
        return [p.strip() for p in self.fhir_allowlist.split(",") if p.strip()]

    @property
    def silent_service_set(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.silent_services.split(",") if p.strip())

    @property
    def silent_card_kind_set(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.silent_card_kinds.split(",") if p.strip())

    @property
    def trusted_issuer_map(self) -> dict[str, dict[str, Any]]:
        parsed = json.loads(self.trusted_issuers or "{}")
        if not isinstance(parsed, dict):
            raise ValueError("CDS_TRUSTED_ISSUERS must be a JSON object")
        return parsed

    @property
    def admin_issuer_map(self) -> dict[str, dict[str, Any]]:
        parsed = json.loads(self.admin_issuers or "{}")
        if not isinstance(parsed, dict):
            raise ValueError("CDS_ADMIN_ISSUERS must be a JSON object")
        return parsed


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        return str(raw).strip().lower() in {"1", "true", "yes", "on"}
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return str(raw)
