"""gunicorn's ``gevent_pywsgi`` worker, handing the application what the
``gevent`` worker's ``pre_request`` hook hands it: the request header fields
as received (repeats kept, in order), which the WSGI environ joins.

Chosen with ``worker_class: gevent_pywsgi`` (the default is ``gevent``);
bench/README.md has the measured difference. gunicorn loads a worker class
in the arbiter, so this module imports gunicorn's worker (and with it
gevent, as the ``gevent`` worker class does) but never requests, urllib3
or ssl (benoitc/gunicorn#2796).
"""

from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler


class Handler(PyWSGIHandler):
    def get_environ(self):
        env = super().get_environ()
        # pywsgi parses the head with http.client.parse_headers; its list
        # keeps every field as received.
        env["gproxy.headers"] = self.headers._headers
        return env


class Worker(GeventPyWSGIWorker):
    wsgi_handler = Handler
