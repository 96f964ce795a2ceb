"""uvicorn's h11 protocol with two guards `moestream serve` needs:

- a deadline on reading a request's headers. uvicorn bounds idle keep-alive connections but not a
  client that opens a socket and sends its headers a byte at a time (slowloris): 300 such sockets
  were held 40 s and more. A connection whose request line and headers are not complete within
  `header_timeout` seconds of its start (or of the end of its previous response) is closed.
- a client's disconnect seen while its response is being made. Once a request's body is read,
  uvicorn stops reading the socket until the response is sent, so a client that gives up on a
  non-streamed request is not noticed and its completion runs to the end (240 of 240 tokens made
  after a 1 s client timeout). Reading is resumed once per request, so the end of the connection
  arrives as `http.disconnect` and the request leaves the batch; a client that sends more meanwhile
  (pipelining) is paused again after one read."""
from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: seconds a client has to send a whole request line and headers
HEADER_TIMEOUT = 10.0


class GuardedProtocol(H11Protocol):
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport) -> None:   # type: ignore[override]
        super().connection_made(transport)
        self._watched = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:     # the headers are in
            self._disarm()

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if (cycle is not None and cycle is not self._watched and not cycle.response_complete
                and self.conn.their_state is h11.DONE and not self.transport.is_closing()):
            self._watched = cycle
            self.flow.resume_reading()    # to see the client's EOF while the response is made

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
