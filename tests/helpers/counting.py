"""Counting the bytes asyncckpt reads from chunk files, at the system call it uses (preadv)."""

import os


def count_chunk_reads() -> tuple[dict, object]:
    """Start counting; returns (counter with a "bytes" entry, a function that stops counting)."""
    real = os.preadv
    counter = {"bytes": 0}

    def counting(fd, buffers, offset):
        n = real(fd, buffers, offset)
        counter["bytes"] += n
        return n

    os.preadv = counting

    def stop() -> None:
        os.preadv = real

    return counter, stop
