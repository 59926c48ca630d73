"""The API gateway through real gunicorn: rate limits (burst then 429, refill,
per key, global across workers, kept across a HUP) and authentication (API
keys, Basic, JWT: right, wrong, missing; 403; the credential stripped; the
consumer sent on). Every refused request must leave the backend untouched."""

import base64
import hashlib
import http.client
import os
import signal
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from passlib.apache import HtpasswdFile

from servers import wait_until, worker_of

API_KEY = "alice-key-0123456789"
BOB_KEY = "bob-key-9876543210"
SECRET = "s" * 40


def request(g, path, headers=None, method="GET", body=None):
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def status(g, path, headers=None):
    return request(g, path, headers)[0]


def sha(key):
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def keyfiles(tmp_path):
    (tmp_path / "keys.yaml").write_text(f'alice: "{sha(API_KEY)}"\nbob: ["{sha(BOB_KEY)}"]\n')
    f = HtpasswdFile(str(tmp_path / "users.htpasswd"), new=True, default_scheme="sha256_crypt")
    f.set_password("carol", "carol-pass")
    f.save()
    return tmp_path


def conf(b, routes, top="", workers=2):
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: {workers}
{top}
upstreams:
  api: {{backends: ["{b.url}"]}}
routes:
{routes}
"""


# --- rate limits ------------------------------------------------------------------

def test_burst_then_429_with_retry_after_and_ratelimit_fields_then_refill(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "  - {path_prefix: /, upstream: api, name: lim,"
                       " rate_limit: {rate: 5/s, burst: 2, key: route}}"))
    got = [request(g, f"/r{i}") for i in range(5)]
    assert [s for s, _, _ in got] == [200, 200, 200, 429, 429], [s for s, _, _ in got]
    _, h, body = got[3]
    assert h["retry-after"] == "1" and h["ratelimit-policy"] == '"lim";q=5;w=1', h
    assert h["ratelimit"] == '"lim";r=0;t=1' and body == b"Too many requests.\n", (h, body)
    assert [r.target for r in b.received] == ["/r0", "/r1", "/r2"], "a refused request reached the backend"
    time.sleep(0.25)            # one interval (200 ms) refills one request, not two
    assert [status(g, "/again"), status(g, "/again")] == [200, 429]
    recs = g.access_records(at_least=7)
    refused = [r for r in recs if r["status"] == 429]
    assert refused and all(r["reason"] == "rate_limit" and r["error"] == "rate_limited"
                           and r["backend"] is None for r in refused), refused


def test_each_key_has_its_own_bucket_and_missing_header_falls_back_to_client_ip(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "  - {path_prefix: /, upstream: api,"
                       " rate_limit: {rate: 1/m, burst: 1, key: 'header:X-User'}}"))
    for user in ("u1", "u2"):
        got = [status(g, "/", {"X-User": user}) for _ in range(3)]
        assert got == [200, 200, 429], f"{user}: got {got}"
    assert [status(g, "/") for _ in range(3)] == [200, 200, 429], "no header: limited by address"


def test_client_ip_key_uses_the_address_after_trusted_proxies(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "  - {path_prefix: /, upstream: api, rate_limit: {rate: 1/m, key: client_ip}}",
                    top='trusted_proxies: ["127.0.0.1/32"]'))
    assert [status(g, "/", {"X-Forwarded-For": "198.51.100.7"}) for _ in range(2)] == [200, 429]
    assert status(g, "/", {"X-Forwarded-For": "198.51.100.8"}) == 200


def hammer(g, seconds, clients, max_requests):
    """``clients`` threads on keep-alive connections for ``seconds``; the
    statuses, bounded by ``max_requests`` in all."""
    out, lock, stop = [], threading.Lock(), time.monotonic() + seconds

    def client():
        c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
        while time.monotonic() < stop:
            with lock:
                if len(out) >= max_requests:
                    return
            c.request("GET", "/h")
            r = c.getresponse()
            r.read()
            with lock:
                out.append(r.status)
        c.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.monotonic() - t0


def warm_up(g, n, timeout=30):
    """Until ``n`` different workers have answered (they boot at their own pace)."""
    seen = set()

    def one():
        c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
        c.request("GET", "/warm/")
        c.getresponse().read()
        seen.add(worker_of(g, c.sock))
        c.close()
        return len(seen - {None}) >= n
    wait_until(one, timeout, f"{n} workers answering", interval=0.01)


def test_limit_is_global_across_four_workers_within_ten_percent(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "  - {path_prefix: /warm/, upstream: api}\n"
                       "  - {path_prefix: /, upstream: api, rate_limit: {rate: 20/s, burst: 10, key: route}}",
                    workers=4))
    warm_up(g, 4)
    warm = len(b.received)
    out, _ = hammer(g, 7.0, clients=8, max_requests=60000)
    assert set(out) == {200, 429}, set(out)
    recs = [r for r in g.access_records(at_least=warm + len(out), timeout=10) if r["target"] == "/h"]
    assert len(recs) == len(out)
    # The window is what the workers saw (the first requests wait for the
    # workers to boot): from the first decision to the last.
    starts = sorted(r["time"] for r in recs)
    span = starts[-1] - starts[0]
    admitted = out.count(200)
    want = 20 * span + 10
    assert span > 4, f"only {span:.1f}s of load"
    assert out.count(429) > 5 * admitted, "the clients must far exceed the rate"
    assert abs(admitted - want) <= 0.1 * want, f"admitted {admitted} in {span:.2f}s, want {want:.0f} ± 10%"
    assert len(b.received) - warm == admitted, "the backend saw a refused request"


def test_buckets_survive_a_hup_and_reset_only_for_the_changed_route(gproxy, backends):
    b, = backends(1)
    route = "  - {{path_prefix: /{p}/, upstream: api, name: {p}, rate_limit: {{rate: {r}, key: route}}}}"
    text = conf(b, route.format(p="a", r="1/m") + "\n" + route.format(p="b", r="1/m"))
    g = gproxy(text)
    assert [status(g, "/a/"), status(g, "/a/"), status(g, "/b/"), status(g, "/b/")] == [200, 429, 200, 429]
    old = set(g.worker_pids())
    # route b's rate changes, route a's does not
    g.write_config(conf(b, route.format(p="a", r="1/m") + "\n" + route.format(p="b", r="2/m")))
    os.kill(g.proc.pid, signal.SIGHUP)
    wait_until(lambda: len(set(g.worker_pids()) - old) == 2 and not (set(g.worker_pids()) & old),
               15, "two new workers, the old ones gone")
    assert status(g, "/a/") == 429, "route a's bucket must outlive the workers"
    assert status(g, "/b/") == 200, "route b's limit changed: its buckets start afresh"


# --- authentication ----------------------------------------------------------------

def auth_route(auth, extra=""):
    return f"  - {{path_prefix: /, upstream: api, name: secure, auth: {auth}{extra}}}"


def test_api_keys_right_wrong_missing_and_bearer(gproxy, backends, keyfiles):
    b, = backends(1)
    g = gproxy(conf(b, auth_route(f'{{api_keys: {{file: "{keyfiles}/keys.yaml"}}}}')))
    s, h, _ = request(g, "/none")
    assert (s, h.get("www-authenticate")) == (401, 'Bearer realm="gproxy"'), (s, h)
    s, h, _ = request(g, "/wrong", {"X-Api-Key": "nope"})
    assert (s, h["www-authenticate"]) == (401, 'Bearer realm="gproxy", error="invalid_token"'), (s, h)
    assert status(g, "/header", {"X-Api-Key": API_KEY, "X-Consumer": "root"}) == 200
    assert status(g, "/bearer", {"Authorization": f"Bearer {BOB_KEY}"}) == 200
    assert [r.target for r in b.received] == ["/header", "/bearer"]
    first, second = b.received
    assert first.header("X-Api-Key") is None and second.header("Authorization") is None, "credential forwarded"
    assert first.all("X-Consumer") == ["alice"] and second.all("X-Consumer") == ["bob"]
    recs = {r["target"]: r for r in g.access_records(at_least=4)}
    assert (recs["/none"]["reason"], recs["/wrong"]["reason"]) == ("no_credential", "bad_api_key")
    # a refused request is logged with its request id, as any other
    assert len(recs["/none"]["request_id"]) == 24 and recs["/wrong"]["request_id"]
    assert recs["/header"]["consumer"] == "alice" and recs["/header"]["reason"] is None


def test_consumers_list_gives_403_and_forward_credential_keeps_it(gproxy, backends, keyfiles):
    b, = backends(1)
    g = gproxy(conf(b, auth_route(f'{{api_keys: {{file: "{keyfiles}/keys.yaml", header: X-Key}},'
                                  ' consumers: [bob], forward_credential: true, consumer_header: X-User}')))
    assert status(g, "/alice", {"X-Key": API_KEY}) == 403
    assert status(g, "/bob", {"X-Key": BOB_KEY}) == 200
    got, = b.received
    assert got.target == "/bob" and got.header("X-Key") == BOB_KEY and got.header("X-User") == "bob"
    assert g.access_records(at_least=2)[0]["reason"] == "consumer_not_allowed"


def test_basic_right_wrong_missing(gproxy, backends, keyfiles):
    b, = backends(1)
    g = gproxy(conf(b, auth_route(f'{{basic: {{htpasswd: "{keyfiles}/users.htpasswd", realm: staff}}}}')))
    basic = "Basic " + base64.b64encode(b"carol:carol-pass").decode()
    wrong = "Basic " + base64.b64encode(b"carol:nope").decode()
    s, h, _ = request(g, "/none")
    assert (s, h["www-authenticate"]) == (401, 'Basic realm="staff", charset="UTF-8"')
    assert status(g, "/wrong", {"Authorization": wrong}) == 401
    assert status(g, "/ok", {"Authorization": basic}) == 200
    got, = b.received
    assert got.header("Authorization") is None and got.header("X-Consumer") == "carol"


def rsa_pair(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "jwt.pub").write_bytes(pem)
    return key


def token(key, alg="RS256", **claims):
    body = {"sub": "dave", "iss": "https://issuer.test", "aud": "gproxy-api",
            "exp": int(time.time()) + 60, **claims}
    return "Bearer " + jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg)


def test_jwt_signature_expiry_issuer_audience_checked(gproxy, backends, tmp_path):
    b, = backends(1)
    key = rsa_pair(tmp_path)
    g = gproxy(conf(b, auth_route(f'{{jwt: {{public_key_file: "{tmp_path}/jwt.pub", '
                                  'issuer: "https://issuer.test", audience: gproxy-api}}')))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = [
        ("/ok", token(key), 200, None),
        ("/expired", token(key, exp=int(time.time()) - 10), 401, "token_expired"),
        ("/notyet", token(key, nbf=int(time.time()) + 600), 401, "token_not_yet_valid"),
        ("/issuer", token(key, iss="https://evil.test"), 401, "token_issuer"),
        ("/audience", token(key, aud="other"), 401, "token_audience"),
        ("/signature", token(other), 401, "token_signature"),
        ("/noexp", token(key, exp=None), 401, "token_claim_missing"),
        ("/hs-confusion", token(SECRET, alg="HS256"), 401, "token_algorithm"),
        ("/garbage", "Bearer not.a.jwt", 401, "token_malformed"),
        ("/none", None, 401, "no_credential"),
    ]
    for path, cred, want, _ in cases:
        s, h, _ = request(g, path, {"Authorization": cred} if cred else {})
        assert s == want, f"{path}: got {s}, want {want}"
        if s == 401:
            assert h["www-authenticate"].startswith('Bearer realm="gproxy"'), h
    assert [r.target for r in b.received] == ["/ok"]
    assert b.received[0].header("X-Consumer") == "dave" and b.received[0].header("Authorization") is None
    reasons = {r["target"]: r["reason"] for r in g.access_records(at_least=len(cases))}
    assert reasons == {p: r for p, _, _, r in cases}, reasons


def test_jwt_hmac_secret_and_consumer_key_rate_limit(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, auth_route(f'{{jwt: {{secret: "{SECRET}"}}}}',
                                  ", rate_limit: {rate: 1/m, burst: 1, key: consumer}")))
    dave = token(SECRET, alg="HS256", aud=None, iss=None)
    erin = token(SECRET, alg="HS256", aud=None, iss=None, sub="erin")
    # an audience in the token that the route does not expect is refused (PyJWT)
    assert status(g, "/", {"Authorization": token(SECRET, alg="HS256")}) == 401
    assert [status(g, "/", {"Authorization": dave}) for _ in range(3)] == [200, 200, 429]
    assert status(g, "/", {"Authorization": erin}) == 200, "another consumer has its own bucket"
    assert status(g, "/", {"Authorization": "Bearer x"}) == 401, "auth comes before the limit"


def test_jwks_file_picks_the_key_by_kid_and_basic_or_api_key_on_one_route(gproxy, backends, keyfiles):
    import json
    b, = backends(1)
    k1, k2 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks = {"keys": [dict(json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), kid=kid, alg="RS256")
                     for k, kid in ((k1, "one"), (k2, "two"))]}
    (keyfiles / "keys.jwks").write_text(json.dumps(jwks))
    g = gproxy(conf(b, auth_route(f'{{jwt: {{jwks_file: "{keyfiles}/keys.jwks"}}, '
                                    f'basic: {{htpasswd: "{keyfiles}/users.htpasswd"}}, '
                                    f'api_keys: {{file: "{keyfiles}/keys.yaml"}}}}')))

    def signed(key, kid):
        return "Bearer " + jwt.encode({"sub": kid, "exp": int(time.time()) + 60}, key, algorithm="RS256",
                                      headers={"kid": kid})
    assert status(g, "/", {"Authorization": signed(k1, "one")}) == 200
    assert status(g, "/", {"Authorization": signed(k2, "two")}) == 200
    assert status(g, "/", {"Authorization": signed(k1, "two")}) == 401, "signed by the wrong kid's key"
    assert status(g, "/", {"X-Api-Key": API_KEY}) == 200
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    c.request("GET", "/")
    r = c.getresponse()
    challenges = r.msg.get_all("WWW-Authenticate")
    c.close()
    assert r.status == 401 and challenges == ['Bearer realm="gproxy"', 'Basic realm="gproxy", charset="UTF-8"'], \
        challenges      # one challenge per scheme (RFC 9110 11.6.1)
    assert [r.header("X-Consumer") for r in b.received] == ["one", "two", "alice"]


def test_route_counters_for_rate_limited_and_auth_refused(gproxy, backends, keyfiles):
    from monitoring import StatsdListener
    b, = backends(1)
    lst = StatsdListener()
    try:
        g = gproxy(conf(b, auth_route(f'{{api_keys: {{file: "{keyfiles}/keys.yaml"}}, consumers: [alice]}}',
                                      ", rate_limit: {rate: 1/m, key: consumer}"),
                        top=f"statsd: {{port: {lst.port}}}"))
        got = [status(g, "/", h) for h in ({}, {"X-Api-Key": "nope"}, {"X-Api-Key": BOB_KEY},
                                           {"X-Api-Key": API_KEY}, {"X-Api-Key": API_KEY})]
        assert got == [401, 401, 403, 200, 429], got
        p = "gproxy.route.secure."
        wait_until(lambda: sum(lst.counters(p + "requests.").values()) >= 5, 10, "five recorded requests")
        c = lst.counters(p)
        assert (c.get(p + "auth_refused"), c.get(p + "rate_limited")) == (3, 1), c
        e = lst.counters("gproxy.server.errors.")
        assert e == {"gproxy.server.errors.unauthorized": 2, "gproxy.server.errors.consumer_forbidden": 1,
                     "gproxy.server.errors.rate_limited": 1}, e
    finally:
        lst.close()


def test_key_files_are_read_again_on_hup(gproxy, backends, keyfiles):
    b, = backends(1)
    g = gproxy(conf(b, auth_route(f'{{api_keys: {{file: "{keyfiles}/keys.yaml"}}}}')))
    assert status(g, "/", {"X-Api-Key": API_KEY}) == 200
    (keyfiles / "keys.yaml").write_text(f'bob: "{sha(BOB_KEY)}"\n')     # alice's key revoked
    old = set(g.worker_pids())
    os.kill(g.proc.pid, signal.SIGHUP)
    wait_until(lambda: len(set(g.worker_pids()) - old) == 2 and not (set(g.worker_pids()) & old),
               15, "two new workers, the old ones gone")
    assert status(g, "/", {"X-Api-Key": API_KEY}) == 401
    assert status(g, "/", {"X-Api-Key": BOB_KEY}) == 200


def test_unusable_jwks_answers_500_on_its_route_and_the_rest_keeps_serving(gproxy, backends, tmp_path):
    b, = backends(1)
    (tmp_path / "bad.jwks").write_text('{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}')
    g = gproxy(conf(b, f'  - {{path_prefix: /jwt/, upstream: api, auth: {{jwt: {{jwks_file: "{tmp_path}/bad.jwks"}}}}}}\n'
                       "  - {path_prefix: /, upstream: api}"))
    assert status(g, "/jwt/x", {"Authorization": "Bearer a.b.c"}) == 500
    assert status(g, "/open") == 200 and [r.target for r in b.received] == ["/open"]
    assert "authentication unavailable, answering 500" in g.stderr()


def test_refused_upload_with_expect_100_continue_never_sends_its_body(gproxy, backends, keyfiles):
    from servers import raw_request
    b, = backends(1)
    g = gproxy(conf(b, auth_route(f'{{api_keys: {{file: "{keyfiles}/keys.yaml"}}}}')))
    got = raw_request(g.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 1000000\r\n\r\n", timeout=5, read_until_close=False)
    assert got.startswith(b"HTTP/1.1 401 "), got[:200]
    assert b"100 Continue" not in got and not b.received
