"""The inode table: FUSE inode -> where it lives in the ciphertext directory.

FUSE inode numbers are the backing (ciphertext) inode numbers, as in pyfuse3's
``examples/passthroughfs.py``, so hard links come for free and numbers survive a remount. The
backing root's number and 1 (``pyfuse3.ROOT_INODE``) swap places to keep the mapping a bijection.

A backing number is only unique among *live* objects, while the kernel may hold a node (an open
fd, a cwd, a FORGET not yet sent) after its object is gone. When the daemon removes the last link
of an object (:meth:`InodeTable.removed`), that node is *detached*: it stays valid for the kernel
until FORGET, but its number is never again given to a new object; a new object that gets the
same backing number meanwhile is given a fresh id from a range no backing number reaches, for as
long as it lives (so hard links keep one id and ``st_ino``, which is the FUSE id, stays stable).
Otherwise the kernel would find its old inode for the new object: a new directory would inherit
the removed one's dead state (ENOENT inside), a held fd would resolve to the new file, and
directory aliases would move across parents (ESTALE).

Unlike passthroughfs we do not store full paths: each node keeps its *links*, (parent inode,
ciphertext name) pairs with the plaintext name beside them (for log lines), and a path is built
by walking up to the root. Renaming a directory therefore moves its whole known subtree at once.
A node lives while the kernel holds lookups on it or while known children point at it.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass, field

import pyfuse3

ROOT = pyfuse3.ROOT_INODE

Link = tuple[int, bytes]

#: How many paths :meth:`InodeTable.path` keeps; a full cache starts over.
PATH_CACHE_SIZE = 1024
#: More components than any path of PATH_MAX bytes has: a walk this long is a loop.
MAX_DEPTH = 4096
#: How many removed files the table keeps an fd of at most (:meth:`InodeTable.hold`). A
#: process that looked a file up holds the kernel's node, with an fd or with no fd at all (an
#: inotify watch on a file with other links): past this, a removed file answers ENOENT, as
#: before, instead of the root daemon's fds going to whoever makes the most watches.
MAX_HELD_FDS = 4096

FRESH_BASE = 0x3FFF_0000_0000_0000
"""First of the ids given to objects whose backing number a detached node still holds: above
any backing inode number (ext4's are 32-bit), below 2**63 for tools that read st_ino signed."""


@dataclass
class Node:
    """One known inode: its (parent, ciphertext name) links and reference counts."""

    links: dict[Link, bytes] = field(default_factory=dict)  # link -> plaintext name
    lookups: int = 0
    children: int = 0
    #: A removed directory's attributes as the backing file system left them (0 links), for
    #: the kernel's GETATTR of a removed working directory: ext4 answers it, so ``ls`` there
    #: lists nothing instead of failing.
    gone_attrs: os.stat_result | None = None
    #: An O_PATH fd of a file whose last link known here the daemon removed while the kernel
    #: held its node, and that link's ciphertext path (:meth:`InodeTable.hold`); the fd is
    #: closed when the node goes or gets a link again.
    held: tuple[int, bytes] | None = None


class InodeTable:
    """Maps FUSE inodes to ciphertext paths; mutated only from the trio thread."""

    def __init__(self, root_path: bytes, root_backing_ino: int) -> None:
        self.root_path = root_path
        self._root_backing = root_backing_ino
        self._nodes: dict[int, Node] = {ROOT: Node(lookups=1)}
        self._entries: dict[Link, int] = {}
        self._detached: set[int] = set()  # nodes whose object is gone, still held
        self._remap: dict[int, int] = {}  # backing number -> fresh id, while the object lives
        self._fresh = itertools.count(FRESH_BASE)
        # ino -> path() result. A path follows each node's first link up to the root; adding a
        # link never changes a node's first one, so entries go when a link goes or a node is
        # freed (_forget_paths), and none outlives a change of its own links or an ancestor's.
        self._paths: dict[int, bytes] = {}
        self._held_count = 0  # nodes with a held fd (hold)

    def _own_id(self, backing_ino: int) -> int:
        if backing_ino == self._root_backing:
            return ROOT
        if backing_ino == ROOT:
            return self._root_backing
        return backing_ino

    def fuse_ino(self, backing_ino: int) -> int:
        """FUSE inode for a live object's backing inode number (root and 1 swap).

        A fresh id if the number's own id is a detached node the kernel may still hold.
        """
        ino = self._remap.get(backing_ino)
        if ino is not None:
            return ino
        if backing_ino == self._root_backing:
            return ROOT
        ino = self._root_backing if backing_ino == ROOT else backing_ino
        if ino in self._detached:
            ino = next(self._fresh)
            self._remap[backing_ino] = ino
        return ino

    def removed(self, backing_ino: int, gone_attrs: os.stat_result | None = None) -> int:
        """The daemon removed the last link of the object *backing_ino*; returns its FUSE id.

        Its node (if the kernel holds it) loses every link and is detached: it answers ENOENT
        (or through an open file's fd, or with *gone_attrs*, see :meth:`gone_attrs`) until
        FORGET, and its id is not given out again before.
        """
        ino = self._remap.pop(backing_ino, None)
        if ino is None:
            ino = self._own_id(backing_ino)
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return ino
        node.lookups += 1  # hold the node while its links go
        for link in list(node.links):
            self.drop_link(*link)
        node.lookups -= 1
        node.gone_attrs = gone_attrs
        self._detached.add(ino)
        self._maybe_free(ino)
        return ino

    def gone_attrs(self, ino: int) -> os.stat_result | None:
        """The attributes :meth:`removed` was given for *ino*, while the kernel holds it."""
        node = self._nodes.get(ino)
        return node.gone_attrs if node is not None and not node.links else None

    def hold(self, ino: int, fd: int, path: bytes) -> None:
        """Keep *fd*, an O_PATH fd of *ino*'s file, removed from ciphertext *path*, while the
        kernel holds *ino* and the table knows no link of it (a file unlinked or renamed over,
        or whose other links the kernel never looked up): :meth:`held` answers for it then,
        as ext4 answers a process that looked the name up before the removal. Closed at once
        if there is no such node, or :data:`MAX_HELD_FDS` are held."""
        node = self._nodes.get(ino)
        if (
            node is None
            or node.links
            or node.held is not None
            or ino == ROOT
            or self._held_count >= MAX_HELD_FDS
        ):
            os.close(fd)
            return
        node.held = (fd, path)
        self._held_count += 1

    def held(self, ino: int) -> tuple[int, bytes] | None:
        """(fd, path removed from) that :meth:`hold` kept for *ino*, if it has no known link
        (else use its path)."""
        node = self._nodes.get(ino)
        return node.held if node is not None and not node.links else None

    def _release_held(self, node: Node) -> None:
        if node.held is not None:
            os.close(node.held[0])
            node.held = None
            self._held_count -= 1

    def known(self, ino: int) -> bool:
        return ino in self._nodes

    def at(self, parent: int, cname: bytes) -> int | None:
        """The inode known at the name *parent/cname* (None if the table has none there)."""
        return self._entries.get((parent, cname))

    def path(self, ino: int) -> bytes:
        """Ciphertext path of *ino* (any of its links); ENOENT if it has none left.

        Cached: every request resolves its parent directory, and walking up four levels and
        joining took 1.5 µs, a tenth of a negative lookup (tar -x does one per file). The walk
        stops at the first ancestor with a cached path (usually the parent), so a file opened
        for the first time costs one join.
        """
        paths = self._paths
        cached = paths.get(ino)
        if cached is not None:
            return cached
        if ino == ROOT:
            return self.root_path
        parts: list[bytes] = []
        at = ino
        while True:
            node = self._nodes.get(at)
            if node is None or not node.links:
                raise OSError(errno.ENOENT, "inode has no known path")
            at, cname = next(iter(node.links))
            parts.append(cname)
            if at == ROOT:
                parts.append(self.root_path)
                break
            above = paths.get(at)
            if above is not None:
                parts.append(above)
                break
            if len(parts) > MAX_DEPTH:
                raise OSError(errno.ELOOP, "inode path does not reach the root")
        parts.reverse()
        path = b"/".join(parts)
        if len(self._paths) >= PATH_CACHE_SIZE:
            self._paths.clear()
        self._paths[ino] = path
        return path

    def parent(self, ino: int) -> int:
        """The directory holding *ino* (the root holds itself); for a directory, its only one."""
        node = self._nodes.get(ino)
        if ino == ROOT or node is None or not node.links:
            return ROOT
        return next(iter(node.links))[0]

    def child_path(self, parent: int, cname: bytes) -> bytes:
        return self.path(parent) + b"/" + cname

    def plain_path(self, ino: int) -> str:
        """Plaintext path for log lines; best effort, never raises."""
        parts: list[bytes] = []
        seen = 0
        while ino != ROOT and seen < 4096:
            node = self._nodes.get(ino)
            if node is None or not node.links:
                parts.append(b"<unlinked>")
                break
            (ino, _cname), pname = next(iter(node.links.items()))
            parts.append(pname)
            seen += 1
        return "/" + os.fsdecode(b"/".join(reversed(parts)))

    def plain_child(self, parent: int, pname: bytes) -> str:
        base = self.plain_path(parent).rstrip("/")
        return f"{base}/{os.fsdecode(pname)}"

    def remember(self, ino: int, parent: int, cname: bytes, pname: bytes, lookups: int) -> None:
        """Record that *parent/cname* is *ino* and add *lookups* kernel references."""
        self.add_link(ino, parent, cname, pname)
        self._nodes[ino].lookups += lookups

    def add_link(self, ino: int, parent: int, cname: bytes, pname: bytes) -> None:
        link = (parent, cname)
        old = self._entries.get(link)
        if old is not None and old != ino:
            self.drop_link(parent, cname)
        node = self._nodes.setdefault(ino, Node())
        self._release_held(node)  # a path reaches it again
        if link not in node.links:
            node.links[link] = pname
            self._entries[link] = ino
            self._nodes.setdefault(parent, Node()).children += 1
        else:
            node.links[link] = pname

    def drop_link(self, parent: int, cname: bytes) -> None:
        """Forget the name *parent/cname* (after unlink, rmdir, or being renamed over)."""
        ino = self._entries.pop((parent, cname), None)
        if ino is None:
            return
        node = self._nodes.get(ino)
        self._forget_paths(ino, node)
        if node is not None:
            node.links.pop((parent, cname), None)
            self._release_child(parent)
            self._maybe_free(ino)

    def move_link(self, old: Link, new: Link, pname: bytes) -> None:
        """The name *old* is now *new* (rename); whatever *new* named before is dropped."""
        ino = self._entries.get(old)
        self.drop_link(*new)
        if ino is None:
            return
        node = self._nodes[ino]
        node.lookups += 1  # hold the node while its links change
        self.drop_link(*old)
        self.add_link(ino, new[0], new[1], pname)
        node.lookups -= 1
        self._maybe_free(ino)

    def exchange(self, a: Link, a_name: bytes, b: Link, b_name: bytes) -> None:
        """RENAME_EXCHANGE: the inodes at names *a* and *b* swap places."""
        ino_a, ino_b = self._entries.get(a), self._entries.get(b)
        held = [i for i in (ino_a, ino_b) if i is not None]
        for i in held:
            self._nodes[i].lookups += 1
        self.drop_link(*a)
        self.drop_link(*b)
        if ino_a is not None:
            self.add_link(ino_a, b[0], b[1], b_name)
        if ino_b is not None:
            self.add_link(ino_b, a[0], a[1], a_name)
        for i in held:
            self._nodes[i].lookups -= 1
            self._maybe_free(i)

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_free(ino)

    def _forget_paths(self, ino: int, node: Node | None) -> None:
        """Drop the cached paths that a change of *ino*'s links may change: its own, and if it
        has known children, every path (those under it; finding which is not worth it).

        Every ancestor of a known node has ``children`` above 0, so a node without children
        is in no other cached path: ``rm -rf`` keeps the paths of the directories it empties.
        """
        if node is not None and node.children:
            self._paths.clear()
        else:
            self._paths.pop(ino, None)

    def _release_child(self, parent: int) -> None:
        pnode = self._nodes.get(parent)
        if pnode is not None:
            pnode.children -= 1
            self._maybe_free(parent)

    def _maybe_free(self, ino: int) -> None:
        node = self._nodes.get(ino)
        if ino == ROOT or node is None or node.lookups > 0 or node.children > 0:
            return
        del self._nodes[ino]
        self._release_held(node)
        self._paths.pop(ino, None)  # its number may come back for another object
        self._detached.discard(ino)
        for link in list(node.links):
            self._entries.pop(link, None)
            self._release_child(link[0])

    def __len__(self) -> int:
        return len(self._nodes)
