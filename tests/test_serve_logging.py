"""Serving in-process (tests, the quickstart's serve step) leaves the host's logging alone.

uvicorn's default logging setup is a `dictConfig`, which first flushes and closes every handler in the process. A
handler that owns its stream closes it then: absl's (created on `import rouge_score`) holds the sys.stderr of the
moment it was made, which under pytest is a capture file, and the whole pytest session died with 'I/O operation on
closed file' at the next test that started a server."""
from __future__ import annotations

import io
import logging

import httpx
import pytest


class OwnsItsStream(logging.StreamHandler):
    """Closes its stream on close(), as absl's handler does for any stream that is not the current sys.stderr."""

    def close(self) -> None:
        self.stream.close()
        super().close()


def test_serving_in_a_thread_does_not_close_the_processes_logging_handlers():
    fastapi = pytest.importorskip("fastapi")
    from lmforge.testing import serve_in_thread

    stream = io.StringIO()
    handler = OwnsItsStream(stream)  # in logging's handler list, as every handler is, though on no logger
    app = fastapi.FastAPI()
    app.get("/ping")(lambda: {"ok": True})
    url, stop = serve_in_thread(app)
    try:
        assert httpx.get(f"{url}/ping", timeout=10).json() == {"ok": True}
    finally:
        stop()
    assert not stream.closed
    handler.close()
