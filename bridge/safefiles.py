"""Opening the files the bridge trusts so that no other user chooses what they hold or where they are.

The audit key, the audit store (and SQLite's ``-wal``/``-shm``/``-journal`` beside it), the sealed
head and the log files are opened here, under the rule OpenSSH applies to ``authorized_keys``
(StrictModes), with the bridge's effective user in the place of the logged-in user:

* **Directories.** Every directory the path passes through, including those reached through a
  symlink, is owned by root or by the bridge's user and writable by no one else. A directory
  *above* the file's own may instead be sticky (``/tmp``): there nobody can rename or remove an
  entry they do not own, so nobody can swap the directory below. The file's *own* directory gets
  no sticky exception: SQLite creates and removes its ``-wal``/``-shm``/``-journal`` by name there
  while it runs, and in a shared directory anyone could put a symlink, or a WAL of their own, at
  one of those names first. A symlink on the way is followed only if root or the bridge's user
  owns it (in a sticky directory its owner can point it anywhere).
* **Files.** A file is opened with ``O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`` relative to the
  descriptor of its checked directory, so the name is not resolved a second time; then ``fstat``
  on that descriptor: a regular file (no symlink, FIFO or device), owned by the bridge's user (an
  audit key owned by another user is a key that user knows), and, when opened for writing, with
  one link only (a hard link planted elsewhere would make the write land in someone else's file).
  Permission bits beyond those a file may have are removed with ``fchmod`` on that descriptor,
  never with ``chmod`` by name: that follows a symlink, and a bridge run as root would make a
  setuid binary the link names 0600. Where another user's write could have chosen the content (the
  audit key) a group- or other-writable file is refused instead of tightened.

Each refusal is an ``UnsafeFile`` naming the path and what to fix; the bridge and the ``audit``
commands report it as one line and exit 2.

Files that SQLite opens by name (the store and its siblings) are checked here first and then
reopened by SQLite; the directory rule is what makes that gap harmless: only root and the
bridge's user can add, rename or remove entries in the store's directory, and neither of them is
the attacker. What this module cannot see is a file handed over by root itself (root can always
write anywhere), or a check racing a change of the directory's own mode by its owner.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from types import TracebackType

from bridge.errors import UnsafeFile

log = logging.getLogger("bridge.files")

PRIVATE = 0o600
"""The permissions of a secret or personal-data file: the audit key, store and sealed head."""
SHARED_READ = 0o644
"""The permissions of a log file: log shippers running as another user may read it."""
PRIVATE_DIRECTORY = 0o700
"""The mode of a directory the bridge creates for its audit store."""
SHARED_DIRECTORY = 0o755
"""The mode of a directory the bridge creates for its logs."""

_MAX_SYMLINKS = 40
"""As the kernel's own limit: a symlink loop fails instead of looping."""
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owner_problem(uid: int) -> str:
    return f"it is owned by uid {uid}, and only root or the bridge's user (uid {os.geteuid()}) may own it"


def check_directory(fd: int, path: str, *, holds_files: bool) -> None:
    """Refuse the open directory ``fd`` unless only root or the bridge's user can change its entries.

    ``holds_files``: the directory holding the files themselves, where sticky is no excuse.
    """
    info = os.fstat(fd)
    if not _trusted_owner(info.st_uid):
        raise UnsafeFile(f"refusing directory {path}: {_owner_problem(info.st_uid)} (chown it)")
    if info.st_mode & _WRITABLE_BY_OTHERS:
        if holds_files:
            raise UnsafeFile(
                f"refusing directory {path}: it is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}), "
                f"who could put their own files or symlinks in it (chmod go-w {path}, or use a directory of its own)"
            )
        if not info.st_mode & stat.S_ISVTX:
            raise UnsafeFile(
                f"refusing directory {path}: it is writable by group or others without the sticky bit "
                f"(mode {stat.S_IMODE(info.st_mode):o}), who could swap what lies below it (chmod go-w {path})"
            )


def check_file(fd: int, path: str, *, perms: int, writing: bool, refuse_writable: bool) -> None:
    """Refuse the open ``fd`` unless it is a regular file of the bridge's user; tighten it to ``perms``.

    Extra permission bits are removed with ``fchmod(fd)`` (a warning says so), except that with
    ``refuse_writable`` a group- or other-writable file is refused: its content may be another
    user's. ``writing``: the file is opened for writing, so a second hard link is refused.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(f"refusing {path}: it is not a regular file")
    if info.st_uid != os.geteuid():
        raise UnsafeFile(
            f"refusing {path}: it is owned by uid {info.st_uid}, not by the bridge's user (uid {os.geteuid()}), "
            "so that user can read or replace it (check its content, then chown it, or remove it)"
        )
    if writing and info.st_nlink != 1:
        raise UnsafeFile(f"refusing {path}: it has {info.st_nlink} hard links, so writing it would change another file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~perms:
        if refuse_writable and mode & _WRITABLE_BY_OTHERS:
            raise UnsafeFile(
                f"refusing {path}: it is writable by group or others (mode {mode:o}), so its content may not "
                f"be the bridge's own (check it, then chmod {perms:o} {path})"
            )
        log.warning("%s had mode %o; tightened to %o", path, mode, mode & perms)
        os.fchmod(fd, mode & perms)


def _open_checked(name: str, shown: str, flags: int, dir_fd: int | None, *, perms: int, refuse_writable: bool) -> int:
    writing = flags & (os.O_WRONLY | os.O_RDWR) != 0
    try:
        fd = os.open(name, flags | _FILE_FLAGS, perms, dir_fd=dir_fd)
    except (FileNotFoundError, FileExistsError, PermissionError):
        raise
    except OSError as exc:  # ELOOP (a symlink), ENXIO (a FIFO without reader), EISDIR, ...
        try:
            kind = os.lstat(name, dir_fd=dir_fd).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISLNK(kind):
            raise UnsafeFile(f"refusing {shown}: it is a symbolic link (give the real path instead)") from None
        if not stat.S_ISREG(kind):
            raise UnsafeFile(f"refusing {shown}: it is not a regular file") from None
        raise
    try:
        check_file(fd, shown, perms=perms, writing=writing, refuse_writable=refuse_writable)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class TrustedDirectory:
    """An open, checked directory; files are opened relative to its descriptor.

    ``TrustedDirectory.open(path)`` walks ``path`` from ``/`` one component at a time with
    ``openat``, checking each directory before looking a name up in it and following a symlink
    only after checking who owns it, so what is checked is what is opened.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create_mode: int | None = None) -> TrustedDirectory:
        """Open and check ``path``; missing directories are created with ``create_mode`` if given.

        Raises ``UnsafeFile`` for a directory (or symlink) others could change, ``FileNotFoundError``
        for a missing one when ``create_mode`` is None, ``NotADirectoryError`` for a file on the way.
        """
        pending = _components(os.path.abspath(path))
        above: list[tuple[int, str]] = []  # the directories above the current one, for ".."
        fd, shown = os.open("/", _DIRECTORY_FLAGS), "/"
        links = 0
        try:
            while pending:
                name = pending.pop()
                if name == "..":
                    if above:
                        os.close(fd)
                        fd, shown = above.pop()
                    continue
                check_directory(fd, shown, holds_files=False)
                here = os.path.join(shown, name)
                try:
                    child = os.open(name, _DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if create_mode is None:
                        raise FileNotFoundError(errno.ENOENT, "no such directory", here) from None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, create_mode, dir_fd=fd)
                    pending.append(name)  # open what is there now, whoever made it
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    info = os.lstat(name, dir_fd=fd)  # a symlink, or not a directory at all
                    if not stat.S_ISLNK(info.st_mode):
                        raise NotADirectoryError(errno.ENOTDIR, "not a directory", here) from None
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, "too many levels of symbolic links", here) from None
                    if not _trusted_owner(info.st_uid):
                        raise UnsafeFile(
                            f"refusing symbolic link {here}: {_owner_problem(info.st_uid)}, since its owner "
                            "can point it elsewhere at any time"
                        ) from None
                    target = os.readlink(name, dir_fd=fd)
                    pending.extend(_components(target))
                    if target.startswith("/"):
                        root = os.open("/", _DIRECTORY_FLAGS)
                        above.append((fd, shown))  # closed with the rest below
                        fd, shown = root, "/"
                        while above:
                            os.close(above.pop()[0])
                    continue
                above.append((fd, shown))
                fd, shown = child, here
            check_directory(fd, shown, holds_files=True)
        except BaseException:
            os.close(fd)
            raise
        finally:
            while above:
                os.close(above.pop()[0])
        return cls(fd, shown)

    def open_file(self, name: str, flags: int, *, perms: int = PRIVATE, refuse_writable: bool = False) -> int:
        """Open ``name`` in this directory (``O_NOFOLLOW``) and ``check_file`` it; the caller closes it.

        A file created here (``flags`` with ``O_CREAT``) gets ``perms`` (less the umask).
        ``FileNotFoundError`` when it does not exist and ``O_CREAT`` is not given.
        """
        return _open_checked(name, self.name(name), flags, self.fd, perms=perms, refuse_writable=refuse_writable)

    def name(self, name: str) -> str:
        """The path of ``name`` in this directory, for messages."""
        return os.path.join(self.path, name)

    def fsync(self) -> None:
        """Make a rename or link in this directory durable (the entry lives in the directory)."""
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> TrustedDirectory:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def open_trusted(
    path: str | os.PathLike[str],
    flags: int,
    *,
    perms: int = PRIVATE,
    directory_mode: int | None = None,
    refuse_writable: bool = False,
) -> int:
    """``TrustedDirectory.open`` on the parent, then ``open_file`` there; the caller closes the fd.

    ``directory_mode``: create missing directories with it (None: they must exist).
    """
    absolute = os.path.abspath(path)
    with TrustedDirectory.open(os.path.dirname(absolute), create_mode=directory_mode) as directory:
        return directory.open_file(os.path.basename(absolute), flags, perms=perms, refuse_writable=refuse_writable)


def open_output(path: str | os.PathLike[str], *, perms: int = PRIVATE) -> int:
    """A one-shot output file the operator names (an export), emptied: the file rules, not the directory's.

    It is written through this descriptor only and never reopened by name, so a shared directory
    such as ``/tmp`` is fine; a symlink, someone else's file or a hard link there is not. The
    file is emptied only after it passed, so a refused file keeps its content.
    """
    fd = _open_checked(
        os.fspath(path), os.fspath(path), os.O_WRONLY | os.O_CREAT, None, perms=perms, refuse_writable=False
    )
    os.ftruncate(fd, 0)
    return fd


def _components(path: str) -> list[str]:
    """The names of ``path`` as a stack (the first name last), without empty names and ``.``."""
    return [part for part in reversed(path.split("/")) if part not in ("", ".")]
