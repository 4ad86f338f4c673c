"""A TCP proxy on loopback in front of the S3 server, that can pass, refuse or stall connections.

proxy = FaultProxy(("127.0.0.1", s3_port)).start()
proxy.mode = "stall"     # accept, read, never answer: an endpoint that hangs
proxy.mode = "refuse"    # accept and close at once: an endpoint that is down
proxy.mode = "pass"      # forward both ways
proxy.mode = "cut"       # forward, but end a connection once it has answered ``cut_after``
                         # bytes, ``cuts`` times (a response cut mid-body), then pass
"""

from __future__ import annotations

import socket
import threading


class FaultProxy:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.mode = "pass"
        self.cut_after, self.cuts = 0, 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._closed = False

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._open.append(client)
            if self.mode == "refuse":
                client.close()
            elif self.mode == "stall":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
            else:
                upstream = socket.create_connection(self.target)
                self._open.append(upstream)
                limit = self.cut_after if self.mode == "cut" else None
                threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
                threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _swallow(client: socket.socket) -> None:
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None = None) -> None:
        try:
            while data := source.recv(65536):
                if limit is not None and self.cuts > 0 and len(data) >= limit:
                    self.cuts -= 1
                    sink.sendall(data[:limit])
                    break
                if limit is not None:
                    limit -= len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._server.close()
        for s in self._open:
            try:
                s.close()
            except OSError:
                pass
