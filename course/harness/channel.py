"""Frames on the result pipe between a grading step and the grader (standard library only).

A frame is ``SWG1 <header bytes> <payload bytes>\\n`` then a JSON header (an
object) and a binary payload. Anything in the worker process can write to the
pipe, so the grader treats every frame from the worker as a claim to check;
what it cannot do is take back a frame already written, or make bytes that do
not parse look like frames: the parser stops at the first malformed frame and
says where, which the grader reports as tampering with the channel.
"""

from __future__ import annotations

import json
import os

MAGIC = b"SWG1"
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 256 << 20


def frame(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"%s %d %d\n" % (MAGIC, len(h), len(payload)) + h + payload


class Writer:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, header: dict, payload: bytes = b"") -> None:
        data = memoryview(frame(header, payload))
        while data:  # a pipe may take a large frame in pieces
            data = data[os.write(self.fd, data) :]


class Parser:
    """Incremental: ``feed(bytes)`` returns the complete frames so far; ``error`` names the first malformed data.

    After malformed data it skips to the next frame start, so that what the harness
    sends later (a detection, say) still arrives; ``finish()`` at end of stream does
    the same for a frame that claimed more bytes than ever came."""

    def __init__(self):
        self.buf = bytearray()
        self.error = ""
        self.count = 0

    def feed(self, data: bytes) -> list[tuple[dict, bytes]]:
        self.buf += data
        out = []
        while self.buf:
            nl = self.buf.find(b"\n", 0, 64)
            if nl < 0:
                if len(self.buf) >= 64:
                    self._skip("no frame start")
                    continue
                return out
            parts = bytes(self.buf[:nl]).split(b" ")
            if len(parts) != 3 or parts[0] != MAGIC or not parts[1].isdigit() or not parts[2].isdigit():
                self._skip("bad frame start")
                continue
            hlen, plen = int(parts[1]), int(parts[2])
            if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
                self._skip("frame too large")
                continue
            end = nl + 1 + hlen + plen
            if len(self.buf) < end:
                return out
            try:
                header = json.loads(bytes(self.buf[nl + 1 : nl + 1 + hlen]))
            except ValueError:
                header = None
            if not isinstance(header, dict):
                self._skip("header is not a JSON object")
                continue
            out.append((header, bytes(self.buf[nl + 1 + hlen : end])))
            del self.buf[:end]
            self.count += 1
        return out

    def finish(self) -> list[tuple[dict, bytes]]:
        """End of stream: a frame still waiting for its bytes was a lie; parse what follows its start."""
        out = []
        while self.buf:
            self._skip("truncated frame")
            out += self.feed(b"")
        return out

    def _skip(self, why: str) -> None:
        self.error = self.error or f"malformed data on the result channel after frame {self.count}: {why}"
        nxt = self.buf.find(MAGIC + b" ", 1)
        del self.buf[: nxt if nxt > 0 else len(self.buf)]
