"""Configuration: one YAML file into frozen dataclasses.

Rule 1: every error names the file, the line and the key path, e.g.
        ``gproxy.yaml:14: upstreams.api.backends[1].url: not an http(s) URL``.
Rule 2: unknown keys are errors (a typo must not silently mean a default).
Rule 3: every default lives here, next to the precedent it follows.

Where the file comes from: ``$GPROXY_CONFIG``, else ``./gproxy.yaml``, else
the built-in default (``DEFAULT_YAML``). This is the only module that imports
``yaml``.
"""

import ipaddress
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader

BALANCE_POLICIES = ("round_robin", "least_conn", "random", "consistent_hash")
HASH_KEY_KINDS = ("header", "cookie", "client_ip", "path", "uri")
LOG_FORMATS = ("json", "combined", "off")
WORKER_CLASSES = ("gevent", "gevent_pywsgi")

DEFAULT_YAML = """\
# gproxy built-in default: listen on loopback; with no routes every
# request is answered 404 until a config file says where to send it.
listen: ["127.0.0.1:8080"]
workers: 2
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

    @property
    def hostport(self):
        return self.name


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
class Passive:
    max_fails: int = 1              # nginx default
    fail_timeout: float = 10.0      # nginx default


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


@dataclass(frozen=True)
class AccessLog:
    format: str = "json"
    path: str = "-"                 # "-" is stdout


@dataclass(frozen=True)
class Config:
    source: str = "<built-in>"
    listen: tuple = ("127.0.0.1:8080",)
    workers: int = 2
    worker_connections: int = 1000          # gunicorn default
    worker_class: str = "gevent"            # gunicorn's gevent worker (see bench/README.md)
    keepalive_timeout: float = 75.0         # nginx keepalive_timeout
    graceful_timeout: float = 30.0          # gunicorn default
    trusted_proxies: tuple = ()             # believe no X-Forwarded-* by default
    access_log: AccessLog = field(default_factory=AccessLog)
    upstreams: dict = field(default_factory=dict)
    routes: tuple = ()


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
        return loader.construct_object(node, deep=True)


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
    if seconds < 0:
        doc.fail(path, "must not be negative")
    return seconds


def size(doc, value, path):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not m:
        doc.fail(path, f"expected a size like 64KB or 10MB, got {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


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
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        doc.fail(path, f"expected host:port, got {value!r}")
    return value


def cidr(doc, value, path):
    try:
        return ipaddress.ip_network(string(doc, value, path), strict=False)
    except ValueError:
        doc.fail(path, f"not an IP address or CIDR block: {value!r}")


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
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
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
            "max_idle_per_backend": integer(0, 10000), "idle_timeout": duration})),
        "passive": lambda d, v, p: Passive(**fields(d, v, p, {
            "max_fails": integer(0, 1000), "fail_timeout": duration})),
        "preserve_host": boolean,
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


_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d+)?$")
_METHOD = re.compile(r"^[A-Z]+$")


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def name(doc, value, path):
    value = string(doc, value, path)
    if not _NAME.match(value):
        doc.fail(path, f"names use letters, digits, '_', '.' and '-' only, got {value!r}")
    return value


def route(doc, raw, path, index, upstreams):
    def host(d, v, p):
        v = string(d, v, p).lower()
        if not _HOST.match(v):
            d.fail(p, f"expected a host name or *.suffix, got {v!r}")
        return v

    def prefix(d, v, p):
        v = string(d, v, p)
        if not v.startswith("/"):
            d.fail(p, f"must start with '/', got {v!r}")
        return v

    def methods(d, v, p):
        items = list_of(string)(d, v, p)
        for i, m in enumerate(items):
            if not _METHOD.match(m):
                d.fail(f"{p}[{i}]", f"expected an upper-case method name, got {m!r}")
        return frozenset(items)

    spec = {"host": host, "path_prefix": prefix, "methods": methods,
            "strip_prefix": boolean, "upstream": string, "max_body": size, "name": name}
    kw = fields(doc, raw, path, spec)
    kw.setdefault("name", str(index))
    if "upstream" not in kw:
        doc.fail(path, "missing key 'upstream'")
    if kw["upstream"] not in upstreams:
        doc.fail(f"{path}.upstream", f"no upstream named {kw['upstream']!r}")
    return Route(index=index, **kw)


TOP = {
    "listen": list_of(listen_address),
    "workers": integer(1, 256),
    "worker_connections": integer(1, 100000),
    "worker_class": one_of(WORKER_CLASSES),
    "keepalive_timeout": duration,
    "graceful_timeout": duration,
    "trusted_proxies": list_of(cidr),
    "access_log": lambda d, v, p: AccessLog(**fields(d, v, p, {
        "format": one_of(LOG_FORMATS), "path": string})),
}


def parse(text, source="<string>"):
    """Parse YAML text into a Config, or raise ConfigError."""
    doc, raw = _parse_yaml(text, source)
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
    return Config(source=source, **kw)


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
