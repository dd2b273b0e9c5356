#!/usr/bin/env python3
"""A TCP proxy that holds each request for DELAY_MS before passing it on, as a store that
far away would: `delay-proxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS`. Bytes from
the client wait DELAY_MS (one round trip, as the time a request and its answer spend on
the way); the answers come back at once. Listens on 127.0.0.1 only. Prints a line
`connection N` on stdout for each connection it accepts, so a caller can count the
connections a client opened. Used by scripts/bench-prefetch.sh."""
import asyncio
import sys


async def pipe(reader, writer, delay):
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    port, target, delay_ms = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, tport = target.rsplit(":", 1)

    accepted = 0

    async def handle(cr, cw):
        nonlocal accepted
        accepted += 1
        print(f"connection {accepted}", flush=True)
        sr, sw = await asyncio.open_connection(host, int(tport))
        await asyncio.gather(pipe(cr, sw, delay_ms / 1000), pipe(sr, cw, 0))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
