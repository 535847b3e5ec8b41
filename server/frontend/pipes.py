"""The front end's end of the two ZeroMQ pipes to the engine core, bound before the core starts.

`inputs` (front end -> core, PUSH) and `outputs` (core -> front end, PULL). For a core in its
own process they are ipc:// sockets in a private (0700) temporary folder, so nothing listens
on a network interface; for a core on a thread of this process they are inproc:// pipes of
one shared context (inproc needs it). Everything else is the same.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile

import zmq
import zmq.asyncio

from ..core.host import CoreEndpoints

_names = itertools.count()


class CorePipes:
    def __init__(self, in_process: bool) -> None:
        self.in_process = in_process
        self.ctx = zmq.Context()
        self._folder: str | None = None
        if in_process:
            name = f"epserve-{os.getpid()}-{next(_names)}"
            self.endpoints = CoreEndpoints(inputs=f"inproc://{name}-in", outputs=f"inproc://{name}-out")
        else:
            self._folder = tempfile.mkdtemp(prefix="epserve-")  # mode 0700
            os.chmod(self._folder, 0o700)
            self.endpoints = CoreEndpoints(inputs=f"ipc://{self._folder}/in", outputs=f"ipc://{self._folder}/out")
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(self.endpoints.outputs)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind(self.endpoints.inputs)
        self._reader: zmq.asyncio.Socket | None = None

    @property
    def reader(self) -> zmq.asyncio.Socket:
        """The outputs socket for an event loop (it follows whichever loop uses it)."""
        if self._reader is None:
            self._reader = zmq.asyncio.Socket.from_socket(self.pull)
        return self._reader

    def close_outputs(self) -> None:
        """From the loop that reads them (or with no loop running)."""
        if self._reader is not None:
            self._reader.close(linger=0)
        self.pull.close(linger=0)

    def close(self, term: bool = True) -> None:
        """Close this end; `term` also ends the context (only once the core's sockets are
        closed: an inproc core still holding one would block it)."""
        self.close_outputs()
        self.push.close(linger=0)
        if term:
            self.ctx.term()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
