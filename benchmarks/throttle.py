"""A TCP proxy with a bandwidth limit, shared by all its connections: an object store (moto on
127.0.0.1) made as slow as a store whose bandwidth many hosts share.

    python benchmarks/throttle.py LISTEN_PORT TARGET_PORT MB_PER_S

Bytes in both directions draw on one token bucket of MB_PER_S (10^6 bytes per second; a burst
of at most 1/20 s of it), so the limit is the store's: 4 processes reading at once get a
quarter each.
"""

from __future__ import annotations

import asyncio
import sys
import time

PIECE = 64 << 10


class Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = rate / 20
        self.tokens = self.burst
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:  # first come, first served
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: Bucket):
    try:
        while data := await reader.read(PIECE):
            await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(listen: int, target: int, mb_per_s: float) -> None:
    bucket = Bucket(mb_per_s * 1e6)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer, bucket), pipe(up_reader, writer, bucket))

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
