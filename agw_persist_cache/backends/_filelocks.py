"""Per-key cross-process locks in files, for the SQLite backend.

Linux: one lock file, and for each key an open-file-description (OFD) byte-range lock
at an offset taken from the key's digest (``F_OFD_SETLK``). Every acquisition opens
its own descriptor, so the lock also excludes other threads of the same process;
unrelated keys never wait for each other (distinct offsets); a process that dies
frees its locks at once (the kernel closes its descriptors). Elsewhere (no OFD locks)
the keys are striped over ``flock``-ed files: one key still gets one fetch, but keys
that share a stripe wait for each other.

A wait with a timeout cannot be expressed with a blocking ``fcntl``: a waiter thread
blocks in the kernel and hands the lock over when it is granted, so a waiter wakes
the moment the holder releases (no polling tick). If the caller gave up meanwhile,
the thread releases what it got. Lock files are never unlinked: that would split
the inode and break mutual exclusion.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .contract import LockResult

OFD_SUPPORTED = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLKW")

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: type, whence, start, len, pid
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

# Descriptors this process holds for key locks. A forked child closes its copies
# without unlocking: an explicit unlock would free the parent's lock.
_OPEN: set[int] = set()


def _forget_inherited() -> None:
    for fd in list(_OPEN):
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN.clear()


os.register_at_fork(after_in_child=_forget_inherited)


class _Target:
    """Where one key's lock lives and the two syscalls that take and drop it."""

    __slots__ = ("offset", "path")

    def __init__(self, path: Path, offset: int | None) -> None:
        self.path = path
        self.offset = offset  # None: flock the whole (stripe) file

    def open(self) -> int:
        fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        _OPEN.add(fd)
        return fd

    def lock(self, fd: int, *, block: bool, shared: bool = False) -> bool:
        """Take the lock on ``fd`` (``shared``: a read lock, which only waits for the
        holder); False if it is held elsewhere and ``block`` is off."""
        try:
            if self.offset is None:
                mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
                fcntl.flock(fd, mode | (0 if block else fcntl.LOCK_NB))
            else:
                cmd = fcntl.F_OFD_SETLKW if block else fcntl.F_OFD_SETLK
                kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
                fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, self.offset, 1, 0))
        except OSError as exc:
            if not block and exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        return True

    def unlock_and_close(self, fd: int) -> None:
        try:
            if self.offset is None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                fcntl.fcntl(
                    fd,
                    fcntl.F_OFD_SETLK,
                    _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, self.offset, 1, 0),
                )
        except OSError:
            pass  # closing below frees it as well (unless a forked child shares the fd)
        _close(fd)


def _close(fd: int) -> None:
    _OPEN.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


class _Waiter:
    """A thread blocked in the kernel until the holder lets go (a shared lock is granted).

    Every waiter of a key gets its shared lock at the same moment, drops it at once and
    reports LANDED: they all read the token the holder stored, none queues for the lock."""

    def __init__(self, target: _Target, fd: int) -> None:
        self.target = target
        self.fd = fd
        self.granted = False
        self.error: OSError | None = None
        self.done = threading.Event()
        self._mutex = threading.Lock()
        self._abandoned = False
        self._callbacks: list[Callable[[], None]] = []

    def start(self) -> None:
        threading.Thread(target=self._run, name="agw-cache-lock-wait", daemon=True).start()

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


class FileKeyLock:
    """One key's lock; the :class:`~.contract.KeyLock` of the SQLite backend."""

    __slots__ = ("_fd", "_target", "error")

    def __init__(self, target: _Target) -> None:
        self._target = target
        self._fd: int | None = None
        self.error: str | None = None

    def _begin(self, wait: float | None) -> LockResult | _Waiter:
        try:
            fd = self._target.open()
        except OSError as exc:
            self.error = f"cannot open lock file {self._target.path}: {_reason(exc)}"
            return LockResult.ERROR
        try:
            if self._target.lock(fd, block=False):
                self._fd = fd
                return LockResult.HELD
        except OSError as exc:
            _close(fd)
            self.error = f"cannot lock {self._target.path}: {_reason(exc)}"
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
            self.error = f"cannot lock {self._target.path}: {_reason(waiter.error)}"
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


def _reason(exc: OSError | None) -> str:
    if exc is None or exc.errno is None:
        return "unknown error"
    return f"{errno.errorcode.get(exc.errno, str(exc.errno))} ({os.strerror(exc.errno)})"


class KeyLockFiles:
    """The lock files of one store: ``keys.lock`` (OFD) or ``NNN.lock`` stripes (flock)."""

    def __init__(self, lock_dir: Path, *, stripes: int, ofd: bool = OFD_SUPPORTED) -> None:
        self.lock_dir = lock_dir
        self.stripes = stripes
        self.ofd = ofd
        self._keys_path = lock_dir / "keys.lock"

    def target(self, digest: bytes) -> _Target:
        if self.ofd:
            return _Target(self._keys_path, int.from_bytes(digest[:8], "big") >> 2)
        stripe = int.from_bytes(digest[:4], "big") % self.stripes
        return _Target(self.lock_dir / f"{stripe:03d}.lock", None)

    def key_lock(self, digest: bytes) -> FileKeyLock:
        return FileKeyLock(self.target(digest))
