"""gunicorn settings for a checkout: ``gunicorn -c gunicorn.conf.py gproxy.wsgi``.

The settings live in the package, gproxy/gunicorn_conf.py, so that an
installed gproxy runs from any directory with
``gunicorn -c python:gproxy.gunicorn_conf gproxy.wsgi``; this file is the same
thing for a checkout. Like that module it imports no requests, urllib3, ssl
or gevent (benoitc/gunicorn#2796).
"""

from gproxy.gunicorn_conf import *  # noqa: F401,F403
