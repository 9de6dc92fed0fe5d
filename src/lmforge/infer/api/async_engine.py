"""The engine on a background thread, for asyncio callers (the server).

The engine is not thread-safe and its steps block (the model runs), so one thread owns it: it takes requests and
aborts from an inbox, steps while there is work, and hands each output to the asyncio queue of its request through
the event loop (`call_soon_threadsafe`). `generate()` is an async iterator of outputs; leaving it early (the client
disconnected, the task was cancelled) aborts the request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from ..engine.core import Engine
from ..sampling.logits import SamplingParams
from .outputs import Completion

log = logging.getLogger("lmforge.serve")
T = TypeVar("T")


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if not future.done():  # the caller may have been cancelled
        future.set_exception(error) if error is not None else future.set_result(result)


class EngineDeadError(RuntimeError):
    """The engine thread hit an unexpected error; requests in flight were failed with it."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._started = False

    def start(self) -> AsyncEngine:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._started:
            self._thread.join(timeout)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None, request_id: str,
                       adapter: str | None = None) -> AsyncIterator[Completion]:
        """Outputs of one request as they come; raises the engine's one-line error before the first output if the
        request is invalid (too long, bad parameters)."""
        params = self.engine.validate(prompt_ids, params, adapter)
        self.start()
        outputs: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", request_id, (list(prompt_ids), params, adapter), asyncio.get_running_loop(), outputs))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps (requests in flight keep running around it) and
        return its result, or raise its exception: how the server changes the engine while it serves."""
        self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._inbox.put(("call", fn, loop, done))
        self._wake.set()
        return await done

    def stats(self) -> dict:
        return self.engine.stats()

    # ------------------------------------------------------------------------------------------ engine thread

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, outputs = target
        if isinstance(item, BaseException) or item.finished:
            del self._streams[request_id]
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, request_id, (prompt_ids, params, adapter), loop, outputs = msg
                self._streams[request_id] = (loop, outputs)
                try:
                    self.engine.add_request(prompt_ids, params, request_id=request_id, adapter=adapter)
                except Exception as e:  # noqa: BLE001 - reported to the one caller it concerns
                    self._deliver(request_id, e)
            elif msg[0] == "call":
                _, fn, loop, done = msg
                try:
                    result, error = fn(self.engine), None
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    result, error = None, e
                try:
                    loop.call_soon_threadsafe(_settle, done, result, error)
                except RuntimeError:  # the caller's loop is closed
                    pass
            else:
                self.engine.abort(msg[1])
                self._streams.pop(msg[1], None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a bug: fail what is in flight, keep serving
                log.exception("engine step failed")
                for request_id in list(self._streams):
                    self.engine.abort(request_id)
                    self._deliver(request_id, EngineDeadError(f"engine error: {e}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
