"""A router's Decode streams to one worker group over one `DecodeMany` call (see the proto).

`DecodeMux.open(request)` starts a request on the group's shared call and returns its `MuxStream`, which
reads like the server stream of a `Decode` call: async iteration over its `TokenEvent`s, `cancel()`. One
reader task demultiplexes the call's messages by request id. When the call fails (the group died, was killed
or restarted) every open stream raises `GroupFailed`, as their own calls would have; the next `open` starts a
new call. A request the group refuses raises `ValueError` (a bad request) or `GroupFailed` on its stream only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from k2serve.proto import k2serve_pb2 as pb
from k2serve.proto import k2serve_pb2_grpc as pb_grpc


class GroupFailed(Exception):
    def __init__(self, group_id: str, detail: str) -> None:
        self.group_id = group_id
        super().__init__(f"worker group {group_id}: {detail}")


Item = pb.TokenEvent | BaseException


class DecodeMux:
    def __init__(self, stub: pb_grpc.WorkerGroupStub, group_id: str) -> None:
        self.stub = stub
        self.group_id = group_id
        self._call: grpc.aio.StreamStreamCall | None = None
        self._outbox: asyncio.Queue[pb.DecodeManyRequest] = asyncio.Queue()
        self._inboxes: dict[str, asyncio.Queue[Item]] = {}
        self._reader: asyncio.Task[None] | None = None

    def open(self, request: pb.DecodeRequest) -> MuxStream:
        return self.open_forked(request)[0]

    def open_forked(self, request: pb.DecodeRequest) -> list[MuxStream]:
        """The streams of the request and of its forks (its other choices), in that order."""
        ids = [request.request_id, *(f.request_id for f in request.forks)]
        if taken := [r for r in ids if r in self._inboxes]:
            raise ValueError(f"request {taken[0]!r} is already streaming from {self.group_id}")
        if self._call is None:
            self._start()
        streams = []
        for rid in ids:
            inbox: asyncio.Queue[Item] = asyncio.Queue()
            self._inboxes[rid] = inbox
            streams.append(MuxStream(self, rid, inbox))
        self._outbox.put_nowait(pb.DecodeManyRequest(decode=request))
        return streams

    def close_stream(self, request_id: str, *, cancel: bool) -> None:
        """Stops delivering `request_id`'s events; with `cancel`, tells the group to stop computing it."""
        if self._inboxes.pop(request_id, None) is not None and cancel and self._call is not None:
            self._outbox.put_nowait(pb.DecodeManyRequest(cancel=request_id))

    async def aclose(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    def _start(self) -> None:
        outbox = self._outbox = asyncio.Queue()  # a new call sends only its own requests

        async def requests() -> AsyncIterator[pb.DecodeManyRequest]:
            while True:
                yield await outbox.get()

        call = self._call = self.stub.DecodeMany(requests())
        self._reader = asyncio.get_running_loop().create_task(self._read(call), name=f"decode-many {self.group_id}")

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        detail = "the DecodeMany call ended"
        try:
            async for batch in call:
                for ev in batch.events:
                    inbox = self._inboxes.get(ev.request_id)
                    if inbox is not None:  # else: closed here already
                        inbox.put_nowait(ev)
                for err in batch.errors:
                    inbox = self._inboxes.pop(err.request_id, None)
                    if inbox is not None:
                        inbox.put_nowait(ValueError(err.detail) if err.code == "INVALID_ARGUMENT"
                                         else GroupFailed(self.group_id, f"{err.code}: {err.detail}"))
        except grpc.aio.AioRpcError as e:
            detail = f"{e.code().name}: {e.details()}"
        finally:
            if self._call is call:
                self._call = None
            for inbox in self._inboxes.values():
                inbox.put_nowait(GroupFailed(self.group_id, detail))
            self._inboxes.clear()


class MuxStream:
    """One request's events on a `DecodeMux`; ends after the event with a finish reason."""

    def __init__(self, mux: DecodeMux, request_id: str, inbox: asyncio.Queue[Item]) -> None:
        self.mux, self.request_id, self._inbox = mux, request_id, inbox
        self._done = False  # its last event or error was read
        self._cancelled = False

    def __aiter__(self) -> MuxStream:
        return self

    async def __anext__(self) -> pb.TokenEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason:
            self._done = True
            self.mux.close_stream(self.request_id, cancel=False)
        return item

    def cancel(self) -> None:
        """As `grpc.aio.Call.cancel()`: the group stops the request; a reader waiting here gets CancelledError."""
        if not self._done and not self._cancelled:
            self._cancelled = True
            self.mux.close_stream(self.request_id, cancel=True)
            while not self._inbox.empty():  # as on a cancelled call: the next read raises, undelivered events go
                self._inbox.get_nowait()
            self._inbox.put_nowait(asyncio.CancelledError())
