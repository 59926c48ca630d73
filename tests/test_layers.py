"""The import rules of ARCHITECTURE.md, enforced: every gproxy module sits in
one layer, imports point down (or sideways without a cycle), and each
outside library is imported only where ARCHITECTURE.md says."""

import ast
import os
import re

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gproxy")

LAYERS = [
    ("vocabulary", {"errors", "headers", "netaddr", "__init__"}),
    ("configuration", {"config"}),
    ("decisions", {"router", "balancer", "health", "acl", "ratelimit", "cachepolicy"}),
    ("adapters", {"h1", "transport", "healthtable", "tunnel", "stats", "accesslog", "htpasswd",
                  "downstream", "ratestore", "cachestore", "counters", "auth", "instance", "control", "observe"}),
    ("exchange", {"exchange"}),
    ("orchestration", {"proxy", "forward", "upgrade", "cache", "gateway"}),
    ("processes", {"worker", "wsgi", "supervisor", "lifecycle", "admin", "cli", "logs",
                   "gunicorn_conf", "livereport"}),
]
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}

# outside library -> the only modules that may import it
LIBRARIES = {
    "gunicorn": {"worker", "logs", "gunicorn_conf"},   # the server, and gunicorn's logger class
    "httptools": {"worker", "h1"},     # llhttp: requests in the server, response heads in the client
    "requests": {"transport"},
    "urllib3": {"transport"},
    "yaml": {"config"},
    "statsd": {"stats"},
    "redis": {"ratestore"},
    "jwt": {"auth"},
}


def modules():
    return sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py"))


def imports(mod):
    """(gproxy modules, top-level outside packages) that ``mod`` imports,
    anywhere in the file (function-level imports included)."""
    with open(os.path.join(PKG, mod + ".py")) as f:
        tree = ast.parse(f.read())
    ours, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    ours.add(node.module.split(".")[0])
                else:
                    ours.update(a.name for a in node.names)
            elif node.level == 0 and node.module:
                outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside.update(a.name.split(".")[0] for a in node.names)
    return ours - {"__version__"}, outside


@pytest.mark.parametrize("mod", modules())
def test_module_has_a_layer_and_imports_point_down(mod):
    assert mod in LAYER, f"gproxy/{mod}.py is in no layer: add it to ARCHITECTURE.md and LAYERS"
    ours, _ = imports(mod)
    for dep in ours:
        assert dep in LAYER, f"{mod} imports {dep}, which is in no layer"
        assert LAYER[dep] <= LAYER[mod], \
            f"{mod} ({LAYERS[LAYER[mod]][0]}) imports {dep} ({LAYERS[LAYER[dep]][0]}): imports point down"


@pytest.mark.parametrize("mod", modules())
def test_outside_libraries_only_where_allowed(mod):
    _, outside = imports(mod)
    for lib, allowed in LIBRARIES.items():
        if lib in outside:
            assert mod in allowed, f"{mod} imports {lib}; only {sorted(allowed)} may"


def test_no_import_cycles():
    graph = {m: imports(m)[0] & set(LAYER) for m in modules()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for dep in sorted(graph.get(m, ())):
            visit(dep, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


def test_handlers_beside_the_reverse_proxy_never_import_it():
    for mod in ("forward", "upgrade", "exchange"):
        assert "proxy" not in imports(mod)[0], f"{mod} imports proxy"


def test_below_the_handlers_nothing_reads_the_wsgi_environ():
    """The environ stops at the handlers: below them, modules take the
    downstream.Request (method, target, fields, body, socket)."""
    for mod in modules():
        if LAYER.get(mod, 99) < LAYER["exchange"] or mod == "exchange":
            with open(os.path.join(PKG, mod + ".py")) as f:
                text = f.read()
            if mod in ("downstream", "exchange"):
                continue        # downstream builds it; Exchange is made from it by the handlers
            assert not re.search(r"(?<!os\.)\benviron(\[|\.get\()", text), f"{mod} reads the environ"
