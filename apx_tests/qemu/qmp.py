"""QMP for one machine: a synchronous client over an accepted socket (qemu.qmp's
QMPClient on a private event loop), every call bounded by a timeout."""

from __future__ import annotations

import socket

QMP_NICKNAME = "apx_tests"


class QmpConnection:
    """A synchronous QMP client over an accepted socket: qemu.qmp's QMPClient on a
    private event loop, every call bounded by a timeout (qemu.qmp.legacy has none for
    connect, and a QEMU that never greets would hang us)."""

    def __init__(self, sock: socket.socket, timeout: float):
        import asyncio

        from qemu.qmp import QMPClient

        _quiet_qmp_logging()
        self.timeout = timeout
        self._asyncio = asyncio
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(QMP_NICKNAME)
        self._run(self._client.connect(sock), "connect")

    def _run(self, coro, what: str, timeout: float | None = None):
        try:
            return self._loop.run_until_complete(self._asyncio.wait_for(coro, timeout or self.timeout))
        except self._asyncio.TimeoutError:
            raise QmpTimeout(f"no answer to QMP {what} within {timeout or self.timeout:g} s") from None

    def cmd(self, command: str, **args):
        return self._run(self._client.execute(command, args or None), command)

    def listen(self, *names: str):
        """A qemu.qmp EventListener for the events `names`, registered now: what QEMU sends
        from here on queues in it (while a call runs the loop) until forget(listener)."""
        from qemu.qmp import EventListener

        listener = EventListener(names)
        self._client.register_listener(listener)
        return listener

    def forget(self, listener) -> None:
        self._client.remove_listener(listener)

    def next_event(self, listener, timeout: float, wake_fd: int | None = None):
        """The listener's next event (a qemu.qmp Message); None if `wake_fd` turns readable
        first (QEMU's pidfd: it exited, and no event will come); QmpTimeout after `timeout`."""
        asyncio, loop = self._asyncio, self._loop

        async def wait():
            get = asyncio.ensure_future(listener.get())
            woke = loop.create_future()
            if wake_fd is not None:
                loop.add_reader(wake_fd, lambda: woke.done() or woke.set_result(None))
            try:
                done, _ = await asyncio.wait({get, woke}, return_when=asyncio.FIRST_COMPLETED)
                return get.result() if get in done else None
            finally:
                if wake_fd is not None:
                    loop.remove_reader(wake_fd)
                get.cancel()
                woke.cancel()

        return self._run(wait(), "event", timeout)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            # A close from a finalizer may run inside another connection's QMP call
            # (garbage collection happens anywhere): no event loop may run then.
            if self._asyncio._get_running_loop() is None:
                self._run(self._client.disconnect(), "disconnect", 2.0)
        except Exception:
            pass
        finally:
            self._loop.close()


class QmpTimeout(TimeoutError):
    pass


def _quiet_qmp_logging() -> None:
    """qemu.qmp logs connection failures at ERROR/CRITICAL with tracebacks; every one of
    them becomes a one-line QemuError here, so its loggers for our connections stay quiet."""
    import logging

    for module in ("qemu.qmp.protocol", "qemu.qmp.qmp_client"):
        logging.getLogger(f"{module}.{QMP_NICKNAME}").setLevel(logging.CRITICAL + 1)
