#!/usr/bin/env bash
# CI: run ops/ansible for real against this machine (-i localhost, -c local),
# then send HTTPS through the nginx it set up to the gproxy it started, run it
# again with a changed config (the handler reloads with gproxy reload), and
# stop what it started (by pid). ansible-core and ansible-lint come from PyPI
# into .ci/ansible (git-ignored). Uses ports 18080 (gproxy), 19901 (admin),
# 18443 (nginx) and a backend on a free port, so the test suite's defaults are
# left alone; the second run adds StatsD (8125, 8126) and carbon (2003), which
# it stops again. Without systemd as PID 1 the role starts gproxy and nginx with
# start-stop-daemon (gproxy_use_systemd follows the facts).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
ans=.ci/ansible
if [ ! -x "$ans/bin/ansible-playbook" ] || [ ! -x "$ans/bin/ansible-lint" ]; then
  python3 -m venv "$ans"
  "$ans/bin/pip" install -q --disable-pip-version-check 'ansible-core>=2.17,<2.20' 'ansible-lint>=25,<27' \
    2> >(grep -v "^WARNING: Location" >&2)
fi
export PATH="$repo/$ans/bin:$PATH" ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_INVENTORY_UNPARSED_WARNING=false

echo "== ansible-lint"
(cd ops/ansible && "$repo/$ans/bin/ansible-lint" --offline -q playbook.yml roles/gproxy)

work=$(mktemp -d)
# the second run writes carbon's storage-*.conf: put this machine's back after
mkdir -p "$work/carbon"
for f in storage-schemas.conf storage-aggregation.conf; do
  [ -f "/etc/carbon/$f" ] && cp -p "/etc/carbon/$f" "$work/carbon/$f"
done
backend_pid=""
running_before() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
nginx_was_running=false; running_before /run/nginx.pid && nginx_was_running=true
ours=()         # pidfiles of daemons this script starts (not running before)
for pidfile in /run/gproxy-statsd.pid /var/run/carbon-cache-a.pid; do
  running_before "$pidfile" || ours+=("$pidfile")
done
cleanup() {
  set +e
  if [ -f /run/gproxy/gproxy.pid ]; then
    pid=$(cat /run/gproxy/gproxy.pid)
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  if ! $nginx_was_running && [ -f /run/nginx.pid ]; then
    pid=$(cat /run/nginx.pid)
    kill -QUIT "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  for pidfile in "${ours[@]}"; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill -TERM "$pid" 2>/dev/null
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f /run/gproxy-statsd.pid      # start-stop-daemon --make-pidfile leaves it
  done
  rm -f /etc/nginx/conf.d/gproxy.conf /etc/logrotate.d/gproxy
  for f in storage-schemas.conf storage-aggregation.conf; do
    if [ -f "$work/carbon/$f" ]; then cp -p "$work/carbon/$f" "/etc/carbon/$f"; else rm -f "/etc/carbon/$f"; fi
    rm -f /etc/carbon/"$f".*~      # the role's backups
  done
  [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

bport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/www" && echo "hello from the backend" > "$work/www/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$bport" >/dev/null 2>&1 &
backend_pid=$!

vars() {
  cat <<JSON
{"gproxy_source": "$repo", "gproxy_listen": "127.0.0.1:18080", "gproxy_admin_listen": "127.0.0.1:19901",
 "gproxy_nginx_port": 18443, "gproxy_workers": $1, "gproxy_drain_delay": "2s", "gproxy_monitoring": $2,
 "gproxy_upstreams": {"app": {"backends": ["http://127.0.0.1:$bport"]}},
 "gproxy_routes": [{"upstream": "app"}]}
JSON
}
play() {
  vars "$1" "$2" > "$work/vars.json"
  # Debian's Python (with python3-apt), whatever python3 is first on PATH
  "$ans/bin/ansible-playbook" -i localhost, -c local ops/ansible/playbook.yml -e "@$work/vars.json" \
    -e ansible_python_interpreter=/usr/bin/python3
}

echo "== first run"
start=$(date +%s)
play 2 false
echo "first run: $(( $(date +%s) - start ))s"
body=$(curl -sS --fail --cacert /etc/ssl/certs/gproxy.pem https://localhost:18443/index.html)
[ "$body" = "hello from the backend" ] || { echo "unexpected body through nginx: $body"; exit 1; }
curl -sS --fail --cacert /etc/ssl/certs/gproxy.pem -o /dev/null https://localhost:18443/-/health
echo "HTTPS through nginx to gproxy: ok"

echo "== second run, 3 workers and StatsD + carbon (the handler reloads gproxy)"
pid=$(cat /run/gproxy/gproxy.pid)
play 3 true
[ "$(cat /run/gproxy/gproxy.pid)" = "$pid" ] || { echo "gproxy was restarted, not reloaded"; exit 1; }
# gproxy reload returns once the new config is in; the old workers finish gracefully
for _ in $(seq 100); do
  workers=$(pgrep -P "$pid" -f 'gunicorn: worker' | wc -l)
  [ "$workers" = 3 ] && break
  sleep 0.2
done
[ "$workers" = 3 ] || { echo "expected 3 workers after the reload, found $workers"; exit 1; }
/opt/gproxy/venv/bin/gproxy status --config /etc/gproxy/gproxy.yaml
curl -sS --fail --cacert /etc/ssl/certs/gproxy.pem -o /dev/null https://localhost:18443/index.html
# gproxy's counters reach the StatsD daemon the role started (its admin port)
for _ in $(seq 50); do
  counters=$(python3 -c 'import socket; s=socket.create_connection(("127.0.0.1", 8126), 2); s.sendall(b"counters\n"); print(s.recv(65536).decode())' 2>/dev/null || true)
  case "$counters" in *gproxy.server.responses.2xx*) break ;; esac
  curl -sS --cacert /etc/ssl/certs/gproxy.pem -o /dev/null https://localhost:18443/index.html; sleep 0.2
done
case "$counters" in *gproxy.server.responses.2xx*) echo "StatsD receives gproxy's metrics: ok" ;;
  *) echo "StatsD has no gproxy counters: $counters"; exit 1 ;; esac
echo "ops/ansible: ok"
