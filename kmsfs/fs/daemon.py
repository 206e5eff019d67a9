"""Serving a mount: FUSE options, the trio main loop, readiness and clean unmount on signals.

:func:`serve` is the one entry point: it takes any :class:`~kmsfs.keys.KeyDeriver`, so the
product CLI passes the HSM-backed deriver from ``kmsfs.api.open_domain`` and the tests pass a
software stand-in. :func:`daemonize` forks a child that mounts and reports ``ready`` (or one
error line) through a pipe, so ``kmsfs mount`` returns only once the mount is usable. What
signals do to a serving daemon is :mod:`kmsfs.fs.stopping`; where it logs,
:mod:`kmsfs.fs.daemonlog`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import logging.handlers
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from kmsfs import exitcodes
from kmsfs.cliutil import Terminated, raise_terminated
from kmsfs.errors import KmsfsError, UsageError
from kmsfs.fs import sdnotify
from kmsfs.fs.heap import keep_freed_buffers
from kmsfs.fs.killpriv import InitAmendment, libfuse_needs_it
from kmsfs.fs.latency import HOLD_SECONDS, CpuLatencyRequest, unavailable_reason
from kmsfs.fs.readahead import raise_readahead
from kmsfs.fs.stopping import STOP_SIGNALS, Stop, not_ours, watch_signals
from kmsfs.keys import KeyDeriver

log = logging.getLogger(__name__)

#: How long a worker polls /dev/fuse for the next request before it sleeps (see _SpinThenWait).
SPIN_SECONDS = 200e-6
#: A stream of requests found by polling still yields to trio at least this often.
CHECKPOINT_SECONDS = 1e-3

#: Options kmsfs always sets.
BASE_OPTIONS = frozenset({"fsname=kmsfs", "subtype=kmsfs"})
#: Set whenever allow_other is: other users then get the kernel's permission checks, exactly
#: as on ext4 (the daemon runs as root for all of them). Without allow_other the kernel lets
#: only the mounting user's processes in at all, and the daemon acts with that user's own
#: rights on the ciphertext, so the checks would only cost a GETATTR of the parent directory
#: before each create, unlink, mkdir or rmdir (a directory's attributes are invalidated by
#: every change to it): 25-35% of those calls' time, measured. gocryptfs does the same. Exec
#: of a file with no x bit is still refused by the kernel, and access(2) is answered by the
#: ``access`` handler. ``-o default_permissions`` turns the checks on regardless.
DEFAULT_PERMISSIONS = "default_permissions"
#: kmsfs's own option, not the kernel's: let the kernel cache writes (FUSE writeback cache).
#: Faster for small and random writes; the one difference from ext4 we know of is that a
#: truncate to the *same* size does not move mtime/ctime (POSIX allows that). Off by default.
WRITEBACK_CACHE = "writeback_cache"
#: kmsfs's own option: hold a CPU wake-up latency request while busy (:mod:`kmsfs.fs.latency`).
LOW_LATENCY = "low_latency"
#: Access-time options the libfuse 3.14 of Debian 12 does not know (it refuses to mount with
#: them): kmsfs applies them itself. relatime is what a FUSE mount does anyway; nodiratime keeps
#: listings from moving a directory's atime (noatime, which libfuse passes on, covers files
#: too).
ATIME_OPTIONS = frozenset({"relatime", "nodiratime"})
#: Options kmsfs handles itself and does not pass to the kernel.
OWN_OPTIONS = frozenset({WRITEBACK_CACHE, LOW_LATENCY, *ATIME_OPTIONS})
#: kmsfs's own option with a value, ``domain=NAME``: the Domain the volume must use (``kmsfs
#: mount --domain``, the form for /etc/fstab). The command takes it out (:func:`split_domain`)
#: before :func:`mount_options`, which refuses it like any option it does not know, so it
#: never reaches the kernel.
DOMAIN_OPTION = "domain"
#: Options a user may pass with -o (names, or name= prefixes).
ALLOWED_OPTIONS = frozenset(
    {
        "allow_other",
        DEFAULT_PERMISSIONS,
        "ro",
        "rw",
        "noatime",
        "nodiratime",
        "relatime",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "sync",
        "async",
        "dirsync",
        *OWN_OPTIONS,
    }
)
ALLOWED_PREFIXES = ("fsname=", "subtype=", "max_read=")


def _each_option(extra: Iterable[str]) -> Iterator[str]:
    """The options of -o arguments (each comma-separated), one by one."""
    for item in extra:
        yield from filter(None, (o.strip() for o in item.split(",")))


def split_domain(extra: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the NAMEs of every ``domain=NAME``, every other option) of -o arguments."""
    domains, rest = [], []
    for opt in _each_option(extra):
        key, sep, value = opt.partition("=")
        if key == DOMAIN_OPTION and sep:
            domains.append(value)
        else:
            rest.append(opt)
    return domains, rest


def mount_options(extra: Iterable[str], cipherdir: Path | None = None) -> set[str]:
    """BASE_OPTIONS plus the user's -o options (and default_permissions with allow_other);
    UsageError for one we do not pass through. With *cipherdir*, the mount's source (fsname)
    is that directory unless ``-o fsname=`` says otherwise (:func:`source_name`)."""
    opts = set(BASE_OPTIONS)
    if cipherdir is not None and (source := source_name(cipherdir)) is not None:
        opts = {o for o in opts if not o.startswith("fsname=")} | {f"fsname={source}"}
    for opt in _each_option(extra):
        if opt not in ALLOWED_OPTIONS and not opt.startswith(ALLOWED_PREFIXES):
            raise UsageError(f"unsupported mount option {opt!r}")
        _check_value(opt)
        if opt.startswith(("fsname=", "subtype=")):
            key = opt.split("=", 1)[0] + "="
            opts = {o for o in opts if not o.startswith(key)}
        opts.add(opt)
    if "rw" in opts and "ro" in opts:
        raise UsageError("mount options 'ro' and 'rw' conflict")
    opts.discard("rw")
    if "allow_other" in opts:
        opts.add(DEFAULT_PERMISSIONS)
    return opts


def source_name(cipherdir: Path) -> str | None:
    """The ciphertext directory as the mount's source, as mount(8) and findmnt show it, or
    None where libfuse cannot take it (pyfuse3 passes options as ASCII; a comma or backslash
    would be read as an option separator or escape): the source is then ``kmsfs``.

    The source is what ``mount -a`` compares with /etc/fstab: with ``kmsfs`` a second
    ``mount -a`` tried the line again and failed, "already a mount point" (exit 32), where
    every other file system's line is skipped as mounted (found by review). It also lets
    ``kmsfs reencrypt`` see the volume mounted (:func:`kmsfs.fs.volume.mounted_from`)."""
    source = os.path.realpath(cipherdir)
    if not source.isascii() or not source.isprintable() or "," in source or "\\" in source:
        return None
    return source


def _check_value(opt: str) -> None:
    """A value libfuse would refuse only after the fork and the HSM unwrap, as two lines and
    exit 1 ("fuse: invalid parameter", "fuse_session_new() failed"): refused here, as usage."""
    key, _, value = opt.partition("=")
    if key in ("fsname", "subtype") and (not value or "," in value):
        raise UsageError(f"mount option {key}= needs a value")
    if key == "max_read" and not (value.isdigit() and 4096 <= int(value) <= 2**31):
        raise UsageError(f"mount option max_read={value}: want a byte count of 4096 or more")


NR_OPEN = "/proc/sys/fs/nr_open"


def raise_open_file_limit() -> None:
    """Let the daemon open as many files as the kernel allows a process: it holds an fd for
    every open file of the mount, for every user, and the soft limit systemd and most shells
    give (1,024) is one a single process's opens can use up, failing every open on the mount.

    A daemon that may (root: CAP_SYS_RESOURCE) raises its hard limit too, to the kernel's
    ``fs.nr_open``: with ``allow_other``, two users holding 10,000 files open each used up a
    hard limit of 20,000 and every other open on the mount failed with EMFILE, where ext4 gives
    each process its own limit. Others go up to their hard limit."""
    with contextlib.suppress(OSError, ValueError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return
        try:
            with open(NR_OPEN, "rb") as f:
                ceiling = int(f.read(32))
            if ceiling > hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
                return
        except (OSError, ValueError):  # not allowed (not root), or no such file
            pass
        if hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: How many new container objects wait for a young-generation collection while serving
#: (CPython's default: 700).
GC_YOUNG_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Hide what start-up built from the cyclic collector, and run it less often.

    Reference counting frees nearly everything a request allocates; the collector only looks
    for cycles, yet it walked every object the daemon holds. Measured during ``tar -x`` of
    5,000 files on tmpfs: 19-38 young, 1-4 middle and up to one full collection (20 ms over
    48k objects) took 10-26 ms of the daemon's time. After :func:`gc.freeze` the modules, the
    Domain and other start-up objects are never walked again, and with this threshold one
    young collection ran over that tar, ``ls -lR``, reading every file back and ``rm -rf``.
    Cyclic garbage waits longer: some 20,000 objects at most, a few MB.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


def serve(
    cipherdir: Path,
    mountpoint: Path,
    deriver: KeyDeriver,
    options: set[str],
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount *cipherdir* at *mountpoint* and serve until unmounted, or stopped by SIGTERM or
    SIGINT (:func:`watch_signals`)."""
    from kmsfs.fs.entries import KmsfsOps  # fs operations import pyfuse3-heavy modules
    from kmsfs.fs.reencrypt_names import check_not_rekeying
    from kmsfs.fs.volume import check_root_only, lock_for_mount

    os.umask(0)  # the kernel already applied the caller's umask; modes arrive final
    raise_open_file_limit()
    check_root_only(cipherdir)
    latency: CpuLatencyRequest | None = None
    ops: KmsfsOps | None = None
    mounted = False
    stop = Stop(mountpoint)
    stop_handlers: dict[int, Any] = {}
    # SIGHUP (logrotate) must never end the daemon (its default action) nor be lost: one that
    # lands before the loop watches for it is kept for the loop (watch_signals).
    hup_handler = signal.signal(signal.SIGHUP, stop.note_hup)
    try:
        lock_fd = lock_for_mount(cipherdir)  # held while serving: kmsfs reencrypt refuses then
    except BaseException:
        signal.signal(signal.SIGHUP, hup_handler)
        raise
    try:
        check_not_rekeying(cipherdir)  # again, now that no kmsfs reencrypt can start
        if LOW_LATENCY in options:
            latency = _open_latency_request()
        ops = KmsfsOps(cipherdir, deriver)
        ops.enable_writeback_cache = WRITEBACK_CACHE in options
        ops.files.noatime = "noatime" in options  # the kernel leaves atime to the daemon
        ops.dir_noatime = bool(options & {"noatime", "nodiratime"})
        # SIGTERM and Ctrl-C are held across init until `mounted` says what it did: one that
        # lands as init returns (a mount called off: daemonize) must unmount, not leave a
        # dead mount behind.
        unmasked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            _init(ops, mountpoint, options)
            mounted = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)
        # From here until the loop watches for them, a stop request is a flag that the loop
        # acts on as soon as it does (watch_signals). Raised where it landed, it was a
        # traceback: logged as a failure here, or out of trio.run as an exception group.
        stop_handlers = {signum: signal.signal(signum, stop.note_stop) for signum in STOP_SIGNALS}
        log.info("mounted %s on %s", cipherdir, mountpoint)
        if "ro" not in options:
            ops.make_longlinks_dir()
            ops.remove_blob_leftovers()
            ops.start_dir_pool()
        settle_garbage_collector()
        keep_freed_buffers()
        spin = _SpinThenWait(
            threads_busy=lambda: ops.limiter.borrowed_tokens > 0,  # type: ignore[union-attr]
            idle=ops.between_requests,
            latency=latency,
            init=InitAmendment() if libfuse_needs_it() else None,
        )
        ops.requests_waiting = spin.requests_waiting
        trio.run(_main, on_ready, spin, stop)
    except BaseException as exc:
        if mounted and not _is_stop_request(exc):
            log.exception("main loop failed")
        raise
    finally:
        if mounted and ops is not None:
            _unmount(ops, stop)
        if latency is not None:
            latency.close()
        stop_following = getattr(deriver, "stop_following", None)
        if stop_following is not None:  # a move rewrites the volume's config: not unlocked
            stop_following()
        os.close(lock_fd)
        for signum, handler in stop_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        signal.signal(signal.SIGHUP, hup_handler)


def _is_stop_request(exc: BaseException) -> bool:
    """Ctrl-C or SIGTERM as an exception (alone or in a group): no failure to log."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split((KeyboardInterrupt, Terminated))[1] is None
    return isinstance(exc, (KeyboardInterrupt, Terminated))


def _init(ops: Any, mountpoint: Path, options: set[str]) -> None:
    """pyfuse3.init, its refusal as one line."""
    try:
        pyfuse3.init(ops, str(mountpoint), sorted(options - OWN_OPTIONS))
    except RuntimeError as exc:  # libfuse has said why on stderr, if it could
        hint = ""
        if "allow_other" in options and os.geteuid() != 0:
            hint = "; allow_other needs user_allow_other in /etc/fuse.conf"
        raise KmsfsError(f"{mountpoint}: the mount was refused ({exc}){hint}") from None


def _unmount(ops: Any, stop: Stop) -> None:
    """Stop serving: the directory pool, open files, the write journal, then the session and
    the mount: unmounted by path (lazily, unless the session already ended) only if nothing
    has unmounted it yet and the mount on top at that path is still this daemon's."""
    ops.stop_dir_pool()
    ops.files.close_all()
    if ops.journal is not None:
        with contextlib.suppress(OSError):  # marks what returned: no live record left
            ops.journal.close()
    mountpoint, left = stop.mountpoint, stop.foreign
    # Not the path once the daemon has unmounted or detached the mount there itself (or found
    # another there): by now it may hold another mount.
    unmount = not (stop.released or stop.ended)
    if unmount and stop.device is not None:
        left = not_ours(mountpoint, stop.device)
        unmount = left is None
    try:
        pyfuse3.close(unmount=unmount)
    except Exception:  # already unmounted from outside
        log.debug("close after unmount", exc_info=True)
    if left is not None and not stop.ended:
        log.warning(
            "%s: stopped without unmounting it (%s); if this mount is still there under "
            "another file system, it is dead now: kmsfs umount it once it is on top",
            mountpoint, left,
        )
    else:
        log.info("unmounted %s", mountpoint)


def _open_latency_request() -> CpuLatencyRequest:
    try:
        return CpuLatencyRequest()
    except OSError as exc:
        raise UsageError(f"-o {LOW_LATENCY}: {unavailable_reason(exc)}") from None


async def _main(on_ready: Callable[[], None] | None, spin: _SpinThenWait, stop: Stop) -> None:
    mountpoint = stop.mountpoint
    stop.device_known = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, stop)
        await nursery.start(_run_fuse, nursery.cancel_scope, spin, stop)
        # Ready means answering: stat the mount point through FUSE (served by the loop above).
        # Abandoned if the loop fails first (the stat can wait in the kernel for good then).
        # lstat: a symlink put in place of the mount point (by a writer of its parent) must
        # not lend this mount the device of what it points to (raise_readahead, not_ours).
        st = await trio.to_thread.run_sync(os.lstat, mountpoint, abandon_on_cancel=True)
        # The mount's device: what tells this mount from another at the same path (not_ours).
        stop.device = (os.major(st.st_dev), os.minor(st.st_dev))
        stop.device_known.set()
        raise_readahead(stop.device)
        # A stop request that came while we looked wakes the signal watcher in the same batch
        # as this task, in either order: let it run first. A mount on its way out is not ready.
        await trio.lowlevel.checkpoint()
        if stop.requested:
            return
        sdnotify.notify(f"READY=1\nSTATUS=serving {mountpoint}")
        if on_ready is not None:
            on_ready()


async def _run_fuse(
    scope: trio.CancelScope,
    spin: _SpinThenWait,
    stop: Stop,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    task_status.started()
    gate = _install_read_gate(spin)
    try:
        try:
            await pyfuse3.main()
        except* ConnectionAbortedError:
            if not stop.released:
                raise  # an abort of a mount still in place (/sys/fs/fuse/connections/N/abort)
            # The mount this daemon unmounted or detached went with its last user, and the
            # kernel ended the session as aborted, not as gone (ECONNABORTED, not ENODEV:
            # seen once in CI on Linux 6.18, when the writer of a detached mount closed): the
            # same end, not a failure of the loop.
            log.debug("the session of the released mount ended as aborted")
        # Returned by itself, not terminated: the kernel ended the session (the mount is gone
        # everywhere).
        stop.ended = not stop.terminated
    finally:
        if gate is not None:
            _remove_read_gate(gate)
        scope.cancel()


class _ReadGate(trio.abc.Instrument):
    """pyfuse3's read lock, handed over lazily: one trio scheduler pass less per request.

    pyfuse3's workers (``_session_loop``) each take a read lock, wait for /dev/fuse to be
    readable, release the lock, read one request and handle it. Stock, the release hands the
    lock to the next idle worker at once, so two workers take turns: every request costs an
    extra scheduler pass (and an epoll_wait) to wake the other worker, which then registers
    the fd again. Here the release only marks the worker as busy; an idle worker is woken
    when (and only if) the busy one yields to the scheduler before it comes back for the
    lock, i.e. when its handler waits (a worker thread, a file lock). Requests whose handler
    finishes without yielding, nearly all of them, are then read by the same worker in turn,
    and a handler that waits still never keeps other requests waiting: the same guarantee as
    pyfuse3's own lock. As an instrument, :meth:`after_task_step` sees every task yield.
    """

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()
        self._busy: object = None  # the worker that released the lock and handles a request

    async def __aenter__(self) -> None:
        if self._busy is trio.lowlevel.current_task():
            self._busy = None  # back without having yielded: nobody else was woken
        if self._held:
            await self._lot.park()  # whoever wakes us hands the lock over
        else:
            self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._lot:
            self._busy = trio.lowlevel.current_task()

    def after_task_step(self, task: object) -> None:
        if task is self._busy:
            self._busy = None
            if not self._held and self._lot:
                self._held = True
                self._lot.unpark(count=1)


class _SpinThenWait:
    """``trio.lowlevel`` for pyfuse3, whose ``wait_readable`` polls /dev/fuse briefly first.

    Measured, the cost that dominated small random I/O was not Python but sleeping: after each
    reply the worker went back to epoll_wait, and the next request (often already on its way,
    e.g. the WRITE that follows a security.capability GETXATTR) had to wake it up again, a
    cross-CPU wake-up of tens of microseconds. Polling the fd for up to :data:`SPIN_SECONDS`
    before sleeping catches it (tools/bench.py, kmsfs/gocryptfs: fio 4k randwrite 0.48 -> 1.32,
    randread 0.47 -> 1.23, tar extract 1.71x -> 0.89x the time).
    The spin is bounded per request, so an idle mount sleeps as before. A request found by
    polling is returned to without a trio checkpoint, except at least once a millisecond, so
    other tasks (signals, worker-thread results) are never starved by a steady stream.

    While it polls, the worker does a small job that would otherwise fall on a request's path:
    ``idle()`` (:meth:`~kmsfs.fs.entries.KmsfsOps.between_requests`: journal marks, then one
    run of :meth:`~kmsfs.fs.files.ContentKeys.derive_ahead` refills bounded in time), called
    once per wait and only if no request was already waiting; the fd is polled again right
    after.

    With ``latency`` (``-o low_latency``, :mod:`kmsfs.fs.latency`), any request takes the CPU
    latency request, and a sleep that lasts :data:`HOLD_SECONDS` without one releases it.

    With ``init`` (:class:`~kmsfs.fs.killpriv.InitAmendment`), libfuse's first two reads go
    through it: that is how the INIT reply gets FUSE_HANDLE_KILLPRIV_V2.
    """

    def __init__(
        self,
        threads_busy: Callable[[], bool] = lambda: False,
        idle: Callable[[], bool] = lambda: False,
        latency: CpuLatencyRequest | None = None,
        init: InitAmendment | None = None,
    ) -> None:
        self._init = init
        self._pollers: dict[int, select.poll] = {}
        self._latency = latency
        self._last_checkpoint = time.perf_counter()
        self._threads_busy = threads_busy
        self._idle = idle

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    def requests_waiting(self) -> bool:
        """True if /dev/fuse has a request ready now (one poll, no wait): a big request then
        goes to a worker thread rather than keep it waiting (ContentOps._inline_ok)."""
        return any(poller.poll(0) for poller in self._pollers.values())

    async def wait_readable(self, fd: int) -> None:
        if self._init is not None:
            if self._init.before_read(fd):
                return  # the INIT request waits for libfuse in the socket
            if self._init.done:
                self._init = None
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        now = time.perf_counter()
        # Not while worker threads encrypt or decrypt big requests: the spin would compete with
        # them for the GIL (dd write lost ~20% that way).
        deadline = now if self._threads_busy() else now + SPIN_SECONDS
        idle: Callable[[], bool] | None = self._idle
        latency = self._latency
        while now < deadline:
            if poller.poll(0):
                if latency is not None and not latency.held:
                    latency.hold()  # requests that keep coming (the first after the mount)
                if now - self._last_checkpoint > CHECKPOINT_SECONDS:
                    self._last_checkpoint = now
                    await trio.lowlevel.checkpoint()
                return
            if idle is not None:
                idle()  # at most one job per wait, and only once no request was waiting
                idle = None
                continue  # poll again right after it
            now = time.perf_counter()
        self._last_checkpoint = now
        if latency is None:
            await trio.lowlevel.wait_readable(fd)
            return
        if latency.held:  # a pause or the end of a busy spell: keep the request a while
            with trio.move_on_after(HOLD_SECONDS):
                await trio.lowlevel.wait_readable(fd)
                return
            latency.release()
        await trio.lowlevel.wait_readable(fd)
        latency.hold()  # the first request after a pause: a busy spell may start


class _PyfuseTrio:
    """What pyfuse3 sees as its ``trio`` module: trio itself, but ``Lock`` is the read gate
    and ``lowlevel.wait_readable`` spins briefly before it sleeps."""

    def __init__(self, gate: _ReadGate, spin: _SpinThenWait) -> None:
        self._gate = gate
        self.lowlevel = spin

    def Lock(self) -> _ReadGate:  # the name pyfuse3 calls (trio.Lock)
        return self._gate

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def _install_read_gate(spin: _SpinThenWait | None = None) -> _ReadGate | None:
    """Give pyfuse3 the lazy read gate, if its main loop has the shape it is written for.

    pyfuse3 looks its ``trio`` module global up at run time (pyfuse3.asyncio swaps it the same
    way); its only ``trio.Lock()`` is the read lock of ``_wait_fuse_readable``. Any other
    pyfuse3 keeps its stock loop.
    """
    if getattr(pyfuse3, "trio", None) is not trio or not hasattr(pyfuse3, "_wait_fuse_readable"):
        return None
    gate = _ReadGate()
    trio.lowlevel.add_instrument(gate)
    pyfuse3.trio = _PyfuseTrio(gate, spin or _SpinThenWait())  # type: ignore[attr-defined]
    return gate


def _remove_read_gate(gate: _ReadGate) -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]
    with contextlib.suppress(KeyError):
        trio.lowlevel.remove_instrument(gate)


def daemonize(child: Callable[[Callable[[], None]], None]) -> int:
    """Fork; the child runs ``child(report_ready)``; the parent returns 0 once ready, with
    SIGINT and SIGTERM held from then on (it only has to exit).

    The child reports failure by raising: its one-line message and its exit code
    (:func:`kmsfs.exitcodes.for_error`) travel through the pipe and the parent prints the one
    and returns the other, so errors seen only after the fork (no HSM, a wrong PIN) reach the
    user and a script exactly as they would without it.
    """
    read_fd, write_fd = os.pipe()
    # Ctrl-C and SIGTERM are held from just before the fork until each side is inside the
    # block that handles them: one landing right after the fork must reach the parent's
    # call-off (_call_off) or the child's report, never print a traceback or run the
    # parent's exit path in the child.
    unmasked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # child
        status = 1

        def report_ready() -> None:
            os.write(write_fd, b"ready\n")
            # As fuse_daemonize does: a daemon must not keep the caller's directory busy (its
            # file system could not be unmounted). Everything it reaches later by path was
            # made absolute before the fork (cmd_mount, AgentAddress.parse).
            os.chdir("/")
            _detach_stdio()

        # The child never returns from here, whatever signal lands where: a second one (the
        # parent's SIGTERM after a Ctrl-C the child had from the terminal before its setsid)
        # raised in the handler below ran the caller's exit path in the child too ("kmsfs:
        # terminated" after "kmsfs: interrupted"; found by review). The first check for a
        # pending signal is a call, each inside a try whose finally ends in os._exit.
        try:
            try:
                os.close(read_fd)
                os.setsid()
                # SIGTERM must stop the child even if the caller ignored it (trap '' TERM): it
                # is how an interrupted parent calls the mount off, and how a daemon unmounts.
                signal.signal(signal.SIGTERM, raise_terminated)
                signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)
                child(report_ready)
                status = 0
            except BaseException as exc:  # every failure must reach the parent as one line
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                code = exitcodes.for_error(exc) if isinstance(exc, KmsfsError) else exitcodes.ERROR
                with contextlib.suppress(OSError):
                    os.write(write_fd, f"error {code}: {msg}\n".encode("utf-8", "replace"))
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            finally:
                os._exit(status)
    chunks = []
    try:
        os.close(write_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)
        while True:
            data = os.read(read_fd, 4096)
            if not data:
                break
            chunks.append(data)
            if b"\n" in data:
                # The outcome is decided: a Ctrl-C or SIGTERM from now on must not turn a
                # mount that serves into an exit status of 130 or 143 (it killed this process
                # as it returned, and a script's "kmsfs mount ... || clean-up" took the live
                # mount for a failed one; found by review). One that came before is handled
                # as this call returns, still in here: the mount is called off.
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                break
    except BaseException:  # Ctrl-C or SIGTERM before the mount was ready: call it off
        # Unblocked first: one pending as the signals were held above raises here with them
        # held (CPython runs the handler after the mask is set), and the call-off's wait must
        # still end at a second Ctrl-C (found by review).
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, unmasked)
        finally:
            _call_off(pid)
        raise
    finally:
        os.close(read_fd)
    reply = b"".join(chunks).decode("utf-8", "replace").strip()
    if reply == "ready":
        return exitcodes.OK
    os.waitpid(pid, 0)
    code, msg = _parse_failure(reply)
    print(f"kmsfs: error: {msg}", file=sys.stderr)
    return code


def _call_off(pid: int) -> None:
    """Stop the child of an interrupted ``daemonize`` and wait for it: the user was told the
    mount was interrupted, so it must not go on to serve. (The child has its own session: the
    terminal's Ctrl-C reaches only the parent.) SIGTERM makes a child still setting up exit
    and one that has mounted unmount (``serve``'s clean-up if it lands as the mount is made,
    else :func:`watch_signals`, once the loop watches). A second Ctrl-C stops the wait, not
    the child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)


def _parse_failure(reply: str) -> tuple[int, str]:
    """(exit code, message) from the child's ``error CODE: message`` line."""
    head, sep, msg = reply.partition(": ")
    word, _, number = head.partition(" ")
    if not sep or word != "error" or not number.isdigit() or int(number) == exitcodes.OK:
        return exitcodes.ERROR, "the mount daemon exited before the mount was ready"
    return int(number), msg


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
