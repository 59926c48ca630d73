# gproxy container: gunicorn + gevent workers.
#
#   docker build -t gproxy .
#   docker run --rm -p 8080:8080 gproxy                       # the built-in default (below)
#   docker run --rm -p 8080:8080 -v $PWD/gproxy.yaml:/etc/gproxy/gproxy.yaml:ro --stop-timeout 40 gproxy
#
# With no config mounted it runs the built-in default (a forward proxy for
# loopback clients, health path /-/health) listening on $GPROXY_LISTEN, set
# here to 0.0.0.0:8080. A mounted /etc/gproxy/gproxy.yaml (the working
# directory's gproxy.yaml) replaces it; it must listen on 0.0.0.0 too, and may
# use ${VAR} from the container's environment. Give the runtime a stop timeout
# above graceful_timeout (+ drain_delay when the LB drains first): 40s for the
# defaults (docker run --stop-timeout 40, compose stop_grace_period: 40s,
# Kubernetes terminationGracePeriodSeconds: 40).
FROM python:3.11-slim

RUN useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin gproxy
WORKDIR /opt/gproxy
COPY pyproject.toml README.md ./
COPY gproxy ./gproxy
RUN pip install --no-cache-dir . && mkdir -p /etc/gproxy

WORKDIR /etc/gproxy
ENV GPROXY_LISTEN=0.0.0.0:8080 \
    GPROXY_HEALTH_URL=http://127.0.0.1:8080/-/health
USER gproxy
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GPROXY_HEALTH_URL'], timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "python:gproxy.gunicorn_conf", "gproxy.wsgi"]
