"""Gateway configuration: every bad value is reported with file, line and key
(also by ``gproxy check``), including those inside API-key files; and
``gproxy hash-key`` prints what such a file holds."""

import hashlib
import os
import subprocess
import sys

import pytest

from gproxy import config, errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = "upstreams:\n  api: {backends: ['http://127.0.0.1:9']}\nroutes:\n"


def bad(text, match, source="g.yaml"):
    with pytest.raises(errors.ConfigError, match=match):
        config.parse(HEAD + text, source)


@pytest.mark.parametrize("route, match", [
    ("  - {upstream: api, rate_limit: {rate: 10/x}}", r"g.yaml:4: routes\[0\].rate_limit.rate: expected a rate"),
    ("  - {upstream: api, rate_limit: {rate: 2000000/s}}", r"rate_limit.rate: must be between"),
    ("  - {upstream: api, rate_limit: {burst: 3}}", r"g.yaml:4: routes\[0\].rate_limit: missing key 'rate'"),
    ("  - {upstream: api, rate_limit: {rate: 1/s, burst: -1}}", r"rate_limit.burst: must be at least 0"),
    ("  - {upstream: api, rate_limit: {rate: 1/s, key: cookie:x}}", r"rate_limit.key: expected client_ip"),
    ("  - {upstream: api, rate_limit: {rate: 1/s, key: consumer}}", r"rate_limit.key: key 'consumer' needs auth"),
    ("  - {upstream: api, auth: {}}", r"routes\[0\].auth: needs at least one of"),
    ("  - {upstream: api, auth: {api_keys: {file: /nonexistent}}}", r"auth.api_keys.file: cannot read"),
    ("  - {upstream: api, auth: {jwt: {secret: short}}}", r"auth.jwt.secret: must be at least 32"),
    ("  - {upstream: api, auth: {jwt: {}}}", r"auth.jwt: needs exactly one of"),
    ("  - {upstream: api, auth: {jwt: {secret: '" + "s" * 40 + "', algorithms: [RS256]}}}",
     r"auth.jwt.algorithms\[0\]: RS256 does not go with secret"),
    ("  - {upstream: api, auth: {jwt: {secret: '" + "s" * 40 + "', algorithms: [none]}}}",
     r"auth.jwt.algorithms\[0\]: expected one of"),
    ("  - {upstream: api, auth: {basic: {htpasswd: /nonexistent, realm: 'a\"b'}}}", r"auth.basic"),
    ("  - {upstream: api, auth: {jwt: {secret: '" + "s" * 40 + "'}, consumer_header: 'X Bad'}}",
     r"auth.consumer_header: expected a header name"),
])
def test_bad_gateway_values_name_file_line_and_key(route, match):
    bad(route, match)


def test_bad_store_values():
    with pytest.raises(errors.ConfigError, match=r"g.yaml:1: rate_limit_store.url: expected redis://"):
        config.parse('rate_limit_store: {url: "http://x"}', "g.yaml")
    with pytest.raises(errors.ConfigError, match=r"g.yaml:2: rate_limit_store.on_error: expected one of allow, deny"):
        config.parse("rate_limit_store:\n  on_error: maybe", "g.yaml")
    with pytest.raises(errors.ConfigError, match=r"rate_limit_store.url: expected redis://"):
        config.parse('rate_limit_store: {url: "redis://h/zero"}', "g.yaml")     # the db is a number
    with pytest.raises(errors.ConfigError, match=r"rate_limit_store.max_keys: must be at most"):
        config.parse("rate_limit_store: {max_keys: 1000000000}", "g.yaml")
    with pytest.raises(errors.ConfigError, match=r"rate_limit_store.timeout: must be more than 0"):
        config.parse("rate_limit_store: {timeout: 0}", "g.yaml")


def test_key_file_errors_name_the_key_file_its_line_and_consumer(tmp_path):
    keys = tmp_path / "keys.yaml"
    good = "sha256:" + "a" * 64
    cases = [
        (f"alice: {good}\nbob: nothex\n", r"keys.yaml:2: bob: expected sha256:"),
        (f"alice: {good}\nbob: [{good}]\n", r"keys.yaml:2: bob\[0\]: the same key is already given to 'alice'"),
        (f"alice: {good}\n'bad name': {good}\n", r"keys.yaml:2: bad name: names use"),
        ("alice: [\n", r"keys.yaml:2: not valid YAML"),
    ]
    for text, match in cases:
        keys.write_text(text)
        bad(f"  - {{upstream: api, auth: {{api_keys: {{file: {keys}}}}}}}", match)
    keys.write_text(f"alice: {good}\nbob:\n  - {'B' * 64}\n  - sha256:{'c' * 64}\n")
    cfg = config.parse(HEAD + f"  - {{upstream: api, auth: {{api_keys: {{file: {keys}}}}}}}")
    assert cfg.routes[0].auth.api_keys.keys == {bytes.fromhex("a" * 64): "alice",
                                                bytes.fromhex("b" * 64): "bob", bytes.fromhex("c" * 64): "bob"}
    assert "aaaa" not in repr(cfg.routes[0].auth), "key digests stay out of reprs"


def test_pem_jwks_and_htpasswd_contents_are_checked(tmp_path):
    (tmp_path / "k.pem").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    (tmp_path / "k.jwks").write_text('{"keys": []}')
    (tmp_path / "u.htpasswd").write_text("# users\nalice:$apr1$x$y\nbroken line\n")
    bad(f"  - {{upstream: api, auth: {{jwt: {{public_key_file: {tmp_path}/k.pem}}}}}}",
        r"auth.jwt.public_key_file: not a PEM public key")
    bad(f"  - {{upstream: api, auth: {{jwt: {{jwks_file: {tmp_path}/k.jwks}}}}}}",
        r"auth.jwt.jwks_file: expected a JWKS")
    bad(f"  - {{upstream: api, auth: {{basic: {{htpasswd: {tmp_path}/u.htpasswd}}}}}}",
        r"g.yaml:4: routes\[0\].auth.basic.htpasswd: .*u.htpasswd:3: expected user:hash")


def test_gproxy_check_reports_a_bad_gateway_value(tmp_path):
    f = tmp_path / "gproxy.yaml"
    f.write_text(HEAD + "  - upstream: api\n    rate_limit:\n      rate: 10 per second\n")
    r = subprocess.run([sys.executable, "-m", "gproxy.cli", "check", str(f)], capture_output=True,
                       text=True, cwd=REPO, timeout=30)
    assert r.returncode == 1
    assert f"{f}:6: routes[0].rate_limit.rate: expected a rate like 10/s or 600/m" in r.stderr, r.stderr


def test_hash_key_reads_stdin_and_new_makes_a_key():
    r = subprocess.run([sys.executable, "-m", "gproxy.cli", "hash-key"], input="s3cret\n",
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0 and r.stdout == "sha256:" + hashlib.sha256(b"s3cret").hexdigest() + "\n"
    r = subprocess.run([sys.executable, "-m", "gproxy.cli", "hash-key", "--new"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    key = r.stderr.split("key:", 1)[1].strip()
    assert len(key) >= 40 and r.stdout.strip() == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def test_gproxy_check_builds_the_auth_a_worker_would_and_reports_unusable_keys(tmp_path):
    # a JWKS that is well-formed JSON but whose only key PyJWT cannot use
    (tmp_path / "k.jwks").write_text('{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}')
    f = tmp_path / "gproxy.yaml"
    f.write_text(HEAD + "  - {upstream: api, auth: {jwt: {jwks_file: k.jwks}}}\n")
    config.parse(f.read_text(), str(f))        # the config-level check passes ...
    r = subprocess.run([sys.executable, "-m", "gproxy.cli", "check", str(f)], capture_output=True,
                       text=True, cwd=REPO, timeout=30)
    assert r.returncode == 1, r                 # ... and gproxy check does not
    assert f"{f}: routes[0].auth: jwks_file: " in r.stderr and "usable keys" in r.stderr, r.stderr
