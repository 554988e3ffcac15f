"""The EHR's access token never leaves the allowlisted FHIR path (SSRF through URL tricks).

A capture server on 127.0.0.1 answers FHIR data under the allowlisted prefix `/tenantA/fhir` and
records every request line it receives, wherever it points.  For each way of writing a URL that
escapes the prefix (dot segments, percent-encoded dots and slashes, `..;`, control characters,
backslashes, double encoding, overlong UTF-8, userinfo), as `fhirServer` and as a `next` link
(fetched and prefetched), no request carrying the token reaches a path outside the prefix.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from cds_service import fhir_url
from cds_service.config import Settings
from cds_service.fhir_url import UnsafeUrl, normalise
from cds_service.patient_data import PatientDataGatherer, render_template
from cds_service.protocol import CdsError
from tests.servers import Reply, StubServer, resource, searchset
from tests.test_patient_data import TEMPLATES, TOKEN, full_prefetch, request

PREFIX = "/tenantA/fhir"

# Ways to write a URL that starts with the allowlisted prefix but reaches `/other` (or the
# server root) once an HTTP library or a FHIR server (Tomcat, IIS...) has decoded it.
ESCAPES = [
    "/tenantA/fhir/../../other",
    "/tenantA/fhir/./../../other",
    "/tenantA/fhir/sub/../../../other",
    "/tenantA/fhir/%2e%2e/%2e%2e/other",
    "/tenantA/fhir/%2E%2E/%2E%2E/other",
    "/tenantA/fhir/.%2e/.%2e/other",
    "/tenantA/fhir/..%2f..%2fother",
    "/tenantA/fhir/%2E%2E%2F%2E%2E%2Fother",
    "/tenantA/fhir/%2e%2e%2f%2e%2e%2fother",
    "/tenantA/fhir/..%5c..%5cother",
    "/tenantA/fhir\\..\\..\\other",
    "/tenantA/fhir/..\\..\\other",
    "/tenantA/fhir/..;/..;/other",
    "/tenantA/fhir/..;x=1/..;/other",
    "/tenantA/fhir/%252e%252e/%252e%252e/other",
    "/tenantA/fhir/%c0%ae%c0%ae/%c0%ae%c0%ae/other",
    "/tenantA/fhir/\n/../../../other",
    "/tenantA/fhir/\r\n/../../../other",
    "/tenantA/fhir/\t/../../../other",
    "/tenantA/fhir/%0a/../../../other",
    "/tenantA/fhir /../../other",
    "/tenantA/fhir/\x00/../../../other",
    "/tenantA/fhir/\u2025/other",  # a non-ASCII "two dot leader"
]


def settings(stub: StubServer, **overrides: Any) -> Settings:
    values = {"fhir_allowlist": stub.base + PREFIX, "fhir_deadline": 2.0} | overrides
    return Settings.from_env(values, environ={})


def capture_server() -> StubServer:
    """A stub answering every key of patient p1 under the prefix, and `/other` (the target)."""
    stub = StubServer()
    prefetch = full_prefetch()
    for key, value in prefetch.items():
        rendered = render_template(TEMPLATES[key], {"context.patientId": "p1"})
        stub.route(f"{PREFIX}/{rendered}", Reply(body=value))
        stub.route(f"/other/{rendered}", Reply(body=value))
    return stub


def assert_token_stayed_under_prefix(stub: StubServer) -> None:
    tokened = [r for r in stub.requests if r.headers.get("Authorization") == f"Bearer {TOKEN}"]
    for rec in tokened:
        for path in (rec.path, unquote(rec.path), unquote(unquote(rec.path))):
            assert path.startswith(PREFIX + "/"), f"token sent to {rec.path!r}"
            assert "/../" not in path and "\\" not in path and ";" not in path.split("?")[0]
    assert all(r.path.startswith(PREFIX + "/") for r in stub.requests)


# ---------------------------------------------------------------------------------------------
# fhirServer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ESCAPES)
def test_fhir_server_escaping_the_prefix_is_412_and_gets_no_token(path: str, caplog) -> None:
    with capture_server() as stub, caplog.at_level(logging.INFO):
        gatherer = PatientDataGatherer(settings(stub))
        with pytest.raises(CdsError) as err:
            gatherer.gather(request(fhir_server=stub.base + path, token=TOKEN), TEMPLATES)
        assert_token_stayed_under_prefix(stub)
        assert stub.requests == []
    assert err.value.status == 412
    assert "fhirServer is" in err.value.diagnostics and "patient" in err.value.diagnostics
    assert any(r.getMessage() == "fhir_server_not_allowed" for r in caplog.records)
    assert all(TOKEN not in str(v) for r in caplog.records for v in vars(r).values())


@pytest.mark.parametrize("url", [
    "http://user@127.0.0.1:{port}/tenantA/fhir",
    "http://user:pw@127.0.0.1:{port}/tenantA/fhir",
    "http://127.0.0.1:{port}@127.0.0.1:{port}/tenantA/fhir",
    "ftp://127.0.0.1:{port}/tenantA/fhir",
    "http://127.0.0.1:{port}/tenantA/fhir%2Fx",
])
def test_fhir_server_with_userinfo_scheme_or_encoded_slash_is_412(url: str) -> None:
    with capture_server() as stub:
        with pytest.raises(CdsError) as err:
            PatientDataGatherer(settings(stub)).gather(
                request(fhir_server=url.format(port=stub.port), token=TOKEN), TEMPLATES)
        assert stub.requests == []
    assert err.value.status in (400, 412)  # a non-http(s) scheme is already a 400 of the request


def test_unusable_fhir_server_says_why_and_logs_no_token(caplog) -> None:
    with capture_server() as stub, caplog.at_level(logging.INFO):
        with pytest.raises(CdsError) as err:
            PatientDataGatherer(settings(stub)).gather(
                request(fhir_server=stub.base + "/tenantA/fhir/%2e%2e/x", token=TOKEN), TEMPLATES)
    assert "not a usable URL (encoded dot segment in path)" in err.value.diagnostics
    line = next(r for r in caplog.records if r.getMessage() == "fhir_server_not_allowed")
    assert line.reason == "not a usable URL (encoded dot segment in path)"
    assert all(TOKEN not in str(v) for r in caplog.records for v in vars(r).values())


@pytest.mark.parametrize("server_path", [
    "/tenantA/fhir", "/tenantA/fhir/", "/tenantA/./fhir", "/tenantA/fhir/sub/..", "/tenantA/fhir/x/../",
    "/%74enantA/fhir", "/tenantA/fhir/.",
])
def test_fhir_server_inside_the_prefix_is_sent_in_normal_form(server_path: str) -> None:
    """Dot segments that stay inside the prefix are resolved once; what goes on the wire is
    exactly the normal form (no dot segments, unreserved characters decoded, `|` encoded)."""
    with capture_server() as stub:
        result = PatientDataGatherer(settings(stub)).gather(
            request(fhir_server=stub.base + server_path, token=TOKEN), TEMPLATES)
        assert_token_stayed_under_prefix(stub)
        sent = sorted(f"{r.path}?{r.query}" if r.query else r.path for r in stub.requests)
    expected = sorted(
        normalise(f"{stub.base}{PREFIX}/{render_template(t, {'context.patientId': 'p1'})}").text
        .removeprefix(stub.base) for t in TEMPLATES.values())
    assert sent == expected
    assert all("|" not in s and "%7C" in s for s in sent if "code=" in s)
    assert result.failed_keys == ()


def test_prefix_check_is_on_path_segments_not_characters() -> None:
    with capture_server() as stub:
        with pytest.raises(CdsError):
            PatientDataGatherer(settings(stub)).gather(
                request(fhir_server=stub.base + "/tenantA/fhirevil", token=TOKEN), TEMPLATES)
        assert stub.requests == []


def test_a_bad_allowlist_entry_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="CDS_FHIR_ALLOWLIST"):
        PatientDataGatherer(Settings.from_env({"fhir_allowlist": "https://ehr.example/a/%2e%2e/b"},
                                              environ={}))


# ---------------------------------------------------------------------------------------------
# next links
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ESCAPES + ["/tenantA/fhirevil/Condition?page=2"])
def test_fetched_next_link_escaping_the_prefix_is_not_followed(path: str, caplog) -> None:
    with capture_server() as stub, caplog.at_level(logging.INFO):
        conditions = f"{PREFIX}/{render_template(TEMPLATES['conditions'], {'context.patientId': 'p1'})}"
        stub.route(conditions, Reply(body=searchset(resource("Condition", "c1"),
                                                    next_url=stub.base + path + "/Condition?page=2")))
        result = PatientDataGatherer(settings(stub)).gather(
            request(fhir_server=stub.base + PREFIX, token=TOKEN), TEMPLATES)
        assert_token_stayed_under_prefix(stub)
    assert "conditions" in result.failed_keys  # the rules are told the data is incomplete
    assert [c["id"] for c in result.record.conditions] == ["c1"]
    line = next(r for r in caplog.records if r.getMessage() == "gather")
    assert "conditions:next link" in line.reason
    assert all(TOKEN not in str(v) for r in caplog.records for v in vars(r).values())


@pytest.mark.parametrize("path", ESCAPES)
def test_prefetched_next_link_escaping_the_prefix_is_not_followed(path: str) -> None:
    with capture_server() as stub:
        prefetch = full_prefetch() | {
            "conditions": searchset(resource("Condition", "c1"),
                                    next_url=stub.base + path + "/Condition?page=2")}
        result = PatientDataGatherer(settings(stub)).gather(
            request(prefetch=prefetch, fhir_server=stub.base + PREFIX, token=TOKEN), TEMPLATES)
        assert stub.requests == []
    assert "conditions" in result.failed_keys
    assert [c["id"] for c in result.record.conditions] == ["c1"]


def test_next_link_inside_the_prefix_is_followed_in_normal_form() -> None:
    with capture_server() as stub:
        stub.route(f"{PREFIX}/Condition", Reply(body=searchset(resource("Condition", "c2"))))
        prefetch = full_prefetch() | {
            "conditions": searchset(resource("Condition", "c1"),
                                    next_url=f"{stub.base}{PREFIX}/x/../Condition?page=%32&a=|")}
        result = PatientDataGatherer(settings(stub)).gather(
            request(prefetch=prefetch, fhir_server=stub.base + PREFIX, token=TOKEN), TEMPLATES)
        assert [(r.path, r.query) for r in stub.requests] == [(f"{PREFIX}/Condition", "page=2&a=%7C")]
    assert [c["id"] for c in result.record.conditions] == ["c1", "c2"]
    assert result.failed_keys == ()


# ---------------------------------------------------------------------------------------------
# The normaliser itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "normal"), [
    ("HTTPS://EHR.Example:443/fhir/", "https://ehr.example/fhir/"),
    ("http://ehr.example:80", "http://ehr.example/"),
    ("https://ehr.example:8443/a/./b/../c", "https://ehr.example:8443/a/c"),
    ("https://ehr.example/%7Euser/%41?q=%41%2f&r=|", "https://ehr.example/~user/A?q=A%2F&r=%7C"),
    ("https://ehr.example/fhir#fragment", "https://ehr.example/fhir"),
    ("https://[::1]:8080/fhir", "https://[::1]:8080/fhir"),
    ("https://ehr.example/caf%c3%a9", "https://ehr.example/caf%C3%A9"),
    # RFC 3986 appendix B: the first "#" ends the query, the first "?" before it starts it
    ("https://ehr.example/fhir#a?b=1", "https://ehr.example/fhir"),
    ("https://ehr.example/fhir?a=1#b?c", "https://ehr.example/fhir?a=1"),
    ("https://ehr.example/fhir?a=b?c/d", "https://ehr.example/fhir?a=b?c/d"),
    ("https://ehr.example/fhir?", "https://ehr.example/fhir"),
    ("https://ehr.example/fhir?#x", "https://ehr.example/fhir"),
    ("https://ehr.example?x=/../y", "https://ehr.example/?x=/../y"),
    ("https://ehr.example/a?code=s|1,s|2&x={y}^`", "https://ehr.example/a?code=s%7C1,s%7C2&x=%7By%7D%5E%60"),
    ("https://ehr.example/a?q=%7c%2e%7E%2F%25", "https://ehr.example/a?q=%7C.~%2F%25"),
])
def test_normal_form(url: str, normal: str) -> None:
    assert normalise(url).text == normal
    assert normalise(normal).text == normal  # idempotent


@pytest.mark.parametrize("url", [
    "", "/relative", "mailto:a@b.example", "https:///fhir", "https://ehr.example:99999/",
    "https://ehr.example/a%zz", "https://ehr%2eexample/", "https://user@ehr.example/",
    "https://ehr.example/\x7f", "file:///etc/passwd", "javascript:alert(1)",
    "https://ehr.example/a?q=[1]", "https://ehr.example/a?q=\\", "https://ehr.example/a?q=%",
    "https://ehr.example/a?q=caf\u00e9", "https://ehr.example/a?q=a b",
])
def test_unusable_urls_are_rejected(url: str) -> None:
    with pytest.raises(UnsafeUrl):
        normalise(url)


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=60),
       st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=60))
@hypothesis_settings(max_examples=400, deadline=None)
def test_requests_sends_the_normal_form_unchanged(path: str, query: str) -> None:
    """The gatherer refuses to send a URL that `requests` would rewrite; for any printable path
    and query, the normal form is what `requests` prepares, and normalising it again changes
    nothing."""
    try:
        url = normalise(f"https://ehr.example/fhir/{path}?{query}")
    except UnsafeUrl:
        return
    assert requests.Request("GET", url.text).prepare().url == url.text
    assert normalise(url.text) == url


def test_is_under_compares_scheme_host_port_and_segments() -> None:
    base = normalise("https://ehr.example/tenantA/fhir")
    assert normalise("https://ehr.example/tenantA/fhir").is_under(base)
    assert normalise("https://EHR.example:443/tenantA/fhir/Patient/1").is_under(base)
    assert not normalise("https://ehr.example/tenantA/fhirx").is_under(base)
    assert not normalise("https://ehr.example/tenantA").is_under(base)
    assert not normalise("http://ehr.example/tenantA/fhir").is_under(base)
    assert not normalise("https://ehr.example:8443/tenantA/fhir").is_under(base)
    assert not normalise("https://ehr.example/tenantA/fhir/../x").is_under(base)
    assert fhir_url.allowed(normalise("https://ehr.example/x"), fhir_url.normalise_allowlist(["https://ehr.example"]))
