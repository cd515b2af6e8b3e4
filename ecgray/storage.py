"""Locations: a local path or a URI (`s3://`, `gs://`, `file://`, anything pyarrow.fs resolves), one API.

Every data / model / run location of ecgray (prepared shards, features, encoder and mapper checkpoints, run
outputs, adapters) goes through here. Relative local paths are made absolute once, where a command is
launched (`ecgray.config.resolve_locations`), so a Ray worker, a Tune trial (which runs in its own
directory) or a job on another node reads the same place. S3 endpoints and credentials come from the
usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which Ray workers inherit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (file:// included), False for a plain path."""
    return "://" in str(location)


def resolve(location: str | os.PathLike | None) -> str | None:
    """A URI unchanged; a local path made absolute (against the current directory, `~` expanded)."""
    if location is None:
        return None
    if is_uri(location):
        return str(location)
    return str(Path(location).expanduser().resolve())


def filesystem(location: str | os.PathLike):
    """-> (pyarrow FileSystem, path inside it). A bad URI raises ValueError naming it."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as err:  # ArrowInvalid is a ValueError
        raise ValueError(f"{location}: not a location pyarrow can open ({err})") from None


def join(location: str | os.PathLike, *parts: str) -> str:
    """location / parts, for paths and URIs alike (a URI keeps its query string at the end)."""
    text = str(location)
    if not is_uri(text):
        return str(Path(text, *parts))
    base, _, query = text.partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def list_files(location: str | os.PathLike, suffix: str = "") -> list[str]:
    """Paths (inside the location's filesystem, sorted) of the files directly under a folder ending in
    suffix; [] when the folder does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
        and not i.base_name.startswith((".", "_"))
    )  # fmt: skip


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: not found") from None


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: locally written aside and renamed into place (a reader never sees half of it);
    an object store's PUT is atomic per object."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode())


def delete_dir(location: str | os.PathLike) -> None:
    """Remove a folder and everything under it (nothing when it is not there)."""
    fs, path = filesystem(location)
    if is_dir(location):
        fs.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy a local folder tree to a location (a path or a URI), replacing files of the same names."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        shutil.copytree(local_dir, location, dirs_exist_ok=True)
        return
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def local_file(location: str | os.PathLike) -> Iterator[Path]:
    """A local path holding the location's file (the file itself when local, else a temporary copy)."""
    if not is_uri(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{location}: no such file")
        yield path
        return
    data = read_bytes(location)
    with tempfile.TemporaryDirectory(prefix="ecgray-") as tmp:
        path = Path(tmp) / str(location).split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        path.write_bytes(data)
        yield path


def list_names(location: str | os.PathLike) -> list[str]:
    """Base names (sorted) of everything directly under a folder, files and folders alike, hidden ones
    included; [] when the folder does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def move(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Move one file to another place of the same filesystem, replacing what is there: a rename locally;
    an object store copies (server-side) then deletes the source."""
    fs, src = filesystem(source)
    _, dst = filesystem(destination)
    parent = dst.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    fs.move(src, dst)


def delete_file(location: str | os.PathLike) -> None:
    """Remove one file (nothing when it is not there)."""
    fs, path = filesystem(location)
    if is_file(location):
        fs.delete_file(path)
