"""The Linux fast path of the per-key lock: open-file-description (OFD) byte-range locks.

One lock file, ``keys.lock``, and for each key a one-byte ``F_OFD_SETLK`` lock at an offset
taken from the key's digest. Every acquisition opens its own descriptor, so the lock also
excludes other threads of the same process; unrelated keys never wait for each other
(distinct offsets) and there is one file however many keys there are; a process that dies
frees its locks at once (the kernel closes its descriptors).

A wait with a timeout cannot be expressed with a blocking ``fcntl``: a waiter thread
blocks in the kernel on a *shared* lock (granted the moment the holder lets go, to every
waiter at once) and hands the outcome over, so a waiter wakes without a polling tick. If
the caller gave up meanwhile, the thread releases what it got.

The module imports everywhere (``fcntl`` or not); :data:`SUPPORTED` says whether its locks
work here, and ``_filelocks`` uses them only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .. import _fork
from .contract import LockResult

try:
    import fcntl
except ImportError:  # Windows
    SUPPORTED = False
else:
    SUPPORTED = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLKW")

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: type, whence, start, len, pid

# Descriptors this process holds for key locks. A forked child closes its copies
# without unlocking: an explicit unlock would free the parent's lock.
_OPEN: set[int] = set()


def _forget_inherited() -> None:
    for fd in list(_OPEN):
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN.clear()


if SUPPORTED:
    _fork.in_child(_forget_inherited)


class _Range:
    """One key's byte in ``keys.lock`` and the two calls that take and drop its lock."""

    __slots__ = ("offset", "path")

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset

    def open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        _OPEN.add(fd)
        return fd

    def lock(self, fd: int, *, block: bool, shared: bool = False) -> bool:
        """Take the lock on ``fd`` (``shared``: a read lock, which only waits for the
        holder); False if it is held elsewhere and ``block`` is off."""
        cmd = fcntl.F_OFD_SETLKW if block else fcntl.F_OFD_SETLK
        kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
        try:
            fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, self.offset, 1, 0))
        except OSError as exc:
            if not block and exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        return True

    def unlock_and_close(self, fd: int) -> None:
        unlock = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, self.offset, 1, 0)
        with contextlib.suppress(OSError):  # closing below frees it as well
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, unlock)
        _close(fd)


def _close(fd: int) -> None:
    _OPEN.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


class _Waiter:
    """A thread blocked in the kernel until the holder lets go (a shared lock is granted).

    Every waiter of a key gets its shared lock at the same moment, drops it at once and
    reports LANDED: they all read the token the holder stored, none queues for the lock."""

    def __init__(self, target: _Range, fd: int) -> None:
        self.target = target
        self.fd = fd
        self.granted = False
        self.error: OSError | None = None
        self.done = threading.Event()
        self._mutex = threading.Lock()
        self._abandoned = False
        self._callbacks: list[Callable[[], None]] = []

    def start(self) -> None:
        _fork.start_thread("agw-cache-lock-wait", self._run)

    def _run(self) -> None:
        try:
            self.target.lock(self.fd, block=True, shared=True)
        except OSError as exc:
            self.error = exc
        else:
            self.target.unlock_and_close(self.fd)
        with self._mutex:
            if self.error is not None:
                _close(self.fd)
            if self._abandoned:  # the caller gave up meanwhile: nothing left to hand over
                return
            self.granted = self.error is None
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_done(self, callback: Callable[[], None]) -> None:
        with self._mutex:
            if not self.done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def settle(self) -> LockResult:
        """The outcome now; if still waiting, give up (the thread cleans up later)."""
        with self._mutex:
            if self.done.is_set():
                return LockResult.LANDED if self.granted else LockResult.ERROR
            self._abandoned = True
            return LockResult.TIMEOUT


class OfdKeyLock:
    """One key's lock on the OFD path; a :class:`~.contract.KeyLock`."""

    __slots__ = ("_fd", "_target", "error")

    def __init__(self, path: Path, digest: bytes) -> None:
        self._target = _Range(path, int.from_bytes(digest[:8], "big") >> 2)
        self._fd: int | None = None
        self.error: str | None = None

    def _begin(self, wait: float | None) -> LockResult | _Waiter:
        try:
            fd = self._target.open()
        except OSError as exc:
            self.error = f"cannot open lock file {self._target.path}: {reason(exc)}"
            return LockResult.ERROR
        try:
            if self._target.lock(fd, block=False):
                self._fd = fd
                return LockResult.HELD
        except OSError as exc:
            _close(fd)
            self.error = f"cannot lock {self._target.path}: {reason(exc)}"
            return LockResult.ERROR
        if wait is None or wait <= 0:
            _close(fd)
            return LockResult.BUSY if wait is None else LockResult.TIMEOUT
        waiter = _Waiter(self._target, fd)
        waiter.start()
        return waiter

    def _end(self, waiter: _Waiter) -> LockResult:
        result = waiter.settle()
        if result is LockResult.ERROR:
            self.error = f"cannot lock {self._target.path}: {reason(waiter.error)}"
        return result

    def acquire(self, wait: float | None) -> LockResult:
        begun = self._begin(wait)
        if isinstance(begun, LockResult):
            return begun
        begun.done.wait(wait)
        return self._end(begun)

    async def aacquire(self, wait: float | None) -> LockResult:
        begun = self._begin(wait)
        if isinstance(begun, LockResult):
            return begun
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:
            # RuntimeError: the loop closed while we waited; settle() cleans up.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, woken)

        begun.on_done(wake)
        try:
            await asyncio.wait_for(asyncio.shield(woken), wait)
        except TimeoutError:
            pass
        except BaseException:  # cancelled: the waiter thread cleans up by itself
            self._end(begun)
            raise
        return self._end(begun)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._target.unlock_and_close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def reason(exc: OSError | None) -> str:
    """An OS error as ``ENAME (text)``: never a path or anything else it may carry."""
    if exc is None or exc.errno is None:
        return "unknown error"
    return f"{errno.errorcode.get(exc.errno, str(exc.errno))} ({os.strerror(exc.errno)})"
