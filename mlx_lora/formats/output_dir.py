"""Output directories: may we write there, is it ours, and one process at a time.

A run's directory is ours when it holds MARKER (written before anything else) or, from
versions before the marker, our metrics and config. A directory holding anything else is
refused unless --overwrite, and even then only files of the names we write are replaced.
The lock is a file beside the output path, held with flock for the life of the process:
the kernel releases it on any exit, so a crash leaves no live lock behind.
"""

import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_lora.errors import UserError

MARKER = ".mlx-lora-run"
LEGACY_MARKS = ("metrics.jsonl", "config.yaml")  # what runs wrote before the marker existed


def check_writable(path: Path | str, flag: str) -> None:
    """Fail now, in one line, if `path` cannot be a directory we write into."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty; name a directory to write into")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pick a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path} is under {existing}, which is a file; pick another place")
    try:  # the one sure test: make something there (read-only mounts, /proc, permissions)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".mlx-lora-probe-"))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({e.strerror}); "
                        "pick a writable place") from None


def is_ours(directory: Path) -> bool:
    """True for a directory an mlx-lora run wrote."""
    directory = Path(directory)
    return (directory / MARKER).is_file() or all((directory / n).is_file() for n in LEGACY_MARKS)


def foreign_entries(directory: Path) -> list[str]:
    """Names in a directory that is not one of our runs (empty: nothing there, or ours)."""
    directory = Path(directory)
    if not directory.is_dir() or is_ours(directory):
        return []
    return sorted(p.name for p in directory.iterdir())


def claim_run_dir(adapter_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a directory holding another run, or anything that is not a run of ours."""
    if foreign := foreign_entries(adapter_dir):
        if not overwrite:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise UserError(
                f"{adapter_dir}: holds files mlx-lora did not write ({shown}); pick an empty or "
                "new --adapter-path, or pass --overwrite to write beside them (files of the "
                "names a run writes are replaced, nothing else is touched)")
    elif Path(adapter_dir).is_dir() and is_ours(adapter_dir) and not (resume or overwrite):
        raise UserError(
            f"{adapter_dir}: holds another run's files; pass --resume to continue it, "
            "--overwrite to replace it, or pick another --adapter-path")


def lock_path(path: Path) -> Path:
    """The lock file of an output path: beside it, so the output itself stays untouched."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}.mlx-lora.lock"


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock of an output path for the block; refuse if a live process holds it."""
    lock = lock_path(path)
    created = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{path} is in use by {holder}, which is still running {what}; "
                            "wait for it or stop it, or pick another path") from None
        # The holder before us may have removed the file between our open and our lock.
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} ({' '.join(sys.argv[:3])})".encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiter re-checks the inode
        os.close(fd)
        for folder in created:  # the parents made for the lock, where nothing else went
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def remove_our_files(adapter_dir: Path, names: tuple[str, ...], run_dirs: dict[str, str]) -> None:
    """Before a fresh run in a directory of ours: delete the named files, and in each folder of
    run_dirs the sub-folders holding its mark file (folder -> mark) and the named files."""
    adapter_dir = Path(adapter_dir)
    for name in names:
        (adapter_dir / name).unlink(missing_ok=True)
    for folder, mark in run_dirs.items():
        root = adapter_dir / folder
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            if entry.is_dir() and (entry / mark).is_file():
                shutil.rmtree(entry)
            elif entry.is_file() and entry.name in names:
                entry.unlink()
        if not any(root.iterdir()):
            root.rmdir()
