"""HTTP caching rules for a shared cache (RFC 9111), pure functions.

No I/O: the clock (``now``, epoch seconds) is always passed in, headers are
lists of (name, value) pairs, a stored response is a plain dict (``Stored``
below) that the store keeps as JSON. ``cache`` does the I/O.

Rule 1: store only what a shared cache may store (3, 3.5): GET, a final
        status, no ``no-store`` on either side, no ``private``, no
        ``Vary: *``, ``Authorization`` only when the response allows it, and
        freshness information (explicit, heuristic or the route's
        ``default_ttl``) or a validator.
Rule 2: freshness is ``s-maxage`` > ``max-age`` > ``Expires - Date`` >
        the route's ``default_ttl`` > 10% of ``Date - Last-Modified`` (4.2.1,
        4.2.2); ``CDN-Cache-Control`` (RFC 9213), when valid, replaces
        ``Cache-Control`` for all of it.
Rule 3: age is computed as 4.2.3 says and sent in ``Age``.
Rule 4: a stored response is reused when its secondary key matches (4.1),
        it is fresh enough for the request's ``max-age``/``min-fresh``, and
        nothing demands revalidation (``no-cache`` on either side,
        ``Pragma: no-cache`` without ``Cache-Control``); stale ones are
        reused within ``max-stale``, ``stale-while-revalidate`` and
        ``stale-if-error`` unless ``must-revalidate``, ``proxy-revalidate``
        or ``s-maxage`` forbid it (4.2.4).
Rule 5: a 304 updates the stored header fields except Content-Length and
        the hop-by-hop ones (3.2, 4.3.4).
Rule 6: a non-error response to an unsafe method invalidates the target
        URI and the same-origin ``Location`` and ``Content-Location`` (4.4).
"""

import calendar
import re
from urllib.parse import urlsplit

from . import headers as H

# RFC 9110 15.1: statuses that are heuristically cacheable.
HEURISTIC_STATUS = frozenset((200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501))
# Final statuses this cache understands well enough to store (3: "understood").
UNDERSTOOD_STATUS = HEURISTIC_STATUS | frozenset((302, 303, 307, 400, 403, 500, 502, 503, 504))
SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))
HEURISTIC_FRACTION = 0.1        # 4.2.2's "typical setting", as Squid and httpd use
MAX_HEURISTIC = 86400.0         # a day, as Squid and httpd cap it
DELTA_MAX = 2147483648          # 1.2.2: the largest delta-seconds value we keep

# 3.1 and 3.2: never stored or updated from a 304 (the server rewrites them).
_NOT_STORED = H.HOP_BY_HOP | {"x-cache-status", "age"}
_NOT_UPDATED = _NOT_STORED | {"content-length"}

# reuse decisions (the X-Cache-Status they lead to is the handler's business)
FRESH = "fresh"               # serve it
STALE = "stale"               # serve it stale (max-stale allowed it)
UPDATING = "updating"         # serve it stale, revalidate in the background
REVALIDATE = "revalidate"     # ask the origin with its validators
MISS = "miss"                 # nothing usable

_DIRECTIVE = re.compile(r'\s*([^\s,=]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^\s,]*))?\s*(?:,|$)')


# --- parsing ---------------------------------------------------------------

def index(fields):
    """{lower-case name: combined value}: a request's or a response's fields
    looked up once each (``field`` takes either form)."""
    out = {}
    for n, v in fields:
        k = n.lower()
        out[k] = v if k not in out else f"{out[k]}, {v}"
    return out


def field(fields, name):
    """The combined value of every field called ``name`` (lower case), or None."""
    if isinstance(fields, dict):
        return fields.get(name)
    vals = [v for n, v in fields if n.lower() == name]
    return ", ".join(vals) if vals else None


def _ix(entry):
    """The stored fields as an ``index``, kept in the record for this use
    (keys starting with "_" are never stored)."""
    ix = entry.get("_ix")
    if ix is None:
        ix = entry["_ix"] = index(entry["fields"])
    return ix


def directives(value):
    """``max-age=5, no-cache="a, b"`` -> {"max-age": "5", "no-cache": "a, b"};
    names lower-cased, the first of a repeated directive wins."""
    out = {}
    if not value:
        return out
    pos = 0
    while pos < len(value):
        m = _DIRECTIVE.match(value, pos)
        if not m or m.end() == pos:
            pos = value.find(",", pos)
            if pos < 0:
                break
            pos += 1
            continue
        pos = m.end()
        name, arg = m.group(1).lower(), m.group(2)
        if arg is not None and arg.startswith('"'):
            arg = re.sub(r"\\(.)", r"\1", arg[1:-1])
        out.setdefault(name, arg)
    return out


def seconds(arg):
    """A delta-seconds argument (1.2.2) or None when it is not one."""
    if arg is None or not arg.isdigit():
        return None
    return min(int(arg), DELTA_MAX)


_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_TIME = r"(\d\d):(\d\d):(\d\d)"
# RFC 9110 5.6.7: IMF-fixdate, and the obsolete rfc850 and asctime forms;
# nothing else (a zone other than GMT, a two-digit year in the IMF form...).
_IMF = re.compile(r"^[a-z]{3}, (\d\d) ([a-z]{3}) (\d{4}) " + _TIME + " gmt$", re.I)
_RFC850 = re.compile(r"^[a-z]{6,9}, (\d\d)-([a-z]{3})-(\d\d) " + _TIME + " gmt$", re.I)
_ASCTIME = re.compile(r"^[a-z]{3} ([a-z]{3}) ([ \d]\d) " + _TIME + r" (\d{4})$", re.I)


def http_date(value, now=None):
    """An HTTP-date (RFC 9110 5.6.7) as epoch seconds, or None."""
    if not value:
        return None
    value = value.strip()
    m = _IMF.match(value)
    if m:
        day, mon, year, hh, mm, ss = m.groups()
    else:
        m = _RFC850.match(value)
        if m:
            day, mon, year, hh, mm, ss = m.groups()
            year = _two_digit_year(int(year), now)
        else:
            m = _ASCTIME.match(value)
            if not m:
                return None
            mon, day, hh, mm, ss, year = m.groups()
    month = _MONTHS.get(mon.lower())
    try:
        return float(calendar.timegm((int(year), month, int(day), int(hh), int(mm), int(ss))))
    except (TypeError, ValueError, OverflowError):
        return None


def _two_digit_year(yy, now):
    """RFC 9110 5.6.7: a year more than 50 years ahead is in the past century."""
    this = 2000 if now is None else int(1970 + now // 31556952)
    year = this // 100 * 100 + yy
    return year - 100 if year > this + 50 else year


def _entry_cc(entry, cdn):
    key = "_cc" if cdn else "_cc_plain"
    cc = entry.get(key)
    if cc is None:
        cc = entry[key] = _cc(_ix(entry), cdn)[0]
    return cc


def _cc(fields, cdn=True):
    """The response's caching directives: CDN-Cache-Control when valid and
    enabled (RFC 9213 2.1), else Cache-Control; and which one it was."""
    if cdn:
        value = field(fields, "cdn-cache-control")
        if value is not None:
            d = sf_directives(value)
            if d is not None:
                return d, True
    return directives(field(fields, "cache-control")), False


# RFC 8941 3.2: a Dictionary member; RFC 9213 2.1: a field that does not
# parse is ignored whole, and so is one whose known directives are mistyped.
_SF_MEMBER = re.compile(r'([a-z*][a-z0-9_.*-]*)(?:=(-?\d{1,15}(?:\.\d{1,3})?|"(?:[^"\\]|\\.)*"'
                        r"|[A-Za-z*][A-Za-z0-9:/!#$%&'*+.^_`|~-]*|\?[01]|:[A-Za-z0-9+/=]*:))?"
                        r"(?:;[a-z*][a-z0-9_.*-]*(?:=[^;,]*)?)*")
_SF_SPLIT = re.compile(r'\s*,\s*(?=(?:[^"]*"[^"]*")*[^"]*$)')
_SF_INTEGER = frozenset(("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"))


def sf_directives(value):
    out = {}
    for member in _SF_SPLIT.split(value.strip()):
        m = _SF_MEMBER.fullmatch(member)
        if not m:
            return None
        name, arg = m.group(1), m.group(2)
        if name in _SF_INTEGER and (arg is None or not arg.isdigit()):
            return None
        if arg is not None and arg.startswith('"'):
            arg = re.sub(r"\\(.)", r"\1", arg[1:-1])
        out.setdefault(name, None if arg == "?1" else arg)
    return out


# --- storing (RFC 9111 3) --------------------------------------------------

def request_no_store(req_fields):
    return "no-store" in directives(field(req_fields, "cache-control"))


def storable(method, status, req_fields, resp_fields, default_ttl=None, cdn=True):
    """Why the response must not be stored, or None when it may."""
    if method != "GET":
        return "method"
    if status not in UNDERSTOOD_STATUS and status // 100 not in (2, 3, 4, 5):
        return "status"
    if status in (206, 304) or status < 200:
        return "status"
    cc, _ = _cc(resp_fields, cdn)
    # 5.2.2.3: must-understand overrides no-store for a status we understand
    if "no-store" in cc and not ("must-understand" in cc and status in UNDERSTOOD_STATUS):
        return "no-store"
    if request_no_store(req_fields):
        return "request no-store"
    if "private" in cc:
        return "private"
    vary = field(resp_fields, "vary")
    if vary is not None and "*" in (v.strip() for v in vary.split(",")):
        return "vary *"
    if field(req_fields, "authorization") is not None and not (
            "public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
        return "authorization"
    explicit = ("max-age" in cc or "s-maxage" in cc or field(resp_fields, "expires") is not None)
    heuristic = (status in HEURISTIC_STATUS or "public" in cc) and (
        default_ttl is not None or field(resp_fields, "last-modified") is not None)
    validators = field(resp_fields, "etag") is not None or field(resp_fields, "last-modified") is not None
    # 3: a response with no way to be fresh and none to be revalidated is
    # never reused; storing it would only push others out
    if not (explicit or heuristic or validators):
        return "no freshness"
    return None


def stored_fields(resp_fields):
    """The response fields worth storing: no hop-by-hop, nothing named in
    Connection (3.1), no Age (recomputed on every use)."""
    return H.strip_hop_by_hop(resp_fields, _NOT_STORED)


def secondary_key(resp_fields, req_fields):
    """The Vary fields and the request's normalised values for them (4.1)."""
    vary = field(resp_fields, "vary")
    if not vary:
        return []
    names = sorted({n.strip().lower() for n in vary.split(",") if n.strip()})
    return [[n, _normal(field(req_fields, n))] for n in names]


def _normal(value):
    if value is None:
        return None
    return ",".join(p.strip() for p in value.split(",") if p.strip())


def vary_matches(stored_vary, req_fields):
    if not stored_vary:
        return True
    return all(_normal(field(req_fields, n)) == v for n, v in stored_vary)


def stored(status, reason, resp_fields, request_time, response_time, size, vary):
    """The record kept for one stored response: its storable fields, the
    Age it arrived with, when it was asked for and received (4.2.3)."""
    return {"status": status, "reason": reason,
            "fields": [list(f) for f in stored_fields(resp_fields)],
            "age_value": age_value(resp_fields),
            "request_time": request_time, "response_time": response_time,
            "size": size, "vary": vary}


def age_value(resp_fields):
    """The first Age value when it is a delta-seconds (5.1), else 0."""
    age = field(resp_fields, "age")
    if age is None:
        return 0
    return seconds(age.split(",")[0].strip()) or 0


# --- freshness and age (4.2) -----------------------------------------------

def freshness_lifetime(entry, default_ttl=None, cdn=True):
    """Seconds the stored response is fresh for (4.2.1); kept in the record
    per route setting, as it depends on nothing else."""
    memo = entry.get("_lifetime")
    if memo is None:
        memo = entry["_lifetime"] = {}
    lifetime = memo.get((default_ttl, cdn))
    if lifetime is None:
        lifetime = memo[(default_ttl, cdn)] = _lifetime(entry, default_ttl, cdn)
    return lifetime


def _lifetime(entry, default_ttl, cdn):
    fields = _ix(entry)
    cc = _entry_cc(entry, cdn)
    for name in ("s-maxage", "max-age"):
        if name in cc:
            n = seconds(cc[name])
            return 0.0 if n is None else float(n)     # an invalid value: stale
    expires = field(fields, "expires")
    if expires is not None:
        exp = http_date(expires)
        if exp is None:
            return 0.0                                # 5.3: invalid means expired
        date = _date(entry)
        return max(0.0, exp - date)
    if not (entry["status"] in HEURISTIC_STATUS or "public" in cc):
        return 0.0                                    # 4.2.2: no heuristic for this status
    if default_ttl is not None:
        return float(default_ttl)
    lm = http_date(field(fields, "last-modified"))
    if lm is None:
        return 0.0
    return min(MAX_HEURISTIC, max(0.0, (_date(entry) - lm) * HEURISTIC_FRACTION))


def _date(entry):
    d = entry.get("_date")
    if d is None:
        d = http_date(field(_ix(entry), "date"))
        d = entry["_date"] = d if d is not None else entry["response_time"]
    return d


def current_age(entry, now):
    """4.2.3 (the corrected initial age is kept in the record)."""
    initial = entry.get("_initial_age")
    if initial is None:
        apparent = max(0.0, entry["response_time"] - _date(entry))
        delay = entry["response_time"] - entry["request_time"]
        initial = entry["_initial_age"] = max(apparent, entry["age_value"] + delay)
    return initial + max(0.0, now - entry["response_time"])


def age_field(entry, now):
    return str(min(int(current_age(entry, now)), DELTA_MAX))


# --- reuse (4, 4.2.4, 4.3) -------------------------------------------------

class Route:
    """A route's caching options, as the rules need them."""

    __slots__ = ("default_ttl", "stale_while_revalidate", "stale_if_error", "cdn")

    def __init__(self, default_ttl=None, stale_while_revalidate=0.0, stale_if_error=0.0, cdn=True):
        self.default_ttl = default_ttl
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error
        self.cdn = cdn


def request_directives(req_fields):
    value = field(req_fields, "cache-control")
    cc = directives(value)
    if value is None:
        pragma = field(req_fields, "pragma")
        if pragma and "no-cache" in directives(pragma):
            cc["no-cache"] = None       # 5.4: Pragma only without Cache-Control
    return cc


def reuse(entry, req_fields, now, route):
    """FRESH, STALE, UPDATING, REVALIDATE or MISS for one stored response."""
    if not vary_matches(entry["vary"], req_fields):
        return MISS
    req = request_directives(req_fields)
    cc = _entry_cc(entry, route.cdn)
    lifetime = freshness_lifetime(entry, route.default_ttl, route.cdn)
    age = current_age(entry, now)
    if "no-cache" in cc or "no-cache" in req:
        return REVALIDATE
    max_age = seconds(req.get("max-age")) if "max-age" in req else None
    if "max-age" in req and (max_age is None or age > max_age):
        return REVALIDATE
    min_fresh = seconds(req.get("min-fresh")) or 0
    if age + min_fresh < lifetime:
        return FRESH
    if age < lifetime:      # fresh, only not fresh enough for min-fresh
        return REVALIDATE
    if _no_stale(cc):
        return REVALIDATE
    staleness = age - lifetime
    if "max-stale" in req:
        limit = seconds(req["max-stale"]) if req["max-stale"] is not None else DELTA_MAX
        if limit is not None and staleness <= limit:
            return STALE
    swr = seconds(cc.get("stale-while-revalidate"))
    if swr is None:
        swr = route.stale_while_revalidate
    if staleness < swr:
        return UPDATING
    return REVALIDATE


# The request fields ``reuse`` reads besides the Vary ones; a request with
# none of them is "plain" (most are), and a 304 or 206 needs one.
REUSE_FIELDS = frozenset(("cache-control", "pragma", "if-none-match", "if-modified-since", "range"))


def fresh_until(entry, route):
    """Until when ``reuse`` says FRESH to a plain request (none of
    ``REUSE_FIELDS``) whose secondary key matches: the same rules with the
    request's part empty, kept in the record per route setting. -inf when
    never (``no-cache``, or the response arrived stale)."""
    memo = entry.get("_fresh_until")
    if memo is None:
        memo = entry["_fresh_until"] = {}
    key = (route.default_ttl, route.cdn)
    until = memo.get(key)
    if until is None:
        lifetime = freshness_lifetime(entry, route.default_ttl, route.cdn)
        initial = current_age(entry, entry["response_time"])
        if "no-cache" in _entry_cc(entry, route.cdn) or initial >= lifetime:
            until = float("-inf")
        else:
            until = entry["response_time"] + lifetime - initial
        memo[key] = until
    return until


def _no_stale(cc):
    return "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc


def usable_on_error(entry, now, route):
    """4.2.4 and RFC 5861 4: may this stale response stand in for an error?"""
    cc = _entry_cc(entry, route.cdn)
    if _no_stale(cc) or "no-cache" in cc or entry["status"] >= 500:
        return False        # a stored error is no better than the new one
    sie = seconds(cc.get("stale-if-error"))
    if sie is None:
        sie = route.stale_if_error
    staleness = current_age(entry, now) - freshness_lifetime(entry, route.default_ttl, route.cdn)
    return staleness < sie


def only_if_cached(req_fields):
    return "only-if-cached" in request_directives(req_fields)


def conditional_fields(entry):
    """The validators to revalidate a stored response with (4.3.1)."""
    out = []
    etag = field(_ix(entry), "etag")
    if etag is not None:
        out.append(("If-None-Match", etag))
    lm = field(_ix(entry), "last-modified")
    if lm is not None:
        out.append(("If-Modified-Since", lm))
    return out


def validatable(entry):
    return bool(conditional_fields(entry))


def not_modified(entry, req_fields):
    """Does the client's own precondition hold for the stored response, so
    that a 304 answers it (4.3.2; RFC 9110 13.1.2 and 13.1.3)?"""
    inm = field(req_fields, "if-none-match")
    if inm is None and not field(req_fields, "if-modified-since"):
        return False
    if inm is not None:
        etag = field(_ix(entry), "etag")
        if etag is None:
            return False
        tags = [t.strip() for t in inm.split(",")]
        return "*" in tags or _weak(etag) in (_weak(t) for t in tags)
    ims = http_date(field(req_fields, "if-modified-since"))
    if ims is None:
        return False
    # 4.3.2: without Last-Modified, the Date, else when it was received
    lm = http_date(field(_ix(entry), "last-modified")) or _date(entry)
    return lm <= ims


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.I)


def byte_range(entry, req_fields):
    """The one byte range (first, last) to serve from a stored 200, None to
    serve it whole, or False when the range cannot be satisfied (416).
    Several ranges and an If-Range that does not match get the whole
    response, as RFC 9110 14.2 allows."""
    value = field(req_fields, "range")
    if value is None or entry["status"] != 200:
        return None
    if_range = field(req_fields, "if-range")
    if if_range is not None and not _if_range_holds(entry, if_range):
        return None
    m = _RANGE.match(value)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    size = entry["size"]
    if m.group(1):
        first = int(m.group(1))
        last = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if first >= size:
            return False
        if last < first:
            return None     # invalid: ignored (RFC 9110 14.1.1)
    else:
        n = int(m.group(2))
        if n == 0:
            return False
        first, last = max(0, size - n), size - 1
    return first, last


def _if_range_holds(entry, if_range):
    etag = field(_ix(entry), "etag")
    if if_range.strip().startswith(("\"", "W/")):
        return etag is not None and not etag.startswith("W/") and etag == if_range.strip()
    lm = field(_ix(entry), "last-modified")
    return lm is not None and lm.strip() == if_range.strip()


def _weak(tag):
    return tag[2:] if tag.startswith("W/") else tag


# 15.4.5 of RFC 9110: what a 304 carries from the stored response
_304_FIELDS = frozenset(("cache-control", "content-location", "date", "etag", "expires",
                         "vary", "last-modified"))


def not_modified_fields(entry):
    return [(n, v) for n, v in entry["fields"] if n.lower() in _304_FIELDS]


def freshen(entry, resp_fields, request_time, response_time):
    """The stored response updated by a 304 (3.2): its fields replaced by
    the 304's, except Content-Length; the clock restarts."""
    new = H.strip_hop_by_hop(resp_fields, _NOT_UPDATED)
    replaced = {n.lower() for n, _ in new}
    fields = [f for f in entry["fields"] if f[0].lower() not in replaced] + [list(f) for f in new]
    kept = {k: v for k, v in entry.items() if not k.startswith("_")}
    return dict(kept, fields=fields, age_value=age_value(resp_fields),
                request_time=request_time, response_time=response_time)


def same_validator(entry, resp_fields):
    """4.3.4: a 304 whose strong ETag names another representation must not
    update this one."""
    new = field(resp_fields, "etag")
    old = field(_ix(entry), "etag")
    if new is None or old is None or new.startswith("W/"):
        return True
    return new == old


# --- invalidation (4.4) ----------------------------------------------------

def invalidates(method, status):
    return method not in SAFE_METHODS and 200 <= status < 400


def invalidated_targets(host, resp_fields):
    """Request targets (path?query) the response's Location and
    Content-Location name on ``host``."""
    out = []
    for name in ("location", "content-location"):
        value = field(resp_fields, name)
        if not value:
            continue
        parts = urlsplit(value.strip())
        if parts.netloc and parts.netloc.lower() != host.lower():
            continue        # 4.4: only the same origin
        if parts.scheme and parts.scheme not in ("http", "https"):
            continue
        path = parts.path or "/"
        if not path.startswith("/"):
            continue
        out.append(path + ("?" + parts.query if parts.query else ""))
    return out
