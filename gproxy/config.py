"""Configuration: one YAML file into frozen dataclasses.

Rule 1: every error names the file, the line and the key path, e.g.
        ``gproxy.yaml:14: upstreams.api.backends[1].url: not an http(s) URL``.
Rule 2: unknown keys are errors (a typo must not silently mean a default).
Rule 3: every default lives here, next to the precedent it follows.

Rule 4: ``${VAR}`` and ``${VAR:-default}`` in a value take it from the
        environment (containers, secrets); an unset variable without a default
        is an error naming file, line and key. ``$${`` is a literal ``${``.

Where the file comes from: ``$GPROXY_CONFIG``, else ``./gproxy.yaml``, else
the built-in default (``DEFAULT_YAML``). This is the only module that imports
``yaml``.
"""

import math
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml

from . import netaddr
from .errors import ConfigError

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader

BALANCE_POLICIES = ("round_robin", "least_conn", "random", "consistent_hash")
HASH_KEY_KINDS = ("header", "cookie", "client_ip", "path", "uri")
LOG_FORMATS = ("json", "combined", "fields", "off")
ERROR_LOG_FORMATS = ("text", "json")
# What access_log.fields may list (README "Access log"); the upstream_* lists
# have one entry per attempt, as nginx's $upstream_addr and $upstream_status.
ACCESS_LOG_FIELDS = ("time_iso8601", "time_local", "client", "method", "target", "protocol",
                     "request", "host", "status", "bytes_in", "bytes_out", "duration",
                     "upstream_time", "route", "upstream", "backend", "retries", "request_id",
                     "error", "user_agent", "referer", "upstream_addr", "upstream_status",
                     "upstream_response_time", "consumer", "reason", "cache_status")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")    # gunicorn's
WORKER_CLASSES = ("gproxy",)

DEFAULT_YAML = """\
# gproxy built-in default: a forward proxy on loopback for local clients
# (curl -x http://127.0.0.1:8080 ...). With no routes every origin-form
# request is answered 404 until a config file says where to send it.
# GPROXY_LISTEN changes the address (the container image sets 0.0.0.0:8080).
listen: ["${GPROXY_LISTEN:-127.0.0.1:8080}"]
workers: 2
health_path: /-/health
forward_proxy:
  enabled: true
  allow_clients: ["127.0.0.0/8", "::1/128"]
"""


# --- the dataclasses -------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    url: str            # as written, normalised: scheme://host:port
    scheme: str
    host: str
    port: int
    weight: int = 1     # nginx default
    name: str = ""      # "host:port", used in logs, metrics and hashing


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0            # seconds; nginx's 60 s is long for a LAN
    response_header: float = 60.0   # nginx proxy_read_timeout
    idle: float = 60.0              # between body reads; nginx proxy_read_timeout
    total: float | None = None      # off, as nginx and HAProxy


@dataclass(frozen=True)
class Pool:
    max_idle_per_backend: int = 32  # nginx upstream keepalive 32
    idle_timeout: float = 60.0      # nginx keepalive_timeout (upstream) 60 s


@dataclass(frozen=True)
class Tls:
    """How https backends are verified (nginx proxy_ssl_*; unlike nginx,
    certificates are verified unless told otherwise)."""
    verify: bool = True
    ca_file: str | None = None      # PEM bundle; default: the system's CAs
    server_name: str | None = None  # SNI and the name checked; default: the backend's host


@dataclass(frozen=True)
class Passive:
    max_fails: int = 1              # nginx default
    fail_timeout: float = 10.0      # nginx default
    # Response statuses that count as a failure; nginx counts none unless
    # listed (proxy_next_upstream http_502 ...). Connect errors and timeouts
    # always count.
    fail_status: frozenset = frozenset()


@dataclass(frozen=True)
class HealthCheck:
    """Active checks, HAProxy ``option httpchk`` semantics."""
    path: str = "/"                 # HAProxy httpchk default: OPTIONS /; we GET
    interval: float = 2.0           # HAProxy inter 2000ms
    timeout: float | None = None    # None: the interval (HAProxy: timeout check defaults to inter)
    rise: int = 2                   # HAProxy default
    fall: int = 3                   # HAProxy default
    expect: tuple = (200, 399)      # HAProxy: 2xx and 3xx pass
    host: str | None = None         # Host header; default: the backend's host:port

    @property
    def check_timeout(self):
        return self.timeout if self.timeout is not None else self.interval


@dataclass(frozen=True)
class Admin:
    listen: str = "127.0.0.1:9901"  # Envoy's admin port; loopback only
    allow: tuple = netaddr.Networks()   # client CIDRs besides loopback (default: loopback only)


@dataclass(frozen=True)
class Supervisor:
    # After this long without a heartbeat in the health table, workers treat
    # every backend as available (fail open). A killed supervisor is back in
    # about a second, so 5 s is several restarts of margin.
    stale_after: float = 5.0


@dataclass(frozen=True)
class HashKey:
    kind: str           # header | cookie | client_ip | path | uri
    name: str = ""      # header or cookie name


@dataclass(frozen=True)
class Upstream:
    name: str
    backends: tuple
    balance: str = "round_robin"    # nginx default
    hash_key: HashKey | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: int = 2                # further attempts, each on another backend
    pool: Pool = field(default_factory=Pool)
    passive: Passive = field(default_factory=Passive)
    preserve_host: bool = True      # HAProxy; nginx rewrites to $proxy_host
    health_check: HealthCheck | None = None     # off unless configured (HAProxy: no "check")
    tls: Tls | None = None          # https backends: None is Tls()


@dataclass(frozen=True)
class Route:
    upstream: str
    host: str | None = None         # exact, "*.suffix", or None for any
    path_prefix: str = "/"
    methods: frozenset | None = None
    strip_prefix: bool = False
    max_body: int | None = None     # bytes; None = unlimited (see README)
    index: int = 0                  # position in the file
    name: str = ""                  # for logs and metrics; default: the index
    rate_limit: "RateLimit | None" = None   # off unless configured (nginx: no limit_req)
    auth: "Auth | None" = None              # off unless configured
    cache: "RouteCache | None" = None   # off unless configured (nginx: no proxy_cache)


@dataclass(frozen=True)
class CacheStore:
    path: str = "/var/cache/gproxy"     # nginx packages use /var/cache/nginx
    max_size: int = 1 << 30             # bytes of bodies; nginx proxy_cache_path max_size
    max_object_size: int = 64 << 20     # larger responses are relayed, not stored
    lock_timeout: float = 5.0           # nginx proxy_cache_lock_timeout


CACHE_KEY_PARTS = ("scheme", "host", "uri", "path", "query", "method", "upstream")


@dataclass(frozen=True)
class RouteCache:
    enabled: bool = True
    default_ttl: float | None = None    # for responses without freshness (nginx proxy_cache_valid)
    stale_while_revalidate: float = 0.0  # when the response says nothing (RFC 5861)
    stale_if_error: float = 0.0
    key: tuple = ("scheme", "host", "uri")   # nginx's $scheme$proxy_host$request_uri
    lock: bool = True                   # collapse concurrent misses (nginx proxy_cache_lock)
    cdn_cache_control: bool = True      # obey CDN-Cache-Control (RFC 9213) before Cache-Control


@dataclass(frozen=True)
class AccessLog:
    format: str = "json"
    path: str = "-"                 # "-" is stdout
    fields: tuple = ()              # format "fields": the record's fields, in this order
    buffer: int = 0                 # bytes gathered per worker; 0 writes each line (nginx default)
    # How long a gathered line may wait. nginx has no default (lines wait
    # for a full buffer); a quiet server's lines should not wait for ever.
    flush: float = 1.0


@dataclass(frozen=True)
class LiveStats:
    """Per-worker shared counters: the figures of /status and /metrics, and
    least_conn across workers (README "Live figures")."""
    enabled: bool = True
    prometheus: bool = True         # GET /metrics on the admin endpoint
    window: float = 60.0            # percentiles over the last minute, as Prometheus' rate(...[1m])


@dataclass(frozen=True)
class ForwardAuth:
    htpasswd: str                   # path; relative to the config file
    realm: str = "gproxy"


@dataclass(frozen=True)
class ForwardPool:
    # Idle keep-alive connections are kept per destination (ip:port) in an
    # LRU of at most max_destinations pools, so browsing many hosts cannot
    # grow them without limit.
    max_destinations: int = 100
    max_idle_per_destination: int = 4


# Squid's default Safe_ports (squid.conf.default), for absolute-form requests.
SQUID_SAFE_PORTS = ((80, 80), (21, 21), (443, 443), (70, 70), (210, 210), (1025, 65535),
                    (280, 280), (488, 488), (591, 591), (777, 777))


@dataclass(frozen=True)
class ForwardProxy:
    """Absolute-form requests and CONNECT. Off unless configured: an open
    proxy is never the default (Squid: ``http_access deny all``)."""
    enabled: bool = False
    allow_clients: tuple = netaddr.Networks(("127.0.0.0/8", "::1/128"))
    allow_hosts: tuple = ()             # globs; empty = any host
    deny_hosts: tuple = ()              # globs, checked first
    connect_ports: tuple = ((443, 443),)        # Squid SSL_ports
    http_ports: tuple = SQUID_SAFE_PORTS
    block_private_destinations: bool = True
    allow_private: tuple = netaddr.Networks()   # CIDRs opened despite block_private_destinations
    auth: ForwardAuth | None = None
    via: bool = True                    # Squid "via on"; also loop protection
    via_name: str | None = None         # received-by in Via; default hostname:port
    x_forwarded_for: bool = False       # tinyproxy; Squid's forwarded_for is on
    timeouts: Timeouts = field(default_factory=Timeouts)
    pool: ForwardPool = field(default_factory=ForwardPool)
    max_body: int | None = None


@dataclass(frozen=True)
class Tunnel:
    """CONNECT tunnels and Upgrade (WebSocket) connections once spliced."""
    idle_timeout: float = 900.0         # Squid read_timeout 15 min
    max_duration: float | None = None   # off, as HAProxy timeout tunnel has no total
    upgrade_protocols: tuple = ("websocket",)


@dataclass(frozen=True)
class ErrorLog:
    format: str = "text"            # gunicorn's and nginx's error logs are text
    path: str = "-"                 # "-" is stderr (gunicorn's errorlog default)
    level: str = "info"             # gunicorn's loglevel default


@dataclass(frozen=True)
class StatsD:
    # Writing a statsd section turns metrics on; without one they are off
    # (as gunicorn without statsd_host). See README "Metrics".
    enabled: bool = True
    host: str = "127.0.0.1"         # StatsD's default address and port
    port: int = 8125
    prefix: str = "gproxy"
    # Etsy statsd docs: 1432 for MTU 1500, 512 across the internet. A daemon
    # on this host (a loopback address: MTU 65536) gets 8192, DogStatsD's
    # buffer: a sixth of the datagrams, each of which costs the worker a
    # sendto() that wakes the daemon (bench/README "The cost of observing").
    max_udp_size: int = 1432
    # How long a worker sums counters and holds timer samples before sending
    # them: a hundredth of StatsD's own 10 s flushInterval.
    flush_interval: float = 0.1
    # Timer lines a worker sends per timer and second at most; beyond, a
    # uniform sample with its rate (|ms|@r), which StatsD counts back up.
    timer_samples: int = 500
    gunicorn: bool = False          # gunicorn's own metrics, under <prefix>.gunicorn


@dataclass(frozen=True)
class Limits:
    """What one client may send, and how slowly (the server side, nginx-like)."""
    request_line: int = 8192        # nginx large_client_header_buffers 8k; else 414
    header_block: int = 65536       # the whole head; else 431
    header_fields: int = 100        # Apache LimitRequestFields, gunicorn; else 431
    header_timeout: float = 60.0    # nginx client_header_timeout: the whole head; else 408
    body_timeout: float = 60.0      # nginx client_body_timeout: between body reads


@dataclass(frozen=True)
class Config:
    source: str = "<built-in>"
    listen: tuple = ("127.0.0.1:8080",)
    workers: int = 2
    # 2 default workers hold 10,000 client connections (nginx's default is
    # 512 per worker; idle keep-alive connections cost a few KiB each here)
    worker_connections: int = 5000
    worker_class: str = "gproxy"            # gproxy's own HTTP/1.1 server (worker.py)
    keepalive_timeout: float = 75.0         # nginx keepalive_timeout
    graceful_timeout: float = 30.0          # gunicorn default
    trusted_proxies: tuple = netaddr.Networks()     # believe no X-Forwarded-* by default
    limits: Limits = field(default_factory=Limits)
    access_log: AccessLog = field(default_factory=AccessLog)
    error_log: ErrorLog = field(default_factory=ErrorLog)
    statsd: StatsD = field(default_factory=lambda: StatsD(enabled=False))
    upstreams: dict = field(default_factory=dict)
    routes: tuple = ()
    forward_proxy: ForwardProxy = field(default_factory=ForwardProxy)
    tunnel: Tunnel = field(default_factory=Tunnel)
    admin: Admin = field(default_factory=Admin)
    supervisor: Supervisor = field(default_factory=Supervisor)
    runtime_dir: str | None = None          # None: $XDG_RUNTIME_DIR, else /dev/shm, else /tmp
    rate_limit_store: "RateLimitStore" = field(default_factory=lambda: RateLimitStore())
    health_path: str | None = None          # HAProxy monitor-uri: off unless configured
    # An instance drained for an LB must stay up until the LB's checks see
    # 503: HAProxy's defaults (inter 2s, fall 3) take 6 s.
    drain_delay: float = 10.0
    pidfile: str | None = None              # gunicorn's default: none
    cache: CacheStore = field(default_factory=CacheStore)
    live_stats: LiveStats = field(default_factory=LiveStats)


# --- YAML with line numbers -----------------------------------------------

class _Doc:
    """The parsed document: plain Python values plus the line of every key path."""

    def __init__(self, source):
        self.source = source
        self.lines = {}

    def fail(self, path, message):
        line = self.line(path)
        where = f"{self.source}:{line}" if line else self.source
        raise ConfigError(f"{where}: {path or '(top level)'}: {message}")

    def line(self, path):
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""

    def plain(self, loader, node, path):
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out = {}
            for knode, vnode in node.value:
                key = loader.construct_object(knode)
                if not isinstance(key, str):
                    self.lines["?"] = knode.start_mark.line + 1
                    raise ConfigError(f"{self.source}:{knode.start_mark.line + 1}: "
                                      f"{path or '(top level)'}: key {key!r} is not a string")
                sub = f"{path}.{key}" if path else key
                if key in out:
                    self.lines[sub] = knode.start_mark.line + 1
                    self.fail(sub, "duplicate key")
                out[key] = self.plain(loader, vnode, sub)
                self.lines[sub] = knode.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.plain(loader, item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if "$" in node.value:
            node = expand_node(self, loader, node, path)
        return loader.construct_object(node, deep=True)


_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_node(doc, loader, node, path):
    """A scalar with ``${VAR}`` / ``${VAR:-default}`` replaced from the
    environment. An unquoted value is typed after expansion (``port: ${P}``
    is an integer), as if the value had been written there."""
    def sub(m):
        if m.group(0) == "$${":
            return "${"
        value = os.environ.get(m.group(1))
        if value is None or (value == "" and m.group(2) is not None):
            if m.group(2) is None:
                doc.fail(path, f"environment variable {m.group(1)} is not set "
                               f"(write ${{{m.group(1)}:-default}} to give a default)")
            return m.group(2)
        return value

    text = _ENV_REF.sub(sub, node.value)
    tag = node.tag
    if not node.style:          # plain scalar: resolve its type again
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
    return yaml.ScalarNode(tag, text, node.start_mark, node.end_mark, node.style)


def _parse_yaml(text, source):
    doc = _Doc(source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return doc, {}
        data = doc.plain(loader, node, "")
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else "?"
        raise ConfigError(f"{source}:{line}: not valid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    return doc, data


# --- value parsers: (doc, value, path) -> value, or doc.fail ---------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}
# nginx's limit for time values (2^31-1 ms, 24.8 days). It also keeps every
# duration inside what socket timeouts, gevent timers and gunicorn's int
# settings accept: .inf or 1e300 seconds would fail there, after the check.
MAX_DURATION = 2147483.647
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
               "g": 1024**3, "gb": 1024**3}


def duration(doc, value, path):
    if isinstance(value, bool):
        doc.fail(path, f"expected a duration like 250ms or 10s, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            doc.fail(path, f"expected a duration like 250ms or 10s, got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if math.isnan(seconds) or seconds < 0:
        doc.fail(path, f"must be a duration of 0 or more, got {value!r}")
    if seconds > MAX_DURATION:
        doc.fail(path, f"must be at most 24 days ({MAX_DURATION}s), got {value!r}")
    return seconds


def positive_duration(doc, value, path):
    seconds = duration(doc, value, path)
    if seconds <= 0:
        doc.fail(path, "must be more than 0")
    return seconds


def bounded_duration(low, high):
    def parse(doc, value, path):
        seconds = duration(doc, value, path)
        if not low <= seconds <= high:
            doc.fail(path, f"must be between {low:g}s and {high:g}s, got {value!r}")
        return seconds
    return parse


def size(doc, value, path):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not m:
        doc.fail(path, f"expected a size like 64KB or 10MB, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def bounded_size(low, high):
    def parse(doc, value, path):
        n = size(doc, value, path)
        if not low <= n <= high:
            doc.fail(path, f"must be between {low} and {high} bytes, got {n}")
        return n
    return parse


def integer(low=None, high=None):
    def parse(doc, value, path):
        if not isinstance(value, int) or isinstance(value, bool):
            doc.fail(path, f"expected an integer, got {value!r}")
        if low is not None and value < low:
            doc.fail(path, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            doc.fail(path, f"must be at most {high}, got {value}")
        return value
    return parse


def boolean(doc, value, path):
    if not isinstance(value, bool):
        doc.fail(path, f"expected true or false, got {value!r}")
    return value


def string(doc, value, path):
    if not isinstance(value, str) or not value:
        doc.fail(path, f"expected a non-empty string, got {value!r}")
    return value


def one_of(choices):
    def parse(doc, value, path):
        if value not in choices:
            doc.fail(path, f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return parse


def listen_address(doc, value, path):
    value = string(doc, value, path)
    if value.startswith("unix:"):
        return value
    try:
        netaddr.split(value)
    except ValueError as e:
        doc.fail(path, f"expected host:port, got {value!r}: {e}")
    return value


def tcp_address(doc, value, path):
    value = listen_address(doc, value, path)
    if value.startswith("unix:"):
        doc.fail(path, f"expected host:port, got {value!r}")
    return value


def cidr(doc, value, path):
    try:
        return netaddr.network(string(doc, value, path))
    except ValueError:
        doc.fail(path, f"not an IP address or CIDR block: {value!r}")


def networks(doc, value, path):
    """A list of CIDR blocks, matched by ``netaddr.Networks.match``."""
    return netaddr.Networks(list_of(cidr)(doc, value, path))


def optional(parse):
    """``null`` is the default (None) for keys documented as ``null``."""
    return lambda doc, value, path: None if value is None else parse(doc, value, path)


def list_of(item):
    def parse(doc, value, path):
        if isinstance(value, (str, int)):
            value = [value]     # a single item may be written without brackets
        if not isinstance(value, list):
            doc.fail(path, f"expected a list, got {type(value).__name__}")
        return tuple(item(doc, v, f"{path}[{i}]") for i, v in enumerate(value))
    return parse


def section(doc, value, path, allowed):
    if value is None:
        return {}
    if not isinstance(value, dict):
        doc.fail(path, f"expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            sub = f"{path}.{key}" if path else key
            doc.fail(sub, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
    return value


def fields(doc, raw, path, spec):
    """Parse the keys of ``raw`` by ``spec`` = {key: parser}; absent keys are left out."""
    raw = section(doc, raw, path, spec)
    return {k: spec[k](doc, v, f"{path}.{k}" if path else k) for k, v in raw.items()}


# --- sections ---------------------------------------------------------------

def backend(doc, value, path):
    if isinstance(value, str):
        value = {"url": value}
        url_path = path
    else:
        url_path = f"{path}.url"
    raw = section(doc, value, path, {"url", "weight"})
    if "url" not in raw:
        doc.fail(path, "missing key 'url'")
    url = raw["url"]
    parts = urlsplit(url) if isinstance(url, str) else None
    if not parts or parts.scheme not in ("http", "https") or not parts.hostname:
        doc.fail(url_path, f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        doc.fail(url_path, f"bad port in {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        doc.fail(url_path, f"a backend URL is scheme://host:port only, got {url!r}")
    weight = integer(1, 1000)(doc, raw["weight"], f"{path}.weight") if "weight" in raw else 1
    host = parts.hostname
    hostport = netaddr.join(host, port)
    return Backend(url=f"{parts.scheme}://{hostport}", scheme=parts.scheme, host=host,
                   port=port, weight=weight, name=hostport)


def hash_key(doc, value, path):
    value = string(doc, value, path)
    kind, _, name = value.partition(":")
    if kind not in HASH_KEY_KINDS:
        doc.fail(path, f"expected header:NAME, cookie:NAME, client_ip, path or uri, got {value!r}")
    if (kind in ("header", "cookie")) != bool(name):
        doc.fail(path, f"{kind} {'needs' if kind in ('header', 'cookie') else 'takes no'} a name: {value!r}")
    return HashKey(kind, name)


def upstream(doc, name, raw, path):
    spec = {
        "backends": list_of(backend),
        "balance": one_of(BALANCE_POLICIES),
        "hash_key": hash_key,
        "timeouts": lambda d, v, p: Timeouts(**fields(d, v, p, {
            "connect": duration, "response_header": duration, "idle": duration,
            "total": duration})),
        "retries": integer(0, 100),
        "pool": lambda d, v, p: Pool(**fields(d, v, p, {
            "max_idle_per_backend": integer(1, 10000), "idle_timeout": duration})),
        "passive": lambda d, v, p: Passive(**fields(d, v, p, {
            "max_fails": integer(0, 1000), "fail_timeout": duration,
            "fail_status": lambda d2, v2, p2: frozenset(list_of(integer(500, 599))(d2, v2, p2))})),
        "health_check": health_check,
        "preserve_host": boolean,
        "tls": tls_settings,
    }
    kw = fields(doc, raw, path, spec)
    if not kw.get("backends"):
        doc.fail(f"{path}.backends" if "backends" in (raw or {}) else path,
                 "an upstream needs at least one backend")
    seen = set()
    for i, b in enumerate(kw["backends"]):
        if b.name in seen:
            doc.fail(f"{path}.backends[{i}]", f"duplicate backend {b.name}")
        seen.add(b.name)
    if kw.get("balance") == "consistent_hash" and "hash_key" not in kw:
        doc.fail(f"{path}.balance", "consistent_hash needs a hash_key")
    return Upstream(name=name, **kw)


def tls_settings(doc, value, path):
    def ca_file(d, v, p):
        v = string(d, v, p)
        if not os.path.isabs(v) and os.path.isfile(d.source):
            v = os.path.join(os.path.dirname(os.path.abspath(d.source)), v)
        if not os.access(v, os.R_OK):
            d.fail(p, f"cannot read {v}")
        return v

    return Tls(**fields(doc, value, path, {"verify": boolean, "ca_file": ca_file,
                                           "server_name": string}))


def status_range(doc, value, path):
    """``200-399``, ``200`` or an integer: an inclusive range of statuses."""
    text = str(value).strip()
    low, sep, high = text.partition("-")
    try:
        lo = int(low)
        hi = int(high) if sep else lo
    except ValueError:
        doc.fail(path, f"expected a status or a range like 200-399, got {value!r}")
    if not 100 <= lo <= hi <= 599:
        doc.fail(path, f"expected statuses between 100 and 599, low first, got {value!r}")
    return (lo, hi)


def health_check(doc, value, path):
    def check_path(d, v, p):
        v = string(d, v, p)
        if not v.startswith("/"):
            d.fail(p, f"must start with '/', got {v!r}")
        return v

    kw = fields(doc, value, path, {
        "path": check_path, "interval": positive_duration, "timeout": positive_duration,
        "rise": integer(1, 100), "fall": integer(1, 100), "expect": status_range,
        "host": string})
    return HealthCheck(**kw)


_METHOD = re.compile(r"^[A-Z]+$")


def matching(pattern, expected, lower=False):
    """A parser for a non-empty string that must match ``pattern``."""
    regex = re.compile(pattern)

    def parse(doc, value, path):
        value = string(doc, value, path)
        if lower:
            value = value.lower()
        if not regex.match(value):
            doc.fail(path, f"{expected}, got {value!r}")
        return value
    return parse


name = matching(r"^[A-Za-z0-9_.-]+$", "names use letters, digits, '_', '.' and '-' only")
metric_prefix = matching(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
                         "expected dotted names of letters, digits, '_' and '-'")
route_host = matching(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d+)?$",
                      "expected a host name or *.suffix", lower=True)
path_prefix = matching(r"^/", "must start with '/'")


def route(doc, raw, path, index, upstreams):
    def methods(d, v, p):
        items = list_of(string)(d, v, p)
        for i, m in enumerate(items):
            if not _METHOD.match(m):
                d.fail(f"{p}[{i}]", f"expected an upper-case method name, got {m!r}")
        return frozenset(items)

    spec = {"host": route_host, "path_prefix": path_prefix, "methods": methods,
            "strip_prefix": boolean, "upstream": string, "max_body": size, "name": name,
            "rate_limit": rate_limit, "auth": auth, "cache": route_cache}
    kw = fields(doc, raw, path, spec)
    gateway_checks(doc, kw, path)
    kw.setdefault("name", str(index))
    if "upstream" not in kw:
        doc.fail(path, "missing key 'upstream'")
    if kw["upstream"] not in upstreams:
        doc.fail(f"{path}.upstream", f"no upstream named {kw['upstream']!r}")
    return Route(index=index, **kw)


def cache_key_part(doc, value, path):
    value = string(doc, value, path)
    kind, sep, arg = value.partition(":")
    if (kind in ("header", "cookie") and sep and arg) or (not sep and value in CACHE_KEY_PARTS):
        return value
    doc.fail(path, f"expected one of {', '.join(CACHE_KEY_PARTS)}, header:NAME or cookie:NAME, "
                   f"got {value!r}")


def route_cache(doc, value, path):
    """``cache: {...}``; ``cache: true`` is every default, ``false`` none."""
    if isinstance(value, bool):
        return RouteCache() if value else None
    kw = fields(doc, value, path, {
        "enabled": boolean, "default_ttl": optional_duration,
        "stale_while_revalidate": duration, "stale_if_error": duration,
        "key": list_of(cache_key_part), "lock": boolean, "cdn_cache_control": boolean})
    if "key" in kw and not kw["key"]:
        doc.fail(f"{path}.key", "must name at least one part")
    cfg = RouteCache(**kw)
    return cfg if cfg.enabled else None


def optional_duration(doc, value, path):
    if value is False or value == "off":     # YAML 1.1 reads a bare `off` as false
        return None
    return duration(doc, value, path)


def cache_store(doc, value, path):
    kw = fields(doc, value, path, {"path": string, "max_size": size,
                                   "max_object_size": size, "lock_timeout": duration})
    if kw.get("max_size") == 0:
        doc.fail(f"{path}.max_size", "must be more than 0")
    return CacheStore(**kw)


def check_cache_path(doc, cfg):
    """A cached route needs a directory it can write; say so now, not at
    the first request (``gproxy check`` runs this too)."""
    if not any(r.cache for r in cfg.routes):
        return
    where = cfg.cache.path
    probe = where
    while not os.path.exists(probe):
        parent = os.path.dirname(probe.rstrip("/")) or "/"
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        doc.fail("cache.path", f"cannot create or write the cache directory {where}")


def log_format(doc, value, path):
    if value is False:      # YAML 1.1 reads a bare `off` as false
        value = "off"
    return one_of(LOG_FORMATS)(doc, value, path)


ACCESS_LOG_BUFFER = 64 * 1024      # nginx: flush= without buffer= gathers 64k


def log_buffer(doc, value, path):
    if value is False or value == "off":     # YAML 1.1 reads a bare `off` as false
        return 0
    return bounded_size(0, 16 << 20)(doc, value, path)


def access_log(doc, value, path):
    kw = fields(doc, value, path, {"format": log_format, "path": string,
                                   "fields": list_of(one_of(ACCESS_LOG_FIELDS)),
                                   "buffer": log_buffer, "flush": bounded_duration(0.01, 3600.0)})
    if "flush" in kw and "buffer" not in kw:
        kw["buffer"] = ACCESS_LOG_BUFFER
    if kw.get("format") == "fields" and not kw.get("fields"):
        doc.fail(f"{path}.format", "format 'fields' needs a 'fields' list")
    if kw.get("fields") and kw.get("format") != "fields":
        doc.fail(f"{path}.fields", "a field list needs 'format: fields'")
    return AccessLog(**kw)


LOOPBACK_UDP_SIZE = 8192


def statsd(doc, value, path):
    kw = fields(doc, value, path, {
        "enabled": boolean, "host": string, "port": integer(1, 65535), "prefix": metric_prefix,
        "max_udp_size": integer(64, 65507), "gunicorn": boolean,
        "flush_interval": bounded_duration(0.01, 60.0), "timer_samples": integer(1, 1_000_000)})
    if "max_udp_size" not in kw and netaddr.is_loopback(kw.get("host", StatsD.host)):
        kw["max_udp_size"] = LOOPBACK_UDP_SIZE
    return StatsD(**kw)


def live_stats(doc, value, path):
    kw = fields(doc, value, path, {"enabled": boolean, "prometheus": boolean, "window": duration})
    if "window" in kw and not 1 <= kw["window"] <= 3600:
        doc.fail(f"{path}.window", "must be between 1s and 1h")
    return LiveStats(**kw)


def port_range(doc, value, path):
    """443, or a range "1025-65535"."""
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    else:
        m = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", str(value)) if isinstance(value, str) else None
        if not m:
            doc.fail(path, f"expected a port or a range like 1025-65535, got {value!r}")
        lo, hi = int(m.group(1)), int(m.group(2))
    if not 1 <= lo <= hi <= 65535:
        doc.fail(path, f"ports are 1-65535, low to high, got {value!r}")
    return (lo, hi)


host_glob = matching(r"^[a-z0-9.*?\[\]:-]+$", "expected a host name glob like *.example.com",
                     lower=True)


def forward_proxy(doc, value, path):
    def auth(d, v, p):
        kw = fields(d, v, p, {"htpasswd": readable_file, "realm": realm})
        if "htpasswd" not in kw:
            d.fail(p, "missing key 'htpasswd'")
        return ForwardAuth(**kw)

    spec = {
        "enabled": boolean, "allow_clients": networks, "allow_hosts": list_of(host_glob),
        "deny_hosts": list_of(host_glob), "connect_ports": list_of(port_range),
        "http_ports": list_of(port_range), "block_private_destinations": boolean,
        "allow_private": networks, "auth": auth, "via": boolean, "via_name": optional(string),
        "x_forwarded_for": boolean, "max_body": optional(size),
        "timeouts": lambda d, v, p: Timeouts(**fields(d, v, p, {
            "connect": duration, "response_header": duration, "idle": duration,
            "total": duration})),
        "pool": lambda d, v, p: ForwardPool(**fields(d, v, p, {
            "max_destinations": integer(1, 100000),
            "max_idle_per_destination": integer(0, 10000)})),
    }
    kw = fields(doc, value, path, spec)
    kw.setdefault("enabled", True)     # writing the section means wanting it
    return ForwardProxy(**kw)


def tunnel(doc, value, path):
    kw = fields(doc, value, path, {
        "idle_timeout": duration, "max_duration": optional(duration),
        "upgrade_protocols": list_of(lambda d, v, p: string(d, v, p).lower())})
    if kw.get("idle_timeout") == 0:
        doc.fail(f"{path}.idle_timeout", "must be more than 0")
    if not kw.get("max_duration"):
        kw["max_duration"] = None
    return Tunnel(**kw)


TOP = {
    "listen": list_of(listen_address),
    "workers": integer(1, 256),
    "worker_connections": integer(1, 100000),
    "worker_class": one_of(WORKER_CLASSES),
    "keepalive_timeout": duration,
    "graceful_timeout": duration,
    "trusted_proxies": networks,
    "limits": lambda d, v, p: Limits(**fields(d, v, p, {
        "request_line": bounded_size(256, 1 << 20), "header_block": bounded_size(1024, 1 << 24),
        "header_fields": integer(1, 10000), "header_timeout": positive_duration,
        "body_timeout": positive_duration})),
    "access_log": lambda d, v, p: access_log(d, v, p),
    "forward_proxy": forward_proxy,
    "tunnel": tunnel,
    "error_log": lambda d, v, p: ErrorLog(**fields(d, v, p, {
        "format": one_of(ERROR_LOG_FORMATS), "path": string, "level": one_of(LOG_LEVELS)})),
    "statsd": statsd,
    "admin": lambda d, v, p: Admin(**fields(d, v, p, {
        "listen": tcp_address, "allow": networks})),
    "supervisor": lambda d, v, p: Supervisor(**fields(d, v, p, {"stale_after": duration})),
    "runtime_dir": string,
    "rate_limit_store": lambda d, v, p: rate_limit_store(d, v, p),
    "health_path": matching(r"^/[^?#\s]*$", "must be a path starting with '/'"),
    "drain_delay": duration,
    "pidfile": optional(string),
    "cache": cache_store,
    "live_stats": lambda d, v, p: live_stats(d, v, p),
}


def parse(text, source="<string>"):
    """Parse YAML text into a Config, or raise ConfigError."""
    doc, raw = _parse_yaml(text, source)
    if raw is None or raw == {}:
        # An empty file is a mistake (a truncated deploy, the wrong path),
        # never a wish for a proxy that answers 404 to everything.
        raise ConfigError(f"{source}: no settings: the file is empty or holds only comments")
    allowed = set(TOP) | {"upstreams", "routes"}
    raw = section(doc, raw, "", allowed)
    kw = {k: TOP[k](doc, v, k) for k, v in raw.items() if k in TOP}

    ups = section(doc, raw.get("upstreams"), "upstreams", set(raw.get("upstreams") or ()))
    for n in ups:
        name(doc, n, f"upstreams.{n}")
    kw["upstreams"] = {name: upstream(doc, name, u, f"upstreams.{name}") for name, u in ups.items()}

    routes = raw.get("routes") or []
    if not isinstance(routes, list):
        doc.fail("routes", f"expected a list, got {type(routes).__name__}")
    kw["routes"] = tuple(route(doc, r, f"routes[{i}]", i, kw["upstreams"])
                         for i, r in enumerate(routes))
    cfg = Config(source=source, **kw)
    check_cache_path(doc, cfg)
    return cfg


def load(path=None):
    """Load ``path``, else ``$GPROXY_CONFIG``, else ``./gproxy.yaml``, else the default."""
    path = path or os.environ.get("GPROXY_CONFIG")
    if not path and os.path.exists("gproxy.yaml"):
        path = "gproxy.yaml"
    if not path:
        return parse(DEFAULT_YAML, "<built-in>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason}") from None
    return parse(text, path)


# --- API gateway: rate limits and client authentication on routes ------------

RATE_KEY_KINDS = ("client_ip", "header", "consumer", "route")
ON_ERROR = ("allow", "deny")
JWT_SYMMETRIC = ("HS256", "HS384", "HS512")
JWT_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                  "ES256", "ES384", "ES512", "EdDSA")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")
_RATE_PERIODS = {"s": 1, "m": 60, "h": 3600}
_SHA256 = re.compile(r"^(sha256:)?([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class RateLimit:
    """GCRA (gproxy/ratelimit.py); ``burst`` as nginx ``limit_req burst nodelay``."""
    count: int                      # requests ...
    period: int                     # ... per this many seconds
    burst: int = 0                  # nginx limit_req default
    key: HashKey = HashKey("client_ip")     # nginx's usual $binary_remote_addr


@dataclass(frozen=True)
class RateLimitStore:
    url: str | None = None          # None: the table shared by this arbiter's workers
    timeout: float = 0.05           # Envoy's ratelimit filter waits 20 ms; Redis on a LAN answers in <1 ms
    on_error: str = "allow"         # Envoy failure_mode_deny: false
    max_keys: int = 100000          # local table; nginx keeps ~16,000 states per MB of zone
    key_prefix: str = "gproxy:rl:"


@dataclass(frozen=True)
class ApiKeys:
    file: str
    header: str = "X-Api-Key"       # Kong's key-auth reads apikey; X-Api-Key is AWS API Gateway's
    # sha256 digest (bytes) -> consumer name
    keys: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class BasicAuth:
    htpasswd: str                   # path; relative to the config file
    realm: str | None = None        # default: auth.realm


@dataclass(frozen=True)
class JwtAuth:
    algorithms: tuple
    issuer: str | None = None
    audience: tuple = ()
    secret: str | None = field(default=None, repr=False)
    public_key: str | None = field(default=None, repr=False)     # PEM text of public_key_file
    jwks: str | None = field(default=None, repr=False)           # JSON text of jwks_file
    leeway: float = 0.0             # PyJWT's and Kong's default (Envoy allows 60 s)


@dataclass(frozen=True)
class Auth:
    api_keys: ApiKeys | None = None
    basic: BasicAuth | None = None
    jwt: JwtAuth | None = None
    consumers: frozenset | None = None      # None: every authenticated consumer
    forward_credential: bool = False        # Kong hide_credentials is the opposite default
    consumer_header: str = "X-Consumer"     # Kong sends X-Consumer-Username
    realm: str = "gproxy"


def rate(doc, value, path):
    m = _RATE.match(value) if isinstance(value, str) else None
    if not m:
        doc.fail(path, f"expected a rate like 10/s or 600/m, got {value!r}")
    count, period = int(m.group(1)), _RATE_PERIODS[m.group(2)]
    if count < 1 or count / period > 1_000_000:
        doc.fail(path, f"must be between 1/h and 1000000/s, got {value!r}")
    return count, period


def rate_key(doc, value, path):
    value = string(doc, value, path)
    kind, _, name = value.partition(":")
    if kind not in RATE_KEY_KINDS or (kind == "header") != bool(name):
        doc.fail(path, f"expected client_ip, header:NAME, consumer or route, got {value!r}")
    return HashKey(kind, name)


def rate_limit(doc, value, path):
    kw = fields(doc, value, path, {"rate": rate, "burst": integer(0, 1_000_000), "key": rate_key})
    if "rate" not in kw:
        doc.fail(path, "missing key 'rate'")
    kw["count"], kw["period"] = kw.pop("rate")
    return RateLimit(**kw)


def rate_limit_store(doc, value, path):
    def url(d, v, p):
        v = string(d, v, p)
        parts = urlsplit(v)
        try:
            parts.port
        except ValueError:
            d.fail(p, f"bad port in {v!r}")
        if parts.scheme in ("redis", "rediss"):
            ok = parts.hostname and re.match(r"^(/\d*)?$", parts.path)     # the path is the db number
        else:
            ok = parts.scheme == "unix" and parts.path
        if not ok:
            d.fail(p, f"expected redis://host:port/db, rediss://... or unix:///path, got {v!r}")
        return v

    return RateLimitStore(**fields(doc, value, path, {
        "url": url, "timeout": positive_duration, "on_error": one_of(ON_ERROR),
        "max_keys": integer(16, 10_000_000), "key_prefix": string}))


def readable_file(doc, value, path):
    """A path relative to the config file's directory, which must be readable."""
    f = string(doc, value, path)
    if not os.path.isabs(f) and os.path.isfile(doc.source):
        f = os.path.join(os.path.dirname(os.path.abspath(doc.source)), f)
    if not os.access(f, os.R_OK) or not os.path.isfile(f):
        doc.fail(path, f"cannot read {f}")
    return f


def realm(doc, value, path):
    value = string(doc, value, path)
    if '"' in value or "\\" in value:
        doc.fail(path, "must not contain quotes or backslashes")
    return value


header_name = matching(r"^[A-Za-z0-9-]+$", "expected a header name (letters, digits, '-')")


def api_key_file(path):
    """The consumers of an API-key file: ``name: sha256:HEX`` (or a list of
    them, for rotation), with ``gproxy hash-key`` printing the digests."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    doc, raw = _parse_yaml(text, path)
    raw = section(doc, raw, "", set(raw or ()))
    keys = {}
    for consumer, hashes in raw.items():
        name(doc, consumer, consumer)
        for i, h in enumerate(list_of(string)(doc, hashes, consumer)):
            sub = f"{consumer}[{i}]" if isinstance(hashes, list) else consumer
            m = _SHA256.match(h)
            if not m:
                doc.fail(sub, "expected sha256:<64 hex digits> (gproxy hash-key prints it)")
            digest = bytes.fromhex(m.group(2))
            if digest in keys:
                doc.fail(sub, f"the same key is already given to {keys[digest]!r}")
            keys[digest] = consumer
    if not keys:
        raise ConfigError(f"{path}: no consumers in the file")
    return keys


def htpasswd_lines(doc, value, path):
    """Readable, and every line ``user:hash`` (what passlib loads)."""
    f = readable_file(doc, value, path)
    with open(f, "rb") as fh:
        for n, line in enumerate(fh, 1):
            s = line.strip()
            if s and not s.startswith(b"#") and (s.count(b":") != 1 or s.startswith(b":")):
                doc.fail(path, f"{f}:{n}: expected user:hash")
    return f


def jwt_auth(doc, value, path):
    def text_of(kind):
        def parse(d, v, p):
            with open(readable_file(d, v, p), encoding="utf-8", errors="replace") as fh:
                return kind(d, fh.read(), p)
        return parse

    spec = {"issuer": string, "audience": list_of(string), "leeway": duration,
            "algorithms": list_of(one_of(JWT_SYMMETRIC + JWT_ASYMMETRIC)), "secret": string,
            "public_key_file": text_of(pem_public_key), "jwks_file": text_of(jwks)}
    kw = fields(doc, value, path, spec)
    sources = [k for k in ("secret", "public_key_file", "jwks_file") if k in kw]
    if len(sources) != 1:
        doc.fail(path, "needs exactly one of secret, public_key_file, jwks_file")
    symmetric = sources[0] == "secret"
    allowed = JWT_SYMMETRIC if symmetric else JWT_ASYMMETRIC
    kw.setdefault("algorithms", ("HS256",) if symmetric else ("RS256",))   # PyJWT's examples
    for i, alg in enumerate(kw["algorithms"]):
        if alg not in allowed:
            # a public key used as an HMAC secret is the classic JWT forgery
            doc.fail(f"{path}.algorithms[{i}]", f"{alg} does not go with {sources[0]}")
    if symmetric and len(kw["secret"]) < 32:
        doc.fail(f"{path}.secret", "must be at least 32 characters (RFC 7518 3.2: a key "
                                   "as long as the hash)")
    kw["public_key"] = kw.pop("public_key_file", None)
    kw["jwks"] = kw.pop("jwks_file", None)
    return JwtAuth(**kw)


def pem_public_key(doc, text, path):
    from cryptography.hazmat.primitives import serialization    # no ssl import: fine in the arbiter
    try:
        serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError) as e:
        doc.fail(path, f"not a PEM public key: {e}")
    return text


def jwks(doc, text, path):
    import json
    try:
        keys = json.loads(text).get("keys")
    except (ValueError, AttributeError):
        keys = None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and k.get("kty")
                                                         for k in keys):
        doc.fail(path, 'expected a JWKS: {"keys": [{"kty": ...}, ...]}')
    return text


def auth(doc, value, path):
    def api_keys(d, v, p):
        kw = fields(d, v, p, {"file": readable_file, "header": header_name})
        if "file" not in kw:
            d.fail(p, "missing key 'file'")
        return ApiKeys(keys=api_key_file(kw["file"]), **kw)

    def basic(d, v, p):
        kw = fields(d, v, p, {"htpasswd": htpasswd_lines, "realm": realm})
        if "htpasswd" not in kw:
            d.fail(p, "missing key 'htpasswd'")
        return BasicAuth(**kw)

    kw = fields(doc, value, path, {
        "api_keys": api_keys, "basic": basic, "jwt": jwt_auth,
        "consumers": lambda d, v, p: frozenset(list_of(string)(d, v, p)),
        "forward_credential": boolean, "consumer_header": header_name, "realm": realm})
    if not any(k in kw for k in ("api_keys", "basic", "jwt")):
        doc.fail(path, "needs at least one of api_keys, basic, jwt")
    return Auth(**kw)


def gateway_checks(doc, kw, path):
    """Route-level rules that span rate_limit and auth."""
    rl = kw.get("rate_limit")
    if rl is not None and rl.key.kind == "consumer" and kw.get("auth") is None:
        doc.fail(f"{path}.rate_limit.key", "key 'consumer' needs auth on the route")
