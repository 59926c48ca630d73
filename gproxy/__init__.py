"""gproxy: an HTTP/1.1 reverse and forward proxy on gunicorn + gevent."""

__version__ = "0.1.0"
