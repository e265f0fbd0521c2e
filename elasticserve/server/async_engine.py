"""AsyncLLMEngine: the single-threaded LLMEngine on a thread of its own, streamed to asyncio.

The engine thread owns the LLMEngine: it takes commands (add, abort, stop) from a thread-safe
queue between steps, steps while there is work, sleeps on the queue when there is none, and hands
each RequestOutput to its request's asyncio.Queue with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.metrics import EngineMetrics, RequestTimes, request_done, token_event
from elasticserve.engine.outputs import (
    CompletionOutput,
    EngineStats,
    RequestOutput,
    RequestSnapshot,
)
from elasticserve.engine.sampling import SamplingParams
from elasticserve.engine.stat_logger import ThroughputLog
from elasticserve.model.bundle import ModelBundle
from elasticserve.model.shapes import Shape, ShapeSpec

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit: the client should retry after `retry_after_s`."""

    def __init__(self, num_waiting: int, retry_after_s: float = 1.0):
        super().__init__(
            f"the server is overloaded: {num_waiting} requests are waiting; retry later"
        )
        self.retry_after_s = retry_after_s


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or crashed)."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    shape: str | Shape | ShapeSpec | None
    priority: int
    slo: Mapping[str, float] | None
    arrival: float
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput]
    admitted: asyncio.Future[str]  # the shape name at admission, or the add_request error


@dataclass
class _Abort:
    request_id: str


_STOP = object()
_Command = _Add | _Abort | object


@dataclass
class _Live:
    """Engine-thread bookkeeping of one admitted request."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput]
    times: RequestTimes
    last: RequestOutput | None = None
    started: float | None = None  # when it first ran in a step


class RequestStream:
    """One request's outputs as an async iterator; leaving it early aborts the request."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, shape: str, outputs: asyncio.Queue):
        self.request_id = request_id
        self.shape = shape  # the shape it was admitted at
        self._engine = engine
        self._outputs: asyncio.Queue[RequestOutput] = outputs
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._outputs.get()
        except BaseException:  # cancelled: the client went away, free its KV blocks
            self.abort()
            raise
        self._done = out.finished
        return out

    def abort(self) -> None:
        """Stop the request in the engine (no-op once it has finished)."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    def __del__(self) -> None:
        # A consumer that just dropped the stream must not leave the request running.
        if not getattr(self, "_done", True):
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    """Serves an LLMEngine to asyncio code from a background thread (the only one touching it)."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._metrics: tuple[EngineMetrics, ...] = ()
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._stopped = False
        self._preemptions = 0  # the engine's count at the last step
        self._last_step: object = None  # the engine's last_step already reported
        self.throughput_log = ThroughputLog()  # vLLM's periodic stats line while busy
        self._accepting = True
        # Seconds from a request's first step to its end (a moving average): the drain estimate.
        self._service_s = 1.0
        self._thread = threading.Thread(target=self._run, name="elasticserve-engine", daemon=True)
        self._thread.start()

    # -- asyncio side --------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        shape: str | Shape | ShapeSpec | None = None,
        request_id: str | None = None,
        priority: int = 0,
        slo: Mapping[str, float] | None = None,
    ) -> RequestStream:
        """Admit a request and return its outputs; ValueError / QueueFullError before any.

        shape None (or "auto"): the engine's policy picks it; `slo` ({"ttft_ms", "tpot_ms"}) is
        what the policy aims for. The policy's refusal (`Overloaded`) is raised here too.
        """
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        request_id = request_id or f"async-{next(self._ids)}"
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        admitted: asyncio.Future[str] = loop.create_future()
        arrival = time.monotonic()
        cmd = _Add(
            request_id, prompt, params, shape, priority, slo, arrival, loop, outputs, admitted
        )
        self._commands.put(cmd)
        try:
            admitted_shape = await admitted
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been admitted after all
            raise
        return RequestStream(self, request_id, admitted_shape, outputs)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its KV blocks (thread-safe; unknown ids are ignored)."""
        self._commands.put(_Abort(request_id))

    def attach_metrics(self, metrics: EngineMetrics) -> None:
        """Report every request and step to `metrics` too (an app's registry)."""
        engine = self.engine
        metrics.set_cache_config(
            engine.config.block_size,
            str(engine.bundle.model.cache_dtype).removeprefix("torch."),
            engine.block_manager.num_blocks,
            engine.config.enable_prefix_caching,
        )
        self._metrics = (*self._metrics, metrics)  # one atomic swap: the engine thread iterates it

    def stats(self) -> EngineStats:
        """The load after the engine's latest step or command."""
        return self._stats

    @property
    def bundle(self) -> ModelBundle:
        """The served model: its grid, tokenizer and context length (read-only)."""
        return self.engine.bundle

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def drain(self) -> None:
        """Refuse new requests (EngineDeadError) and go on serving those in flight."""
        self._accepting = False

    def stop(self) -> None:
        """Fail what is in flight and stop the engine thread, without waiting for it."""
        self._accepting = False
        self._stopped = True
        self._commands.put(_STOP)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is in flight, stop the engine thread and wait for it."""
        self.stop()
        self._thread.join(timeout)
        while True:  # a request sent while it stopped must not wait forever for its admission
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._call(cmd.loop, _settle, cmd.admitted, EngineDeadError("the engine stopped"))

    # -- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._handle_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish()
        except Exception:  # a bug in this loop: fail everyone rather than hang them
            log.exception("the engine thread crashed")
            self._fail_all("internal error: the engine stopped")
        finally:
            self._stopped = True

    def _handle_commands(self, block: bool) -> bool:
        """Run every queued command (waiting for one if `block`); False once told to stop."""
        try:
            cmd = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                self._fail_all("the server is shutting down")
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Abort):
                self._abort(cmd.request_id)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, cmd: _Add) -> None:
        try:
            stats = self.engine.stats()
            slots = self.engine.config.max_num_seqs
            # Refused only when the queue is full beyond what the batch's free slots will take.
            queued = stats.num_waiting - max(0, slots - stats.num_running)
            if queued >= self.max_waiting:
                # Running requests end at about slots / service_s a second; this many must.
                ahead = queued - self.max_waiting + 1
                raise QueueFullError(stats.num_waiting, ahead * self._service_s / slots)
            self.engine.add_request(
                cmd.prompt,
                cmd.params,
                cmd.shape,
                request_id=cmd.request_id,
                priority=cmd.priority,
                arrival_time=cmd.arrival,
                slo=cmd.slo,
            )
        except Exception as exc:  # ValueError: the client's fault; anything else reaches it too
            self._call(cmd.loop, _settle, cmd.admitted, exc)
            return
        admitted = self.engine.request(cmd.request_id)
        assert admitted is not None  # just added, and no step ran since
        shape = admitted.spec.name
        # The admitted shape starts the switch count: the policy may move a request still queued.
        times = RequestTimes(cmd.arrival, last_shape=shape)
        self._live[cmd.request_id] = _Live(cmd.loop, cmd.outputs, times)
        if not self._call(cmd.loop, _settle, cmd.admitted, shape):
            self._abort(cmd.request_id)

    def _abort(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        req = self.engine.request(request_id)
        self.engine.abort(request_id)
        if live is None:
            return
        log.info("Aborted request %s.", request_id)
        out = _final_output(request_id, live.last, req, "abort")
        self._finished(live, out, time.monotonic())
        self._call(live.loop, live.outputs.put_nowait, out)  # ends an iterator still reading

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # One bad step must not take the server down: its requests fail, the rest goes on.
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(f"internal error in the engine step: {type(exc).__name__}: {exc}")
            if self.engine.has_unfinished_requests():
                time.sleep(0.1)  # requests the abort could not clear: fail slowly, not hot
            return
        now = time.monotonic()
        self._note_scheduled(start)
        preempted = self.engine.num_preemptions - self._preemptions
        self._preemptions = self.engine.num_preemptions
        last = self.engine.last_step
        if last is not None and last is not self._last_step:  # an empty schedule sets none
            self._last_step = last
            for metrics in self._metrics:
                metrics.on_step(last[0].tokens, preempted)
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            live.last = out
            event = token_event(live.times, out, now)
            if event is not None:
                self.throughput_log.on_tokens(event)
            for metrics in self._metrics:
                if event is not None:
                    metrics.on_tokens(event)
            if out.finished:
                del self._live[out.request_id]
                self._finished(live, out, now)
                if live.started is not None:
                    self._service_s = 0.8 * self._service_s + 0.2 * (now - live.started)
            if not self._call(live.loop, live.outputs.put_nowait, out) and not out.finished:
                self._abort(out.request_id)

    def _note_scheduled(self, step_start: float) -> None:
        """Queue time of the requests that ran for the first time in the step just taken."""
        for request_id, live in self._live.items():
            if live.times.scheduled:
                continue
            req = self.engine.request(request_id)
            if req is not None and req.running:
                live.times.scheduled = True
                live.times.scheduled_at = step_start
                live.started = step_start
                for metrics in self._metrics:
                    metrics.on_scheduled(req.spec.name, step_start - live.times.arrival)

    def _finished(self, live: _Live, out: RequestOutput, now: float) -> None:
        reason = out.outputs[0].finish_reason or "abort"
        for metrics in self._metrics:
            metrics.on_finished(out.narrowest_shape, reason, now - live.times.arrival)
            metrics.on_request_done(out.narrowest_shape, request_done(live.times, out, now))

    def _fail_all(self, message: str) -> None:
        """End every request in flight with an error output and free its blocks."""
        now = time.monotonic()
        for request_id, live in list(self._live.items()):
            req = self.engine.request(request_id)
            out = _final_output(request_id, live.last, req, "error", message)
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("could not abort %s after an engine error", request_id)
            self._finished(live, out, now)
            self._call(live.loop, live.outputs.put_nowait, out)
        self._live.clear()

    def _publish(self) -> None:
        self._stats = self.engine.stats()
        self.throughput_log.maybe_log(time.monotonic(), self._stats)
        running, waiting = self.engine.requests_by_shape()
        for metrics in self._metrics:
            metrics.set_load(running, waiting, self._stats.kv_usage)
            metrics.set_prefix_cache(
                self._stats.prefix_cache_queries, self._stats.prefix_cache_hits
            )

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
        """Run fn(*args) on `loop`; False when that loop has closed (its client is gone)."""
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return False
        return True


def _settle(future: asyncio.Future, result: object) -> None:
    if future.done():  # the caller was cancelled while waiting
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _final_output(
    request_id: str,
    last: RequestOutput | None,
    req: RequestSnapshot | None,
    reason: str,
    error: str | None = None,
) -> RequestOutput:
    """The finished output of a request cut short (abort or engine error), from what it had."""
    if last is not None:
        # nothing new since `last`: its text went out with it; every choice of an n > 1 request
        # is kept, a choice that had finished keeps its own reason
        choices = [
            dataclasses.replace(c, finish_reason=c.finish_reason or reason, text_delta="")
            for c in last.outputs
        ]
        return dataclasses.replace(last, outputs=choices, finished=True, error=error)
    shape = req.spec.name if req is not None else ""
    return RequestOutput(
        request_id=request_id,
        prompt=req.prompt if req is not None else None,
        prompt_token_ids=req.prompt_token_ids if req is not None else [],
        outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason=reason)],
        finished=True,
        shape=shape,
        narrowest_shape=shape,
        error=error,
    )


async def collect_final(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """The last output of a stream (None if it yielded nothing)."""
    last = None
    async for out in stream:
        last = out
    return last
