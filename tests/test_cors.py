"""CDS_CORS_ORIGINS: exact origins and anchored wildcard-subdomain patterns, nothing looser."""

from __future__ import annotations

import pytest

from cds_service.cors import OriginPolicy

PV = "/cds-services/b12-neck-pain-patient-view"


def test_wildcard_subdomain_pattern_is_anchored_at_both_ends():
    policy = OriginPolicy.parse("https://*.example.org")
    assert policy.allows("https://ehr.example.org")
    assert policy.allows("https://a.b.example.org")
    assert policy.allows("HTTPS://EHR.Example.ORG")
    for origin in ("https://xexample.org.attacker.net",   # the reported bypass
                   "https://xexample.org",                 # '.' must be literal, not any character
                   "https://example.org",                  # the apex is not a subdomain
                   "https://ehr.example.org.attacker.net",
                   "https://ehr.example.org\n",            # `$` would match before a newline
                   "https://ehr.example.org:8443",         # other port
                   "http://ehr.example.org",               # other scheme
                   "https://evil.com/.example.org",
                   "https://evil.com#.example.org",
                   ""):
        assert not policy.allows(origin), origin


def test_exact_origins_match_only_themselves():
    policy = OriginPolicy.parse("https://ehr.example.org, http://localhost:3000")
    assert policy.allows("https://ehr.example.org") and policy.allows("http://localhost:3000")
    for origin in ("https://ehrXexample.org", "https://ehr.example.org.evil.net", "https://sub.ehr.example.org",
                   "http://localhost:30001", "http://localhost", None):
        assert not policy.allows(origin), origin


@pytest.mark.parametrize("entry", ["https://ehr.example.org/path", "ehr.example.org", "https://*example.org",
                                   "https://ehr.*.org", "https://.*\\.example\\.org", "https://ehr.example.org.*",
                                   "ftp://ehr.example.org", "*, https://ehr.example.org"])
def test_anything_else_is_refused_at_start(entry, make_app):
    with pytest.raises(ValueError, match="CDS_CORS_ORIGINS"):
        OriginPolicy.parse(entry)
    with pytest.raises(ValueError, match="CDS_CORS_ORIGINS"):
        make_app(cors_origins=entry)


def test_the_app_reflects_only_matching_origins(make_app):
    client = make_app(cors_origins="https://*.example.org").test_client()
    ok = client.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    bad = client.get("/cds-services", headers={"Origin": "https://xexample.org.attacker.net"})
    assert "Access-Control-Allow-Origin" not in bad.headers
    preflight = client.options(PV, headers={"Origin": "https://xexample.org.attacker.net",
                                            "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_default_allows_any_origin():
    policy = OriginPolicy.parse("*")
    assert policy.allow_all and policy.allows("https://anything.example")
    assert policy.response_headers(None) == [("Access-Control-Allow-Origin", "*")]
