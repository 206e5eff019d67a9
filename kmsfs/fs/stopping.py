"""Stopping a mount: what SIGTERM, SIGINT and SIGHUP do to a serving daemon.

The first SIGTERM or SIGINT unmounts as umount(8) would, the loop serving meanwhile; a busy
mount is detached and served until its last user is gone; a second one stops at once. Only the
daemon's own mount is ever unmounted by path (:func:`not_ours`). SIGHUP reopens the log file.
:func:`kmsfs.fs.daemon.serve` runs :func:`watch_signals` beside the request loop.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

import pyfuse3
import trio

from kmsfs.fs import fusermount, sdnotify
from kmsfs.fs.daemonlog import reopen_log_files

log = logging.getLogger(__name__)


#: What stops a mount (and calls off one that is not ready yet: :func:`daemonize`).
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Stop:
    """What stop requests (SIGTERM, SIGINT) have done to the mount at *mountpoint* so far."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.requested = False
        #: The daemon has unmounted or detached the mount itself, or found another mount on
        #: top at its path (:attr:`foreign`): the path is no longer its to unmount.
        self.released = False
        #: What was found at the path instead of this mount, if so (:func:`not_ours`).
        self.foreign: str | None = None
        #: The daemon stopped the loop itself (pyfuse3.terminate).
        self.terminated = False
        #: The kernel ended the session: the mount is gone, here and in every namespace.
        self.ended = False
        #: The mount's (major, minor), once the loop has seen it answer; set with
        #: :attr:`device_known` (made in the loop).
        self.device: tuple[int, int] | None = None
        self.device_known: trio.Event | None = None
        #: A SIGHUP came while the loop did not watch for it.
        self.hup = False
        #: SIGTERMs and SIGINTs that came after the mount was made, before the loop watched.
        self.early: list[int] = []

    def note_hup(self, signum: int, frame: object) -> None:
        self.hup = True  # only a flag: the main thread may be inside a log handler's lock

    def note_stop(self, signum: int, frame: object) -> None:
        self.early.append(signum)  # the loop acts on it once it watches (watch_signals)

    def terminate(self) -> None:
        """Stop serving at once."""
        self.terminated = True
        pyfuse3.terminate()


async def watch_signals(stop: Stop) -> None:
    """Stop requests and SIGHUP, while the loop serves.

    The first SIGTERM or SIGINT (``systemctl stop``, Ctrl-C) unmounts as umount(8) would
    (:func:`_unmount_gracefully`); a mount still in use is detached and served until the last
    file open in it is closed. A second one stops at once, files still open in the mount or
    not. SIGHUP opens the log file again (:func:`reopen_log_files`). Those that came before
    the loop watched (:meth:`Stop.note_stop`, :meth:`Stop.note_hup`) are acted on first.
    """
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        if stop.hup:  # before the loop watched
            stop.hup = False
            reopen_log_files()
        async with trio.open_nursery() as nursery:

            def on_stop_request(signum: int) -> bool:
                """False once the daemon stops at once."""
                name = signal.Signals(signum).name
                if not stop.requested:
                    stop.requested = True
                    log.info("%s: unmounting %s", name, stop.mountpoint)
                    sdnotify.notify("STOPPING=1")
                    nursery.start_soon(_unmount_gracefully, stop)
                    return True
                log.warning(
                    "%s again: stopping at once; files still open in %s lose their mount",
                    name, stop.mountpoint,
                )
                stop.terminate()
                nursery.cancel_scope.cancel()
                return False

            early, stop.early = stop.early, []  # no more come: the receiver has them now
            for signum in early:
                if not on_stop_request(signum):
                    return
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reopen_log_files()
                elif not on_stop_request(signum):
                    return


#: How long the session may take to end after the mount was unmounted here before the daemon
#: says that it is still mounted elsewhere.
SESSION_END_SECONDS = 2.0


async def _unmount_gracefully(stop: Stop) -> None:
    """Unmount as umount(8) would, the loop serving meanwhile; if the mount is busy, detach it
    and serve on until the kernel ends the session, when the last file open in it and the last
    working directory in it are gone (pyfuse3.main then returns). Closing /dev/fuse instead
    would fail every call of the processes still using it (ENOTCONN) and lose what a writeback
    cache holds for them.

    Only this daemon's mount is unmounted (:func:`not_ours`): another file system mounted
    over it, or another mount at its path once it was detached or replaced by someone else, is
    left alone, and the daemon serves until its session ends. This task is cancelled when the
    session ends."""
    mountpoint = stop.mountpoint
    assert stop.device_known is not None
    await stop.device_known.wait()  # the readiness check (_main) has seen the mount answer
    # In a worker thread: the unmount makes requests of its own (writing cached pages back),
    # which this loop must answer. Abandoned if the session ends first.
    done, why = await trio.to_thread.run_sync(_fusermount_ours, stop, False, abandon_on_cancel=True)
    if done:
        stop.released = True  # the kernel ends the session, unless the mount is held elsewhere
        await trio.sleep(SESSION_END_SECONDS)
        log.warning(
            "%s: unmounted here, but still mounted elsewhere (another mount namespace?): "
            "serving until it is released; a second SIGTERM or SIGINT stops at once",
            mountpoint,
        )
        sdnotify.notify(f"STATUS=unmounted {mountpoint} here, serving its mounts elsewhere")
        return
    if stop.foreign is None and fusermount.busy(why):
        log.warning(
            "%s is busy: detaching it; serving until the last file open in it and the last "
            "working directory in it are gone (a second SIGTERM or SIGINT stops at once)",
            mountpoint,
        )
        done, why = await trio.to_thread.run_sync(
            _fusermount_ours, stop, True, abandon_on_cancel=True
        )
        if done:
            stop.released = True
            sdnotify.notify(f"STATUS=detached {mountpoint}, serving the files still open in it")
            return
    if stop.foreign is not None:
        stop.released = True  # nor may serve's clean-up unmount that path
        log.warning(
            "%s: not unmounted: %s; serving until this mount's session ends (a second SIGTERM "
            "or SIGINT stops at once)", mountpoint, stop.foreign,
        )
        sdnotify.notify(f"STATUS=not unmounting {mountpoint}: {stop.foreign}; serving on")
        return
    log.warning("%s: cannot unmount (%s): stopping at once", mountpoint, why)
    stop.terminate()


def _fusermount_ours(stop: Stop, lazy: bool) -> tuple[bool, str]:
    """:func:`fusermount.unmount`, if the mount on top at the path is still this daemon's; else
    nothing, and :attr:`Stop.foreign` says what is there."""
    assert stop.device is not None
    stop.foreign = not_ours(stop.mountpoint, stop.device)
    if stop.foreign is not None:
        return False, stop.foreign
    return fusermount.unmount(stop.mountpoint, lazy)


def not_ours(
    mountpoint: Path, device: tuple[int, int], mountinfo: str = "/proc/self/mountinfo"
) -> str | None:
    """None if the mount on top at *mountpoint* (the last one there in *mountinfo*) is this
    daemon's: its *device*, the root of a FUSE file system; else what is there instead.
    fusermount3 and libfuse unmount by path whatever is on top (root may unmount any file
    system), as ``kmsfs umount`` refuses to. None too if the list cannot be read."""
    absolute = os.path.abspath(mountpoint)
    where = os.fsencode(
        os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    )
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        log.debug("cannot read %s: %s", mountinfo, exc)
        return None
    top = None
    for line in lines:
        # ID, parent ID, major:minor, root, mount point, options, optional fields..., "-",
        # type, source, super options; names with octal escapes (\040 for a space)
        fields = line.split(b" ")
        if b"-" not in fields[6:]:
            continue
        sep = fields.index(b"-", 6)
        if len(fields) >= sep + 3 and _unescape(fields[4]) == where:
            top = fields[2], fields[3], fields[sep + 1], _unescape(fields[sep + 2])
    if top is None:
        return "nothing is mounted there now (the mount was detached)"
    dev, root, kind, source = (os.fsdecode(field) for field in top)
    fuse = kind == "fuse" or kind.startswith("fuse.")
    if fuse and dev == f"{device[0]}:{device[1]}":
        return None if root == "/" else f"a bind mount of its {root} is on top"
    if fuse:
        return (
            f"another FUSE mount is there ({kind} from {source}, device {dev}): "
            "this one was detached or replaced"
        )
    return f"{kind} from {source} is mounted over it"


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
