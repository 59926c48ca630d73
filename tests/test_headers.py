from gproxy.headers import (REQUEST_DROP, RESPONSE_DROP, client_address, forwarded_for,
                            strip_hop_by_hop)


def test_connection_listed_and_rfc_hop_by_hop_fields_are_dropped():
    fields = [("Connection", "close, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "300"),
              ("TE", "trailers"), ("Trailer", "X"), ("Transfer-Encoding", "chunked"),
              ("Upgrade", "h2c"), ("Proxy-Connection", "keep-alive, X-Other"), ("X-Other", "2"),
              ("Proxy-Authorization", "Basic x"), ("X-Keep", "a"), ("X-Keep", "b")]
    assert strip_hop_by_hop(fields, REQUEST_DROP) == [("X-Keep", "a"), ("X-Keep", "b")]


def test_response_drop_keeps_repeated_set_cookie_in_order():
    fields = [("Set-Cookie", "a=1"), ("Server", "up"), ("Date", "x"), ("Set-Cookie", "b=2"),
              ("connection", "keep-alive")]
    assert strip_hop_by_hop(fields, RESPONSE_DROP) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_forwarded_for_trust():
    assert forwarded_for("1.1.1.1", "127.0.0.1", True) == "1.1.1.1, 127.0.0.1"
    assert forwarded_for("1.1.1.1", "127.0.0.1", False) == "127.0.0.1"
    assert forwarded_for(None, "10.0.0.1", True) == "10.0.0.1"


def test_client_address_walks_past_trusted_hops():
    trusted = {"127.0.0.1", "10.0.0.2"}.__contains__
    assert client_address("203.0.113.9, 10.0.0.2", "127.0.0.1", trusted) == "203.0.113.9"
    assert client_address("203.0.113.9", "192.0.2.1", trusted) == "192.0.2.1"   # untrusted peer
    assert client_address("", "127.0.0.1", trusted) == "127.0.0.1"
