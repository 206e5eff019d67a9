"""The I/O side of ``kmsfs encrypt`` / ``kmsfs decrypt``: one file, constant memory, atomic.

The format is pure code in :mod:`kmsfs.crypto.stream` (single files) and
:mod:`kmsfs.crypto.content` (a file taken out of a CIPHERDIR). This module reads and writes:

- Memory stays constant: at most two chunks are held (the one being processed and the one read
  ahead to learn whether it is the last), whatever the file size.
- Output to a path is atomic: a temporary file in OUT's directory, fsync, link(2) to OUT, fsync
  of the directory, only after every chunk authenticated. On any failure, Ctrl-C and SIGTERM
  included, the temporary file is removed, so OUT never holds partial plaintext.
- An existing OUT is never replaced unless asked (``--force``): it is refused before any work,
  and publishing by link(2), which fails if the name exists, keeps an OUT someone made meanwhile.
  With ``force`` the file is renamed over OUT (a new file: OUT's mode and hard links are not
  kept).
- A regular IN that changes while it is read (a file still being written) fails, naming it,
  rather than giving a complete-looking copy of part of it.
- Output to a stream (stdout, a device): if IN is seekable, a first pass authenticates every
  chunk before the second writes any plaintext (the second pass authenticates again, so a file
  changed in between never yields bad plaintext, at worst a cut). If IN is a pipe too, nothing
  can be checked ahead: each chunk is written only after it authenticates, so output stops
  before the first bad chunk, but what came before it has been written; the exit status is the
  only signal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto import content, stream
from kmsfs.errors import FormatError, IntegrityError, KmsfsError, UsageError
from kmsfs.fs import kms
from kmsfs.fs.progress import Progress
from kmsfs.fs.volume import open_volume

STDIO = "-"


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass
class Input:
    """An open IN: its display name, file object, size (None for a pipe) and seekability, and
    its modification time when opened (nanoseconds; None for a pipe)."""

    name: str
    file: BinaryIO
    size: int | None
    seekable: bool
    mtime_ns: int | None = None


@contextlib.contextmanager
def open_input(arg: str) -> Iterator[Input]:
    """IN as a binary file; ``-`` is stdin. The size is known for regular files only."""
    if arg == STDIO:
        f: BinaryIO = sys.stdin.buffer
        name, close = "stdin", False
    else:
        try:
            f, name, close = open(arg, "rb"), arg, True  # noqa: SIM115 (closed below)
        except OSError as exc:  # a mistyped IN is a usage error, as for domain import
            raise UsageError(f"{arg}: {exc.strerror}") from None
    try:
        st = os.fstat(f.fileno())
        regular = stat.S_ISREG(st.st_mode)
        yield Input(name, f, st.st_size if regular else None, regular and f.seekable(),
                    st.st_mtime_ns if regular else None)
    finally:
        if close:
            f.close()


def check_unchanged(src: Input) -> None:
    """KmsfsError naming IN if a regular IN's size or mtime changed since it was opened: a file
    still being written would otherwise give a complete-looking copy of part of it."""
    if src.size is None:
        return
    now = os.fstat(src.file.fileno())
    if (now.st_size, now.st_mtime_ns) != (src.size, src.mtime_ns):
        raise KmsfsError(
            f"{src.name}: changed while it was read (size {src.size}, then {now.st_size}): "
            "encrypt it again once it is complete"
        )


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at end of file (pipes may return short reads)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    have = len(data)
    while have < n:
        more = f.read(n - have)
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def framed(f: BinaryIO, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """(number, piece, is_last) over ``size``-byte pieces, reading one piece ahead.

    Always yields at least one piece (empty for an empty input): the final-chunk flag needs to
    know that nothing follows, which only the read ahead can tell on a pipe.
    """
    current, n = read_exact(f, size), 0
    while True:
        following = read_exact(f, size) if len(current) == size else b""
        last = not following
        yield n, current, last
        if last:
            return
        current, n = following, n + 1


def is_stream_output(arg: str) -> bool:
    """stdout, or an existing OUT that is not a regular file (/dev/null, a FIFO, a tty)."""
    if arg == STDIO:
        return True
    try:
        return not stat.S_ISREG(os.stat(arg).st_mode)
    except FileNotFoundError:
        return False


def check_output(arg: str, force: bool) -> None:
    """Refuse, before any work, an OUT path that exists (a dangling symlink too), unless
    ``force``; a stream OUT (stdout, /dev/null, a FIFO) is written, never replaced."""
    if force or is_stream_output(arg) or not os.path.lexists(arg):
        return
    raise _exists(arg)


def _exists(arg: str) -> UsageError:
    return UsageError(f"{arg}: already exists, not replaced (--force replaces it)")


class _Named:
    """OUT's temporary file; a failed write names OUT (ENOSPC alone does not say where)."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f, self._name = f, name

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self._name) from None


#: What link(2) says on a file system without hard links (vfat, exFAT, some FUSE ones).
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _publish(tmp: str, path: Path, arg: str, force: bool) -> None:
    """Make the finished temporary file OUT: renamed over it with ``force``, else linked,
    which fails if the name exists (then unlinked by the caller)."""
    try:
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        return
    except FileExistsError:
        raise _exists(arg) from None
    except OSError as exc:
        if force or exc.errno not in _NO_LINKS:
            raise OSError(exc.errno, exc.strerror, arg) from None
    # No hard links here: claim the name exclusively, then rename over that empty claim.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        raise _exists(arg) from None
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


@contextlib.contextmanager
def atomic_output(arg: str, mode: int, force: bool = False) -> Iterator[_Named]:
    """Write OUT through a temporary file in its directory; publish only if the body succeeds.
    Without ``force`` an OUT that exists by then is kept and refused (UsageError)."""
    # With force a symlinked OUT has its target replaced, not the link; without, a symlink
    # is a name that exists.
    path = Path(os.path.realpath(arg) if force else os.path.abspath(arg))
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".kmsfs-tmp")
    except OSError as exc:  # name OUT, not the temporary file, in the one-line error
        raise OSError(exc.errno, exc.strerror, arg) from None
    try:
        f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        yield _Named(f, arg)
        try:
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
            f.close()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, arg) from None
        _publish(tmp, path, arg, force)
        with contextlib.suppress(FileNotFoundError):  # linked: the temporary name goes
            os.unlink(tmp)
    except BaseException:
        # Unlink first: closing flushes what is buffered, which fails again on a full disk,
        # and a temporary file of plaintext must not outlive the failure (or a Ctrl-C).
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            f.close()
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def stream_output(arg: str) -> Iterator[BinaryIO]:
    if arg == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with open(arg, "wb") as f:
        yield f


def _mode(secret: bool) -> int:
    """Plaintext is created 0600; ciphertext follows the umask like any new file."""
    if secret:
        return 0o600
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _located(where: str, exc: KmsfsError) -> KmsfsError:
    text = str(exc)
    return exc if text.startswith(f"{where}:") else type(exc)(f"{where}: {text}")


def _derive_at(deriver: Any, info: bytes, epoch: int, where: str) -> bytes:
    """The key at the ``mk`` epoch a file names; one line naming IN if the Domain lacks it."""
    try:
        return bytes(deriver.derive(info, epoch=epoch))
    except IntegrityError as exc:
        raise IntegrityError(
            f"{where}: keyed with mk epoch {epoch}, which this Domain cannot derive ({exc})"
        ) from None


# encrypt


def encrypt(
    store: Path,
    domain: str,
    in_arg: str,
    out_arg: str,
    agent: kms.AgentOptions | None = None,
    force: bool = False,
) -> int:
    """Encrypt IN for the store's Domain ``domain``; return the plaintext size. An existing
    OUT is refused (UsageError) unless ``force``."""
    check_output(out_arg, force)
    bundle = kms.export_bundle(store, domain)
    kms.check_bundle(store, bundle, f"Domain {domain}")
    # IN is opened first: a missing one is said before an HSM is asked for anything.
    with open_input(in_arg) as src:
        with kms.open_deriver(store, bundle, agent) as deriver:
            kms.check_in_use(deriver)  # new data: never under a generation rolled back
            header = stream.StreamHeader.new(bundle, deriver.current_epoch)
            key = deriver.derive(stream.key_info(header.file_id), epoch=header.epoch)
            cipher = stream.StreamCipher(key, header)
        progress = Progress("kmsfs: encrypt", src.size)
        output: contextlib.AbstractContextManager[Writer]
        if is_stream_output(out_arg):
            output = stream_output(out_arg)
        else:
            output = atomic_output(out_arg, _mode(False), force)
        try:
            with output as out:
                out.write(header.pack())
                for n, chunk, last in framed(src.file, stream.CHUNK_SIZE):
                    out.write(cipher.seal(n, chunk, last))
                    progress.advance(len(chunk))
                check_unchanged(src)  # inside: a partial OUT is removed, never published
        finally:
            progress.close()
    return progress.done


# decrypt


def _drain(label: str, total: int | None, plaintexts: Iterator[bytes],
           out: Writer | None) -> int:
    """Consume ``plaintexts`` (into ``out`` unless None, i.e. verify only) with a progress bar."""
    progress = Progress(label, total)
    try:
        for plain in plaintexts:
            if out is not None:
                out.write(plain)
            progress.advance(len(plain))
    finally:
        progress.close()
    return progress.done


def _emit(
    src: Input,
    out_arg: str,
    plaintexts: Callable[[], Iterator[bytes]],
    rewind: int,
    force: bool = False,
) -> int:
    """Write the plaintexts to OUT under the rules in the module docstring; return bytes out."""
    total = src.size - rewind if src.size is not None else None
    if not is_stream_output(out_arg):
        with atomic_output(out_arg, _mode(True), force) as out:
            return _drain("kmsfs: decrypt", total, plaintexts(), out)
    if src.seekable:
        start = src.file.tell()  # not ``rewind``: stdin may be a file opened at any offset
        _drain("kmsfs: verify", total, plaintexts(), None)
        src.file.seek(start)
    with stream_output(out_arg) as out:
        return _drain("kmsfs: decrypt", total, plaintexts(), out)


def decrypt(
    store: Path,
    in_arg: str,
    out_arg: str,
    agent: kms.AgentOptions | None = None,
    force: bool = False,
    domain: str | None = None,
) -> int:
    """Decrypt a single encrypted file; the Domain comes from its header. Return bytes out.
    An existing OUT is refused (UsageError) unless ``force``; a file whose verified Domain is
    not *domain* (if given: ``--domain``) is refused (IntegrityError) before any key is
    derived."""
    check_output(out_arg, force)
    with open_input(in_arg) as src:
        try:
            prefix = read_exact(src.file, stream.PREFIX_SIZE)
            size = stream.header_size(prefix)
            header = stream.StreamHeader.parse(
                prefix + read_exact(src.file, size - stream.PREFIX_SIZE)
            )
            if src.size is not None:
                stream.plain_size(src.size - size)
        except KmsfsError as exc:
            raise _located(src.name, exc) from None
        kms.check_bundle(store, header.bundle, src.name, agent=agent)
        if domain is not None and (named := kms.bundle_domain_name(header.bundle)) != domain:
            raise IntegrityError(
                f"{src.name}: the file's Domain is {named}, not {domain} as --domain says; "
                "nothing decrypted"
            )
        with kms.open_deriver(store, header.bundle, agent) as deriver:
            key = _derive_at(deriver, stream.key_info(header.file_id), header.epoch, src.name)
        cipher = stream.StreamCipher(key, header)

        def plaintexts() -> Iterator[bytes]:
            try:
                for n, chunk, last in framed(src.file, stream.CIPHER_CHUNK_SIZE):
                    yield cipher.open(n, chunk, last)
            except KmsfsError as exc:
                raise _located(src.name, exc) from None

        return _emit(src, out_arg, plaintexts, size, force)


def recover(
    store: Path,
    cipherdir: Path,
    in_arg: str,
    out_arg: str,
    agent: kms.AgentOptions | None = None,
    force: bool = False,
) -> int:
    """Decrypt one ciphertext file of a CIPHERDIR (filesystem format) without mounting; an
    existing OUT as for :func:`decrypt`."""
    check_output(out_arg, force)
    config = open_volume(cipherdir)
    kms.check_bundle(
        store, config.domain_bundle, str(cipherdir), want_id=config.domain_id, agent=agent
    )
    with open_input(in_arg) as src:
        try:
            if src.size is not None:
                content.plain_size(src.size)
            first = read_exact(src.file, content.HEADER_SIZE)
            header = content.FileHeader.parse(first) if first else None
        except KmsfsError as exc:
            raise _located(src.name, exc) from None
        if header is None:  # an empty file has no header
            return _emit(src, out_arg, lambda: iter(()), 0, force)
        with kms.open_deriver(store, config.domain_bundle, agent) as deriver:
            key = _derive_at(deriver, content.file_key_info(header.file_id), header.epoch,
                             src.name)
        cipher = content.ContentCipher(key, header)

        def plaintexts() -> Iterator[bytes]:
            for n, block, _last in framed(src.file, content.CIPHER_BLOCK_SIZE):
                where = f"{src.name}: block {n} (plaintext offset {n * content.BLOCK_SIZE})"
                if len(block) <= content.BLOCK_OVERHEAD:
                    raise FormatError(f"{where}: {len(block)} bytes, too short to be a block")
                try:
                    yield cipher.decrypt_block(n, block)
                except IntegrityError:
                    raise IntegrityError(f"{where} fails authentication") from None

        return _emit(src, out_arg, plaintexts, content.HEADER_SIZE, force)
