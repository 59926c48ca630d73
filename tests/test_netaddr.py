"""Addresses: the one CIDR matcher (IPv4-mapped addresses unmapped) and the
one host:port formatter and parser, as transcripts; then trusted_proxies
behind a [::] listener over real sockets."""

import ipaddress
import re

import pytest

from gproxy import acl, admin, config, netaddr
from servers import raw_request


def nets(*cidrs):
    return netaddr.Networks(cidrs)


@pytest.mark.parametrize("addr, want", [
    ("127.0.0.1", True),
    ("::ffff:127.0.0.1", True),          # what a [::] listener reports for an IPv4 client
    ("::FFFF:127.0.0.1", True),
    ("127.0.0.2", False),
    ("::ffff:127.0.0.2", False),
    ("10.200.0.1", True),
    ("::ffff:10.200.0.1", True),
    ("2001:db8::5", True),
    ("2001:db9::5", False),
    ("fe80::1%eth0", True),              # the zone index is not part of the address
    ("not-an-ip", False),
    ("", False),
    ("::", False),                       # 0.0.0.0/0 is not written here: :: is IPv6 only
])
def test_match_unmaps_ipv4_mapped_addresses(addr, want):
    n = nets("127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32", "fe80::/10")
    assert n.match(addr) is want, f"{addr!r}: got {not want}, want {want}"
    assert n.match(addr) is want, "a cached answer must equal the first"


def test_match_takes_address_objects_and_an_empty_list_matches_nothing():
    n = nets("192.0.2.0/24")
    assert n.match(ipaddress.ip_address("::ffff:192.0.2.9"))
    assert not n.match(ipaddress.ip_address("192.0.3.1"))
    assert not netaddr.Networks().match("127.0.0.1")


def test_an_ipv4_mapped_network_is_the_ipv4_network():
    n = nets("::ffff:10.0.0.0/104")
    assert list(n) == [ipaddress.ip_network("10.0.0.0/8")]
    assert n.match("10.9.9.9") and n.match("::ffff:10.9.9.9") and not n.match("11.0.0.1")


def test_networks_is_still_a_tuple_of_networks():
    n = nets("10.1.2.3", "2001:db8::1/64")
    assert [str(x) for x in n] == ["10.1.2.3/32", "2001:db8::/64"]
    assert netaddr.Networks() == () and hash(n) == hash(tuple(n))


def test_the_cache_is_bounded():
    n = nets("10.0.0.0/8")
    for i in range(netaddr.CACHE_MAX + 10):     # client-chosen X-Forwarded-For hops
        n.match(f"192.0.{i // 256 % 256}.{i % 256}")
    assert len(n._cache) <= netaddr.CACHE_MAX, f"got {len(n._cache)} cached, want <= {netaddr.CACHE_MAX}"
    assert n.match("10.1.1.1") and not n.match("192.0.0.1")


@pytest.mark.parametrize("host, port, text", [
    ("127.0.0.1", 80, "127.0.0.1:80"),
    ("example.com", 8080, "example.com:8080"),
    ("::1", 9901, "[::1]:9901"),
    ("2001:db8::1", 443, "[2001:db8::1]:443"),
    ("", 8080, ":8080"),
])
def test_join_and_split_round_trip(host, port, text):
    assert netaddr.join(host, port) == text
    assert netaddr.split(text) == (host, port)


@pytest.mark.parametrize("text, reason", [
    ("localhost", "expected host:port"),
    ("::1:8080", "an IPv6 address is written in brackets"),
    ("[::1]8080", "expected [IPv6]:port"),
    ("[nope]:80", "not an IPv6 address in brackets"),
    ("h:0", "not a port"),
    ("h:65536", "not a port"),
    ("h:http", "not a port"),
    ("h:\u00b2", "not a port"),              # isdigit() says yes, int() says no
])
def test_split_refuses_with_the_reason(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        netaddr.split(text)


def test_every_cidr_list_in_the_config_uses_the_one_matcher():
    """trusted_proxies did not unmap IPv4-mapped addresses while the forward
    proxy's ACL and the admin allow list did: three matchers, two meanings."""
    c = config.parse('trusted_proxies: ["127.0.0.1/32"]\n'
                     'admin: {allow: ["10.0.0.0/8"]}\n'
                     'forward_proxy: {allow_clients: ["192.0.2.0/24"], allow_private: ["10.1.0.0/16"]}\n')
    assert c.trusted_proxies.match("::ffff:127.0.0.1")
    assert admin.client_allowed("::ffff:10.1.2.3", c.admin.allow)
    acl.check_client("::ffff:192.0.2.7", c.forward_proxy.allow_clients)
    acl.check_addresses(acl.Destination("h", 80), [ipaddress.ip_address("::ffff:10.1.0.9")], c.forward_proxy)
    with pytest.raises(acl.Refusal):
        acl.check_client("::ffff:192.0.3.7", c.forward_proxy.allow_clients)


@pytest.mark.parametrize("listen, message", [
    ("::1:8080", "b.yaml:1: listen[0]: expected host:port, got '::1:8080': an IPv6 address is written in brackets"),
    ("[::1]:99999", "b.yaml:1: listen[0]: expected host:port, got '[::1]:99999': not a port"),
])
def test_listen_addresses_are_parsed_by_the_one_parser(listen, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(f'listen: ["{listen}"]\n', "b.yaml")
    assert str(e.value).startswith(message), f"got {e.value}, want {message}"


def test_trusted_proxy_behind_an_ipv6_wildcard_listener(gproxy, backends):
    """Behind a [::] listener an nginx on 127.0.0.1 arrives as
    ::ffff:127.0.0.1, which trusted_proxies ["127.0.0.1/32"] did not match:
    its X-Forwarded-For was replaced instead of extended."""
    b, = backends(1)
    g = gproxy(f"""
listen: ["[::]:{{port}}"]
workers: 1
trusted_proxies: ["127.0.0.1/32"]
upstreams: {{api: {{backends: ["{b.url}"]}}}}
routes: [{{upstream: api}}]
""")
    out = raw_request(g.port, b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.9\r\n"
                              b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    xff = b.received[-1].header("X-Forwarded-For")
    first, _, last = xff.partition(", ")
    assert first == "203.0.113.9", f"got X-Forwarded-For {xff!r}, want the client's value extended"
    assert netaddr.address(last) == ipaddress.ip_address("127.0.0.1"), f"got last hop {last!r}"
    rec = g.access_records(1)[-1]
    assert rec["client"] == "203.0.113.9", f"got client {rec['client']!r}, want the right-most untrusted hop"
