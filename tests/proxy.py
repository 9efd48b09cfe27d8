"""A loopback TCP proxy that a test can cut: every connection through it is closed at once, as a
phone changing networks or a load balancer's idle timeout does, while new ones still get through."""

from __future__ import annotations

import socket
import threading

IDLE_SECONDS = 30.0  # a connection silent this long in both directions is dropped


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.requests: list[bytes] = []  # the first bytes each connection sent: its request head, as a rule
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for end in (client, server):
                end.settimeout(IDLE_SECONDS)
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool = False) -> None:
        try:
            while data := source.recv(65536):
                if from_client:
                    self.requests.append(data)
                    from_client = False
                sink.sendall(data)
        except OSError:
            pass
        self._close(source, sink)

    def _close(self, *ends: socket.socket) -> None:
        for end in ends:
            with self._lock:
                self._open.discard(end)
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def cut(self) -> int:
        """Close every open connection (both sides); returns how many sockets were closed."""
        with self._lock:
            ends = list(self._open)
        self._close(*ends)
        return len(ends)

    def close(self) -> None:
        self._listener.close()
        self.cut()
