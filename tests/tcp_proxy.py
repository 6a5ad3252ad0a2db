"""A small TCP proxy for the tests: toxiproxy cannot be installed here and `tc netem` is not available.

It forwards 127.0.0.1:<port> to a target, and can add latency to every chunk, or cut every
connection and refuse new ones for a while (a network partition between producer and broker).
"""

from __future__ import annotations

import asyncio
import threading

from runwatch.core.net import free_port


class TcpProxy:
    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self.latency = 0.0
        self.cut = False
        self._writers: set = set()
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        if self.cut:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}

        async def pipe(src, dst):
            try:
                while not self.cut:
                    data = await src.read(65536)
                    if not data:
                        break
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def set_cut(self, cut: bool) -> None:
        """Cut: every open connection is closed and new ones are refused until set_cut(False)."""
        def apply():
            self.cut = cut
            if cut:
                for w in list(self._writers):
                    w.close()
                self._writers.clear()
        self._loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        def stop():
            self._server.close()
            self._loop.stop()
        self._loop.call_soon_threadsafe(stop)
