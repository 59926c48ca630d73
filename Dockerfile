# gproxy container: gunicorn + gevent workers, config at /etc/gproxy/gproxy.yaml.
FROM python:3.11-slim

RUN useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin gproxy
WORKDIR /opt/gproxy
COPY pyproject.toml README.md gunicorn.conf.py ./
COPY gproxy ./gproxy
RUN pip install --no-cache-dir . && mkdir -p /etc/gproxy

ENV GPROXY_CONFIG=/etc/gproxy/gproxy.yaml
USER gproxy
EXPOSE 8080
# The process manager's stop timeout must exceed graceful_timeout (30s by default).
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "/opt/gproxy/gunicorn.conf.py", "gproxy.wsgi"]
