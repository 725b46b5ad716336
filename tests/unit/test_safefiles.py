"""The safe file-opening primitives (bridge/safefiles.py), in-process on real files and directories."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from bridge.audit.anchor import HeadSigner, SealedHeadFile
from bridge.audit.keys import MAX_KEY_FILE_BYTES, key_path, load_master_key
from bridge.audit.store import SQLiteStore, store_uri
from bridge.errors import ConfigError, UnsafeFile
from bridge.safefiles import PRIVATE, SHARED_READ, TrustedDirectory, open_output, open_trusted

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A directory only we can write (pytest's own may be 0755: fine, but be explicit)."""
    tmp_path.chmod(0o700)
    return tmp_path


def read_through(path: Path, *, refuse_writable: bool = False) -> bytes:
    fd = open_trusted(path, os.O_RDONLY, refuse_writable=refuse_writable)
    with os.fdopen(fd, "rb") as f:
        return f.read()


# -- directories ---------------------------------------------------------------------------------


def test_missing_directories_are_created_with_the_mode_given(base: Path) -> None:
    with TrustedDirectory.open(base / "a" / "b", create_mode=0o700) as directory:
        assert directory.path == str(base / "a" / "b")
    assert mode(base / "a") == 0o700 and mode(base / "a" / "b") == 0o700


def test_missing_directory_without_create_mode_is_file_not_found(base: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TrustedDirectory.open(base / "absent")
    assert not (base / "absent").exists()


def test_file_in_the_way_of_a_directory_is_not_a_directory(base: Path) -> None:
    (base / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        TrustedDirectory.open(base / "file" / "below", create_mode=0o700)


def test_world_writable_directory_holding_the_files_is_refused_even_if_sticky(base: Path) -> None:
    (base / "shared").mkdir()
    (base / "shared").chmod(0o1777)
    with pytest.raises(UnsafeFile, match="writable by group or others"):
        TrustedDirectory.open(base / "shared")


def test_sticky_world_writable_directory_above_is_accepted(base: Path) -> None:
    (base / "shared").mkdir()
    (base / "shared").chmod(0o1777)
    with TrustedDirectory.open(base / "shared" / "mine", create_mode=0o700) as directory:
        assert directory.path.endswith("/shared/mine")


@pytest.mark.parametrize("bits", [0o777, 0o775])
def test_group_or_world_writable_directory_above_without_sticky_is_refused(base: Path, bits: int) -> None:
    (base / "shared").mkdir()
    (base / "shared").chmod(bits)
    with pytest.raises(UnsafeFile, match=f"{base / 'shared'}: .*without the sticky bit"):
        TrustedDirectory.open(base / "shared" / "mine", create_mode=0o700)
    assert not (base / "shared" / "mine").exists()


@needs_root
def test_directory_owned_by_another_user_is_refused(base: Path) -> None:
    (base / "theirs").mkdir()
    os.chown(base / "theirs", NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match=f"uid {NOBODY}"):
        TrustedDirectory.open(base / "theirs" / "below", create_mode=0o700)


def test_symlinked_directories_are_followed_and_checked_where_they_lead(base: Path) -> None:
    (base / "real" / "deep").mkdir(parents=True)
    (base / "hop").symlink_to("real")  # relative
    (base / "real" / "up").symlink_to("../real/deep")  # with ".."
    with TrustedDirectory.open(base / "hop" / "up") as directory:
        assert directory.path == str(base / "real" / "deep")
    (base / "real" / "deep").chmod(0o777)
    with pytest.raises(UnsafeFile, match=str(base / "real" / "deep")):
        TrustedDirectory.open(base / "hop" / "up")


def test_absolute_symlink_to_a_shared_directory_is_refused(base: Path) -> None:
    (base / "shared").mkdir()
    (base / "shared").chmod(0o777)
    (base / "link").symlink_to(base / "shared")
    with pytest.raises(UnsafeFile, match=str(base / "shared")):
        TrustedDirectory.open(base / "link")


@needs_root
def test_symlink_owned_by_another_user_is_not_followed(base: Path) -> None:
    (base / "real").mkdir()
    (base / "link").symlink_to(base / "real")
    os.chown(base / "link", NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(UnsafeFile, match=f"symbolic link {base / 'link'}"):
        TrustedDirectory.open(base / "link")


def test_symlink_loop_fails_instead_of_looping(base: Path) -> None:
    (base / "a").symlink_to("b")
    (base / "b").symlink_to("a")
    with pytest.raises(OSError, match="too many levels"):
        TrustedDirectory.open(base / "a")


# -- files ---------------------------------------------------------------------------------------


def test_symlink_to_a_setuid_file_is_refused_and_its_mode_kept(base: Path) -> None:
    target = base / "tool"
    target.write_bytes(b"\x7fELF")
    target.chmod(0o4755)
    (base / "key").symlink_to(target)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        read_through(base / "key")
    assert mode(target) == 0o4755


def test_dangling_symlink_is_refused_and_nothing_created_where_it_points(base: Path) -> None:
    (base / "store").symlink_to(base / "planted")
    with pytest.raises(UnsafeFile, match="symbolic link"):
        open_trusted(base / "store", os.O_RDWR | os.O_CREAT)
    assert not (base / "planted").exists()


def test_fifo_is_refused_without_blocking(base: Path) -> None:
    os.mkfifo(base / "fifo")
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(UnsafeFile, match="not a regular file"):
            open_trusted(base / "fifo", flags)


def test_directory_is_refused_as_a_file(base: Path) -> None:
    (base / "dir").mkdir()
    with pytest.raises(UnsafeFile, match="not a regular file"):
        open_trusted(base / "dir", os.O_RDONLY)


@needs_root
def test_file_owned_by_another_user_is_refused_and_left_alone(base: Path) -> None:
    (base / "key").write_text("theirs")
    (base / "key").chmod(0o644)
    os.chown(base / "key", NOBODY, NOBODY)
    with pytest.raises(UnsafeFile, match=f"owned by uid {NOBODY}"):
        read_through(base / "key")
    assert mode(base / "key") == 0o644


def test_second_hard_link_is_refused_for_writing_only(base: Path) -> None:
    (base / "ours").write_text("keep")
    os.link(base / "ours", base / "log")
    with pytest.raises(UnsafeFile, match="2 hard links"):
        open_trusted(base / "log", os.O_WRONLY | os.O_APPEND)
    assert read_through(base / "log") == b"keep"


def test_loose_mode_of_our_file_is_tightened_on_the_descriptor(base: Path, caplog: pytest.LogCaptureFixture) -> None:
    (base / "store").write_text("")
    (base / "store").chmod(0o4666)
    os.close(open_trusted(base / "store", os.O_RDONLY))
    assert mode(base / "store") == PRIVATE
    assert "tightened to 600" in caplog.text
    (base / "log").write_text("")
    (base / "log").chmod(0o666)
    os.close(open_trusted(base / "log", os.O_WRONLY | os.O_APPEND, perms=SHARED_READ))
    assert mode(base / "log") == SHARED_READ


def test_writable_by_others_is_refused_where_content_must_be_ours(base: Path) -> None:
    (base / "key").write_text("x")
    (base / "key").chmod(0o620)
    with pytest.raises(UnsafeFile, match="writable by group or others"):
        read_through(base / "key", refuse_writable=True)
    assert mode(base / "key") == 0o620
    (base / "key").chmod(0o640)  # only readable by others: ours, tightened
    assert read_through(base / "key", refuse_writable=True) == b"x"
    assert mode(base / "key") == PRIVATE


def test_created_file_has_the_permissions_given_and_the_descriptor_blocks(base: Path) -> None:
    fd = open_trusted(base / "new" / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, directory_mode=0o700)
    try:
        assert os.get_blocking(fd)
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    assert mode(base / "new" / "file") == PRIVATE


def test_output_in_a_sticky_shared_directory_is_written_and_emptied(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "export.jsonl").write_text("old export")
    (shared / "export.jsonl").chmod(0o644)
    with os.fdopen(open_output(shared / "export.jsonl"), "w") as f:
        f.write("new")
    assert (shared / "export.jsonl").read_text() == "new" and mode(shared / "export.jsonl") == PRIVATE


def test_refused_output_keeps_its_content(base: Path) -> None:
    (base / "ours").write_text("precious")
    os.link(base / "ours", base / "export.jsonl")
    with pytest.raises(UnsafeFile):
        open_output(base / "export.jsonl")
    assert (base / "ours").read_text() == "precious"


def test_directory_descriptor_is_what_files_are_opened_in(base: Path) -> None:
    """Renaming the checked directory away does not redirect opens made through its descriptor."""
    (base / "a").mkdir()
    with TrustedDirectory.open(base / "a") as directory:
        (base / "a").rename(base / "moved")
        (base / "a").mkdir()
        os.close(directory.open_file("f", os.O_WRONLY | os.O_CREAT))
    assert (base / "moved" / "f").exists() and not (base / "a" / "f").exists()


# -- the bridge's files --------------------------------------------------------------------------


def test_key_file_larger_than_a_key_is_refused(base: Path) -> None:
    key_path(base / "db").write_text("a" * (MAX_KEY_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than a key"):
        load_master_key(base / "db")


def test_non_ascii_key_file_is_a_config_error(base: Path) -> None:
    key_path(base / "db").write_bytes("é".encode() * 20)
    with pytest.raises(ConfigError, match="not ASCII"):
        load_master_key(base / "db")


def test_group_writable_key_file_is_refused(base: Path) -> None:
    load_master_key(base / "db")
    key_path(base / "db").chmod(0o660)
    with pytest.raises(UnsafeFile, match="writable by group or others"):
        load_master_key(base / "db")


def test_store_siblings_are_checked_before_sqlite_opens_them(base: Path) -> None:
    SQLiteStore(base / "audit.sqlite3").close()
    for suffix in ("-wal", "-shm", "-journal"):
        sibling = base / f"audit.sqlite3{suffix}"
        sibling.symlink_to(base / "elsewhere")
        with pytest.raises(UnsafeFile, match=f"{sibling}: it is a symbolic link"):
            SQLiteStore(base / "audit.sqlite3")
        sibling.unlink()
    assert not (base / "elsewhere").exists()


def test_store_is_not_created_when_create_is_false(base: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SQLiteStore(base / "absent.sqlite3", create=False)
    assert list(base.iterdir()) == []


def test_store_uri_keeps_query_and_fragment_characters_in_the_path(base: Path) -> None:
    path = base / "odd?name#1%.sqlite3"
    store = SQLiteStore(path)
    store.close()
    assert store_uri(path).endswith("odd%3Fname%231%25.sqlite3?mode=rw")
    assert [p.name for p in base.iterdir()] == [path.name]


@needs_root
def test_sealed_head_owned_by_another_user_is_not_a_valid_head(base: Path) -> None:
    head = base / "db.head"
    head.write_text("{}")
    os.chown(head, NOBODY, NOBODY)
    with pytest.raises(ValueError, match=f"owned by uid {NOBODY}"):
        SealedHeadFile(head, HeadSigner(b"k" * 32)).read()


def test_two_bridges_generating_a_key_at_once_get_the_same_key(base: Path) -> None:
    keys: list[bytes] = []
    together = threading.Barrier(2)

    def start() -> None:
        together.wait()
        keys.append(load_master_key(base / "db"))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 2 and keys[0] == keys[1]
    assert sorted(p.name for p in base.iterdir()) == ["db.key"]
