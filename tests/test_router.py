from gproxy.config import Route
from gproxy.router import Router, split_host, upstream_target


def R(upstream, **kw):
    return Route(upstream=upstream, **kw)


ROUTES = [
    R("default"),
    R("api", host="api.example.com", path_prefix="/v1/"),
    R("api-users", host="api.example.com", path_prefix="/v1/users/"),
    R("wild", host="*.example.com"),
    R("deep", host="*.eu.example.com"),
    R("ro", host="ro.example.com", methods=frozenset({"GET", "HEAD"})),
    R("strip", host="s.test", path_prefix="/app", strip_prefix=True),
]


def match(host, path, method="GET"):
    r = Router(ROUTES).match(host, path, method)
    return r and r.upstream


def test_exact_host_then_longest_prefix():
    assert match("api.example.com", "/v1/users/7") == "api-users"
    assert match("api.example.com", "/v1/orders") == "api"
    assert match("API.Example.com:8443", "/v1/x") == "api"


def test_exact_host_without_a_matching_prefix_falls_to_wildcard_then_any():
    assert match("api.example.com", "/other") == "wild"
    assert match("nothing.test", "/x") == "default"


def test_longest_wildcard_suffix_wins():
    assert match("www.eu.example.com", "/") == "deep"
    assert match("www.example.com", "/") == "wild"
    assert match("example.com", "/") == "default"     # *.example.com needs a label


def test_methods_restrict_a_route():
    assert match("ro.example.com", "/x", "GET") == "ro"
    assert match("ro.example.com", "/x", "POST") == "wild"


def test_no_match_is_none():
    assert Router([R("api", host="a.test", path_prefix="/api/")]).match("a.test", "/web", "GET") is None


def test_prefix_match_is_on_raw_path():
    r = Router([R("enc", path_prefix="/a%2Fb/")])
    assert r.match("", "/a%2Fb/c", "GET").upstream == "enc"
    assert r.match("", "/a/b/c", "GET") is None


def test_strip_prefix_keeps_query_and_leading_slash():
    route = R("strip", path_prefix="/app", strip_prefix=True)
    assert upstream_target(route, "/app/x?q=%2F") == "/x?q=%2F"
    assert upstream_target(route, "/app") == "/"
    assert upstream_target(route, "/app?x=1") == "/?x=1"
    assert upstream_target(R("keep", path_prefix="/app"), "/app/x") == "/app/x"


def test_split_host():
    assert split_host("Example.COM:80") == "example.com"
    assert split_host("[::1]:8080") == "[::1]"
    assert split_host("[::1]") == "[::1]"
    assert split_host("") == ""
