"""Storage engine: read backends, aligned buffer pool, tiered expert cache, the Store."""
from .backends import KvikioBackend, PosixBackend, ReadBackend, ReadRequest, UringBackend, choose_backend
from .buffers import BufferPool
from .cache import TierCache
from .store import Store, open

__all__ = ["BufferPool", "KvikioBackend", "PosixBackend", "ReadBackend", "ReadRequest", "Store", "TierCache",
           "UringBackend", "choose_backend", "open"]
