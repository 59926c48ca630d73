"""The RFC 9111 rules as transcripts: a stored response, a clock, requests."""

import pytest

from gproxy import cachepolicy as P

T0 = 1_700_000_000.0
DATE = "Tue, 14 Nov 2023 22:13:20 GMT"       # T0 as an IMF-fixdate


def store(fields, status=200, t=T0, size=4, vary=(), request=()):
    return P.stored(status, "OK", [("Date", DATE)] + list(fields), t, t, size,
                    P.secondary_key(list(vary) and [("Vary", ", ".join(vary))], list(request)))


ROUTE = P.Route()


def transcript(entry, steps, route=ROUTE):
    """[(seconds after T0, request fields, expected decision)]."""
    for dt, req, want in steps:
        got = P.reuse(entry, req, T0 + dt, route)
        assert got == want, f"at +{dt}s with {req}: got {got}, want {want}"


def test_directives_parse_as_caches_do():
    assert P.directives('Max-Age=5, no-cache="a, b", private') == {
        "max-age": "5", "no-cache": "a, b", "private": None}
    assert P.directives("max-age=5, max-age=10")["max-age"] == "5"     # the first wins
    assert P.seconds("05") == 5 and P.seconds('"5"') is None and P.seconds("-1") is None
    assert P.seconds("99999999999") == P.DELTA_MAX


@pytest.mark.parametrize("value, want", [
    ("Tue, 14 Nov 2023 22:13:20 GMT", T0),
    ("TUE, 14 NOV 2023 22:13:20 gmt", T0),
    ("Tuesday, 14-Nov-23 22:13:20 GMT", T0),
    ("Tue Nov 14 22:13:20 2023", T0),
    ("Tue, 14 Nov 2023 22:13:20 UTC", None),
    ("Tue, 14 Nov 23 22:13:20 GMT", None),
    ("Tue 14 Nov 2023 22:13:20 GMT", None),
    ("0", None),
])
def test_http_dates_in_the_three_forms_only(value, want):
    assert P.http_date(value) == want


@pytest.mark.parametrize("method, status, req, resp, why", [
    ("GET", 200, [], [("Cache-Control", "max-age=60")], None),
    ("POST", 200, [], [("Cache-Control", "max-age=60")], "method"),
    ("GET", 206, [], [("Cache-Control", "max-age=60")], "status"),
    ("GET", 200, [], [("Cache-Control", "max-age=60, no-store")], "no-store"),
    ("GET", 200, [("Cache-Control", "no-store")], [("Cache-Control", "max-age=60")], "request no-store"),
    ("GET", 200, [], [("Cache-Control", "max-age=60, private")], "private"),
    ("GET", 200, [], [("Cache-Control", "max-age=60"), ("Vary", "a, *")], "vary *"),
    ("GET", 200, [("Authorization", "x")], [("Cache-Control", "max-age=60")], "authorization"),
    ("GET", 200, [("Authorization", "x")], [("Cache-Control", "s-maxage=60")], None),
    ("GET", 200, [], [], "no freshness"),
    ("GET", 200, [], [("Last-Modified", DATE)], None),             # heuristic
    ("GET", 201, [], [("Last-Modified", DATE)], None),             # revalidatable
    ("GET", 200, [], [("Cache-Control", "no-store, must-understand, max-age=9")], None),
    ("GET", 200, [], [("CDN-Cache-Control", "no-store"), ("Cache-Control", "max-age=9")], "no-store"),
])
def test_what_a_shared_cache_may_store(method, status, req, resp, why):
    assert P.storable(method, status, req, resp) == why


def test_freshness_precedence():
    life = lambda fields, **kw: P.freshness_lifetime(store(fields), **kw)  # noqa: E731
    assert life([("Cache-Control", "max-age=10, s-maxage=20")]) == 20
    assert life([("Cache-Control", "max-age=10"), ("Expires", "Tue, 14 Nov 2023 23:13:20 GMT")]) == 10
    assert life([("Expires", "Tue, 14 Nov 2023 23:13:20 GMT")]) == 3600
    assert life([("Expires", "0")]) == 0
    assert life([("Cache-Control", "max-age=\"10\"")]) == 10      # 5.2: accept both forms
    assert life([("Cache-Control", "max-age='10'")]) == 0
    assert life([], default_ttl=300) == 300
    assert life([("Last-Modified", "Tue, 14 Nov 2023 12:13:20 GMT")]) == 3600    # 10% of 10 h
    assert life([("Last-Modified", "Tue, 14 Nov 2023 12:13:20 GMT")], default_ttl=5) == 5
    assert P.freshness_lifetime(store([("Last-Modified", DATE)], status=201), default_ttl=5) == 0
    # RFC 9213: CDN-Cache-Control first, when it parses
    assert life([("CDN-Cache-Control", "max-age=100"), ("Cache-Control", "max-age=1")]) == 100
    assert life([("CDN-Cache-Control", "max-age=100"), ("Cache-Control", "max-age=1")], cdn=False) == 1
    assert life([("CDN-Cache-Control", 'max-age="100"'), ("Cache-Control", "max-age=1")]) == 1
    assert life([("CDN-Cache-Control", "max-age=100, &&"), ("Cache-Control", "max-age=1")]) == 1


def test_age_counts_the_upstream_age_the_delay_and_residence():
    e = P.stored(200, "OK", [("Date", DATE), ("Age", "30"), ("Cache-Control", "max-age=60")],
                 T0 - 2, T0, 0, [])
    assert P.age_field(e, T0) == "32"            # Age + response delay
    assert P.age_field(e, T0 + 10) == "42"
    late = P.stored(200, "OK", [("Date", "Tue, 14 Nov 2023 22:12:20 GMT")], T0, T0, 0, [])
    assert P.age_field(late, T0) == "60"         # apparent age from Date
    assert P.stored(200, "OK", [("Age", "x")], T0, T0, 0, [])["age_value"] == 0


def test_fresh_then_stale_then_revalidate():
    transcript(store([("Cache-Control", "max-age=10")]), [
        (0, [], P.FRESH),
        (9, [], P.FRESH),
        (10, [], P.REVALIDATE),
        (5, [("Cache-Control", "max-age=3")], P.REVALIDATE),
        (5, [("Cache-Control", "min-fresh=6")], P.REVALIDATE),
        (5, [("Cache-Control", "no-cache")], P.REVALIDATE),
        (5, [("Pragma", "no-cache")], P.REVALIDATE),
        (5, [("Pragma", "no-cache"), ("Cache-Control", "max-age=60")], P.FRESH),   # 5.4
        (15, [("Cache-Control", "max-stale=10")], P.STALE),
        (25, [("Cache-Control", "max-stale=10")], P.REVALIDATE),
        (999, [("Cache-Control", "max-stale")], P.STALE),
    ])


@pytest.mark.parametrize("fields, t, route", [
    ([("Cache-Control", "max-age=10")], T0, ROUTE),
    ([("Cache-Control", "max-age=10"), ("Age", "4")], T0, ROUTE),
    ([("Cache-Control", "max-age=10"), ("Age", "40")], T0, ROUTE),       # arrived stale
    ([("Cache-Control", "max-age=10, no-cache")], T0, ROUTE),
    ([("Cache-Control", "s-maxage=20, max-age=5")], T0, ROUTE),
    ([("Expires", "Tue, 14 Nov 2023 22:13:50 GMT")], T0 + 3, ROUTE),    # received 3 s after Date
    ([("CDN-Cache-Control", "max-age=30"), ("Cache-Control", "max-age=5")], T0, ROUTE),
    ([("CDN-Cache-Control", "max-age=30"), ("Cache-Control", "max-age=5")], T0, P.Route(cdn=False)),
    ([], T0, P.Route(default_ttl=15.0)),
    ([("Last-Modified", "Tue, 14 Nov 2023 21:13:20 GMT")], T0, ROUTE),   # heuristic: 360 s
])
def test_fresh_until_is_what_reuse_says_to_a_plain_request(fields, t, route):
    e = P.stored(200, "OK", [("Date", DATE)] + fields, t - 1, t, 4, [])
    until = P.fresh_until(e, route)
    for dt in (-5, 0, 1, 2, 4, 5, 6, 9, 10, 11, 14, 15, 16, 19, 20, 21, 26, 27, 28, 29, 30, 31,
               359, 360, 361, 400):
        now = t + dt
        want = P.reuse(e, {}, now, route) == P.FRESH
        assert (now < until) == want, f"at +{dt}s: fresh_until {until - t:+}s, reuse fresh: {want}"


def test_stale_while_revalidate_and_what_forbids_stale():
    transcript(store([("Cache-Control", "max-age=10, stale-while-revalidate=20")]), [
        (5, [], P.FRESH), (15, [], P.UPDATING), (31, [], P.REVALIDATE)])
    transcript(store([("Cache-Control", "max-age=10")]), [(15, [], P.UPDATING)],
               P.Route(stale_while_revalidate=20))
    for cc in ("must-revalidate", "proxy-revalidate", "s-maxage=10"):
        transcript(store([("Cache-Control", f"max-age=10, {cc}, stale-while-revalidate=99")]), [
            (15, [], P.REVALIDATE), (15, [("Cache-Control", "max-stale")], P.REVALIDATE)])
    transcript(store([("Cache-Control", "max-age=10, no-cache")]), [(0, [], P.REVALIDATE)])


def test_stale_if_error():
    e = store([("Cache-Control", "max-age=10, stale-if-error=20")])
    assert P.usable_on_error(e, T0 + 25, ROUTE) and not P.usable_on_error(e, T0 + 31, ROUTE)
    plain = store([("Cache-Control", "max-age=10")])
    assert not P.usable_on_error(plain, T0 + 15, ROUTE)
    assert P.usable_on_error(plain, T0 + 15, P.Route(stale_if_error=60))
    assert not P.usable_on_error(store([("Cache-Control", "max-age=10, must-revalidate")]),
                                 T0 + 15, P.Route(stale_if_error=60))


def test_vary_selects_by_the_normalised_request_fields():
    e = store([("Cache-Control", "max-age=60")], vary=("Accept-Language", "X-A"),
              request=[("Accept-Language", "en,  fr"), ("Accept-Encoding", "gzip")])
    assert e["vary"] == [["accept-language", "en,fr"], ["x-a", None]]
    transcript(e, [
        (0, [("accept-language", "en, fr")], P.FRESH),
        (0, [("Accept-Language", "fr")], P.MISS),
        (0, [("Accept-Language", "en, fr"), ("X-A", "1")], P.MISS),
    ])


def test_validators_and_the_304_update():
    e = store([("Cache-Control", "max-age=0"), ("ETag", '"a"'), ("Last-Modified", DATE),
               ("Content-Length", "4"), ("X-Old", "1"), ("Connection", "close")])
    assert P.conditional_fields(e) == [("If-None-Match", '"a"'), ("If-Modified-Since", DATE)]
    new = P.freshen(e, [("Cache-Control", "max-age=60"), ("X-Old", "2"), ("Content-Length", "0"),
                        ("ETag", '"a"'), ("Age", "5"), ("Date", "Tue, 14 Nov 2023 22:15:00 GMT")], T0 + 100, T0 + 100)
    fields = dict((n.lower(), v) for n, v in new["fields"])
    assert (fields["cache-control"], fields["x-old"], fields["content-length"]) == ("max-age=60", "2", "4")
    assert "connection" not in fields
    assert P.reuse(new, [], T0 + 150, ROUTE) == P.FRESH and P.age_field(new, T0 + 100) == "5"
    assert P.same_validator(e, [("ETag", '"a"')]) and not P.same_validator(e, [("ETag", '"b"')])


def test_a_client_precondition_answered_from_the_store():
    e = store([("ETag", 'W/"a"'), ("Last-Modified", DATE)])
    assert P.not_modified(e, [("If-None-Match", '"x", "a"')])           # weak comparison
    assert not P.not_modified(e, [("If-None-Match", '"b"'), ("If-Modified-Since", DATE)])
    assert P.not_modified(e, [("If-Modified-Since", DATE)])
    assert not P.not_modified(e, [("If-Modified-Since", "Tue, 14 Nov 2023 22:13:19 GMT")])
    no_lm = store([])
    assert P.not_modified(no_lm, [("If-Modified-Since", DATE)])          # the Date stands in


def test_byte_ranges_from_a_stored_200():
    e = store([("ETag", '"a"')], size=10)
    rng = lambda v, *more: P.byte_range(e, [("Range", v), *more])  # noqa: E731
    assert rng("bytes=2-4") == (2, 4)
    assert rng("bytes=5-") == (5, 9)
    assert rng("bytes=-3") == (7, 9)
    assert rng("bytes=8-99") == (8, 9)
    assert rng("bytes=10-") is False
    assert rng("bytes=0-1,4-5") is None                     # several: the whole response
    assert rng("bytes=0-1", ("If-Range", '"b"')) is None
    assert rng("bytes=0-1", ("If-Range", '"a"')) == (0, 1)


def test_unsafe_methods_invalidate_the_uri_and_same_origin_locations():
    assert P.invalidates("POST", 201) and P.invalidates("M-SEARCH", 200)
    assert not P.invalidates("POST", 500) and not P.invalidates("GET", 200)
    assert P.invalidated_targets("a.test", [
        ("Location", "http://a.test/x?y"), ("Content-Location", "/z")]) == ["/x?y", "/z"]
    assert P.invalidated_targets("a.test", [("Location", "http://b.test/x")]) == []
