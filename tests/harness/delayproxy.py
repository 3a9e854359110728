"""A TCP proxy that delays every byte by a fixed time, each way (netem is not available).

Run as a script, usually inside a network namespace::

    python delayproxy.py --listen 127.0.0.1:2200 --to 10.231.1.2:2222 --delay 0.1 \
        --max-seconds 600

Each chunk read from one side is written to the other *delay* seconds after it was
read, in order, so a round trip costs 2 x delay, as on a long link.  The process ends by
itself after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(read()), asyncio.create_task(write())]
    try:
        await asyncio.gather(*tasks)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for t in tasks:
            t.cancel()


async def main(listen: tuple[str, int], to: tuple[str, int], delay: float,
               max_seconds: float) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*to)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(_pump(cr, uw, delay), _pump(ur, cw, delay))
        finally:
            for w in (cw, uw):
                with contextlib.suppress(Exception):
                    w.close()

    server = await asyncio.start_server(handle, *listen)
    async with server:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.serve_forever(), timeout=max_seconds)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--delay", type=float, default=0.1)
    ap.add_argument("--max-seconds", type=float, default=600)
    a = ap.parse_args()
    asyncio.run(main(_addr(a.listen), _addr(a.to), a.delay, a.max_seconds))
