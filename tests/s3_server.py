"""A local S3-compatible server for tests (moto's, in this process, on a loopback port) that a test can
take down and bring back on the same port: its buckets and objects live in this process, so they are
all there again after the outage, as with a real store that restarts.

pyarrow (and so Ray Train and the jobs) reaches it through ``AWS_ENDPOINT_URL``, the variable users set
for MinIO / Ceph / other S3-compatible stores; the keys are moto's dummies.
"""
from __future__ import annotations

import logging
import threading
import time

import pyarrow.fs as pafs

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.port = 0
        self._moto = None
        self._trigger = None  # (predicate(method, path), seconds) of an armed outage
        self.outages: list[tuple[float, float, str]] = []  # (down at, up at, the request that set it off)
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        """What a process needs in its environment to use this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **KEYS}

    def filesystem(self) -> pafs.S3FileSystem:
        """An admin client (it may create buckets)."""
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", access_key=KEYS["AWS_ACCESS_KEY_ID"],
                                 secret_key=KEYS["AWS_SECRET_ACCESS_KEY"], region=KEYS["AWS_DEFAULT_REGION"],
                                 allow_bucket_creation=True)

    def start(self) -> None:
        """Listen (again) on the server's port; the first start picks a free one."""
        from moto.server import ThreadedMotoServer
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._moto.start()
        self.port = self._moto.get_host_and_port()[1]
        inner = self._moto._server.app  # the WSGI app werkzeug serves; wrapped to watch requests
        self._moto._server.app = lambda environ, start_response: self._serve(inner, environ, start_response)

    def stop(self) -> None:
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    def outage_at(self, predicate, seconds: float) -> None:
        """Arm an outage: the first request for which ``predicate(method, path)`` holds gets a 503, the
        server stops at once, and starts again ``seconds`` later on the same port."""
        self._trigger = (predicate, seconds)

    def _serve(self, inner, environ, start_response):
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        with self._lock:
            trigger = self._trigger
            fire = trigger is not None and trigger[0](method, path)
            if fire and self._trigger is trigger:  # the predicate may have armed the next one
                self._trigger = None
        if not fire:
            return inner(environ, start_response)
        threading.Thread(target=self._outage, args=(trigger[1], f"{method} {path}"), daemon=True).start()
        start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
        return [b"<Error><Code>ServiceUnavailable</Code><Message>going down</Message></Error>"]

    def _outage(self, seconds: float, request: str) -> None:
        down = time.time()
        self.stop()
        time.sleep(seconds)
        self.start()
        self.outages.append((down, time.time(), request))
