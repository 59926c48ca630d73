"""Forward-proxy access control as transcripts: pure decisions, no sockets."""

import ipaddress as ip

import pytest

from gproxy import acl, config, errors


def cfg(text=""):
    return config.parse("forward_proxy:\n  enabled: true\n" + text).forward_proxy


def A(*xs):
    return [ip.ip_address(x) for x in xs]


@pytest.mark.parametrize("raw, want", [
    ("http://Example.COM/a%2Fb?q=1", ("example.com", 80, "/a%2Fb?q=1", "Example.COM")),
    ("http://h:8080", ("h", 8080, "/", "h:8080")),
    ("http://h?x=1", ("h", 80, "/?x=1", "h")),
    ("http://h./p#frag", ("h", 80, "/p", "h.")),
    ("HTTP://[::1]:81/x", ("::1", 81, "/x", "[::1]:81")),
])
def test_parse_absolute(raw, want):
    d = acl.parse_absolute(raw)
    assert (d.host, d.port, d.target, d.authority) == want


@pytest.mark.parametrize("raw", ["https://h/", "ftp://h/", "http://u:p@h/", "http://h:0/",
                                 "http://h:70000/", "http://bad_!/", "http://[zz]/", "h/x", "http://:80/"])
def test_parse_absolute_rejects(raw):
    with pytest.raises(errors.BadRequest):
        acl.parse_absolute(raw)


def test_parse_connect():
    d = acl.parse_connect("LocalHost:443")
    assert (d.host, d.port, d.name) == ("localhost", 443, "localhost:443")
    assert acl.parse_connect("[2001:db8::1]:8443").name == "[2001:db8::1]:8443"
    for bad in ("example.com", "example.com:", "example.com:x", "/path"):
        with pytest.raises(errors.BadRequest):
            acl.parse_connect(bad)


def test_clients():
    c = cfg()
    acl.check_client("127.0.0.1", c.allow_clients)
    acl.check_client("::1", c.allow_clients)
    acl.check_client("::ffff:127.0.0.9", c.allow_clients)     # IPv4-mapped
    for bad in ("10.0.0.1", "::2", "unix-socket"):
        with pytest.raises(acl.Refusal) as e:
            acl.check_client(bad, c.allow_clients)
        assert e.value.reason == "client_denied"


def test_ports_default_to_443_for_connect_and_squid_safe_ports_otherwise():
    c = cfg()
    acl.check_destination(acl.parse_connect("h:443"), c, connect=True)
    with pytest.raises(acl.Refusal) as e:
        acl.check_destination(acl.parse_connect("h:22"), c, connect=True)
    assert e.value.reason == "denied_port" and "connect_ports" in e.value.detail
    acl.check_destination(acl.parse_absolute("http://h:8080/"), c, connect=False)
    with pytest.raises(acl.Refusal):
        acl.check_destination(acl.parse_absolute("http://h:25/"), c, connect=False)


def test_host_globs_deny_first_then_allow_list():
    c = cfg('  deny_hosts: ["*.ads.example", "ads.example"]\n  allow_hosts: ["*.example", "example"]\n')
    ok = ["news.example", "example"]
    denied = ["x.ads.example", "ADS.example.", "other.test"]
    for h in ok:
        acl.check_destination(acl.parse_absolute(f"http://{h}/"), c, connect=False)
    for h in denied:
        with pytest.raises(acl.Refusal) as e:
            acl.check_destination(acl.parse_absolute(f"http://{h}/"), c, connect=False)
        assert e.value.reason == "denied_host"


@pytest.mark.parametrize("addr, kind", [
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("127.0.0.1", "loopback"),
    ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"), ("10.1.2.3", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("fd00::1", "private"), ("100.64.0.1", "non-global"),
    ("224.0.0.1", "multicast"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_private_kinds(addr, kind):
    assert acl.private_kind(ip.ip_address(addr)) == kind


def test_private_destination_blocked_unless_allow_listed_or_off():
    d = acl.parse_absolute("http://internal.example/")
    with pytest.raises(acl.Refusal) as e:
        acl.check_addresses(d, A("93.184.216.34", "10.0.0.5"), cfg())   # one bad address is enough
    assert e.value.reason == "private_destination" and "10.0.0.5" in e.value.detail
    acl.check_addresses(d, A("93.184.216.34"), cfg())
    acl.check_addresses(d, A("10.0.0.5"), cfg('  allow_private: ["10.0.0.0/24"]\n'))
    with pytest.raises(acl.Refusal):
        acl.check_addresses(d, A("10.0.1.5"), cfg('  allow_private: ["10.0.0.0/24"]\n'))
    acl.check_addresses(d, A("127.0.0.1"), cfg("  block_private_destinations: false\n"))


def test_loop_detection_by_address_and_via():
    own = [(ip.ip_address("127.0.0.1"), 8080), (None, 9090)]
    with pytest.raises(acl.Refusal) as e:
        acl.check_not_self(A("127.0.0.1"), 8080, own)
    assert e.value.reason == "loop"
    with pytest.raises(acl.Refusal):
        acl.check_not_self(A("127.0.0.5"), 9090, own)    # wildcard listener: any loopback
    acl.check_not_self(A("127.0.0.1"), 8081, own)
    acl.check_not_self(A("127.0.0.2"), 8080, own)
    assert acl.via_loop(["1.0 a, 1.1 Proxy1:8080 (gproxy)"], "proxy1:8080")
    assert not acl.via_loop(["1.1 proxy2:8080", ""], "proxy1:8080")


def test_forward_config_errors_name_file_line_and_key(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"f.yaml:3: forward_proxy.connect_ports\[0\]: "):
        config.parse("forward_proxy:\n  enabled: true\n  connect_ports: [0]\n", "f.yaml")
    with pytest.raises(errors.ConfigError, match=r"f.yaml:2: forward_proxy.auth.htpasswd: cannot read"):
        config.parse("forward_proxy:\n  auth: {htpasswd: /nonexistent/users}\n", "f.yaml")
    with pytest.raises(errors.ConfigError, match=r"f.yaml:2: tunnel.idle_timeout: "):
        config.parse("tunnel:\n  idle_timeout: soon\n", "f.yaml")
    with pytest.raises(errors.ConfigError, match=r"f.yaml:2: forward_proxy.deny_hosts\[0\]: "):
        config.parse('forward_proxy:\n  deny_hosts: ["a b"]\n', "f.yaml")
    t = config.parse("tunnel: {idle_timeout: 30s, max_duration: 1h}\n").tunnel
    assert (t.idle_timeout, t.max_duration, t.upgrade_protocols) == (30.0, 3600.0, ("websocket",))
