"""The output folder of an export and its manifest: what an export wrote, and so what `--overwrite` may remove.

Every export leaves `OUT/.dmtjepa-export.json` listing the files it wrote (relative paths, sizes,
sha256 digests). Before any work, `replacing` decides whether the folder may be used:

- a missing or empty folder is used;
- a folder that holds files but no manifest is refused whatever the flags: nothing says which of
  its files an export wrote, so none may be removed (`--out .` in a project root loses nothing);
- a folder with a manifest is refused without `--overwrite`; with it, every listed file still
  present must be the regular file the manifest describes (size and digest), or it is refused.

Once the export has passed its checks, the listed files it did not rewrite are removed (with the
folders they leave empty), and the manifest then lists exactly what this export wrote; files the
manifest never listed stay. A failed export removes nothing, and its manifest lists what it did
write beside the earlier files still intact, so that a later `--overwrite` can clear them. What
was written is told apart by identity (device, inode, mtime): a renamed-in file is a new inode.
A full disk or quota during the export ends in one ExportError sentence naming the folder, the
space free there and about how much each model file needs; every export writes aside and renames,
so nothing half-written is left.
Every file written, the manifest included, gets the mode the umask allows. For `--format triton`
the folder guarded is the model's own, OUT/NAME, so the models beside it are never touched.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from dmt_jepa.disk_space import free_space, out_of_space, size_in_words
from dmt_jepa.encoder_file import EncoderFileError, file_sha256, read_json_file
from dmt_jepa.export.errors import ExportError
from dmt_jepa.file_modes import as_umask_allows

MANIFEST_FILENAME = ".dmtjepa-export.json"
MANIFEST_FORMAT = "dmt-jepa export manifest"

Identity = tuple[int, int, int]
Record = dict[str, int | str]  # {"size": bytes, "sha256": hex digest}


def _is_scratch(name: str) -> bool:
    """The hidden `.NAME.partial` folders exports write into; each export clears its own."""
    return name.startswith(".") and name.endswith(".partial")


def _entries(out_dir: Path) -> list[str]:
    """The names in `out_dir` other than scratch folders; empty where the folder does not exist."""
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ExportError(f"--out {out_dir} is a file, not a folder; choose a folder.") from None
    except OSError as err:
        raise ExportError(f"cannot read the output folder {out_dir} ({err.strerror}); choose a readable --out.") from err
    return sorted(name for name in names if not _is_scratch(name))


def _files(out_dir: Path) -> dict[str, Identity]:
    """Every regular file under `out_dir` (links not followed, scratch folders and the manifest left out) by its identity."""
    files = {}
    for root, folders, names in os.walk(out_dir):
        if Path(root) == out_dir:
            folders[:] = [name for name in folders if not _is_scratch(name)]
        for name in names:
            st = os.lstat(Path(root, name))
            relative = Path(root, name).relative_to(out_dir).as_posix()
            if stat.S_ISREG(st.st_mode) and relative != MANIFEST_FILENAME:
                files[relative] = (st.st_dev, st.st_ino, st.st_mtime_ns)
    return files


def _record(path: Path) -> Record:
    """What the manifest says about one written file."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _is_plain_relative(name: object) -> bool:
    """A relative path of plain names (no '..', '.', empty or absolute part), as the manifest lists files."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and all(part not in ("", ".", "..") for part in path.parts) and path.as_posix() == name


def _is_record(record: object) -> bool:
    """{"size": int, "sha256": 64 hex digits}."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("size"), int)
        and isinstance(record.get("sha256"), str)
        and len(record["sha256"]) == 64
    )


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Record] | None:
    """The files the manifest in `out_dir` lists, by relative path; None where there is no manifest."""
    path = Path(out_dir) / MANIFEST_FILENAME
    if not os.path.lexists(path):
        return None
    unusable = f"{path} is not a manifest an export wrote; move the folder's files away or choose an empty --out."
    if path.is_symlink():
        raise ExportError(unusable)
    try:
        manifest = read_json_file(path)
    except EncoderFileError as err:
        raise ExportError(unusable) from err
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict) or not all(_is_plain_relative(n) and _is_record(r) for n, r in files.items()):
        raise ExportError(unusable)
    return files


def _inside(out_dir: Path, name: str) -> Path | None:
    """`out_dir/name` when every folder on the way is a real folder (not a link); None otherwise."""
    path = out_dir
    for part in PurePosixPath(name).parts[:-1]:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return None
    return path / PurePosixPath(name).name


def _check_listed(out_dir: Path, listed: dict[str, Record]) -> None:
    """Every listed file still present must be the regular file the manifest describes, reached through no link."""
    for name, record in listed.items():
        path = _inside(out_dir, name)
        if path is not None and not os.path.lexists(path):
            continue
        st = os.lstat(path) if path is not None else None
        if (
            path is None
            or st is None
            or not stat.S_ISREG(st.st_mode)
            or st.st_size != record["size"]
            or file_sha256(path) != record["sha256"]
        ):
            raise ExportError(
                f"{out_dir / name} is no longer the file an earlier export wrote, so --overwrite will not remove it; "
                f"move it out of {out_dir}, then export again."
            )


def _earlier_export(out_dir: Path, overwrite: bool) -> dict[str, Record]:
    """The files an earlier export left in `out_dir` that this one may remove; ExportError where the folder may not be used."""
    entries = _entries(out_dir)
    if not entries:
        return {}
    shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
    listed = read_manifest(out_dir)
    if listed is None:
        raise ExportError(
            f"{out_dir} holds files that no export recorded ({shown}), and an export removes only what it recorded; "
            "choose an empty or new --out, or move those files away."
        )
    if not overwrite:
        raise ExportError(
            f"{out_dir} holds an earlier export ({shown}); choose an empty --out, or add --overwrite to replace it "
            f"(the files its manifest {MANIFEST_FILENAME} lists; nothing else is removed)."
        )
    _check_listed(out_dir, listed)
    return listed


def _refuse_listed_sources(out_dir: Path, listed: dict[str, Record], sources: tuple[str | os.PathLike, ...]) -> None:
    """An input the earlier export wrote would be removed or rewritten by this one: refuse it."""
    for source in sources:
        try:
            inside = Path(source).resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            continue
        if inside in listed:
            raise ExportError(
                f"--out {out_dir} holds the input {Path(source).name}, which an earlier export wrote and --overwrite "
                "would remove; choose another --out."
            )


def _remove_listed(out_dir: Path, names: list[str]) -> None:
    """Delete the listed files, then each folder under `out_dir` that they leave empty."""
    for name in names:
        path = out_dir / name
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == out_dir or any(folder.iterdir()):
                break
            folder.rmdir()


def _write_manifest(out_dir: Path, files: dict[str, Record]) -> None:
    """Write the manifest aside, then rename it into place; no files, no manifest."""
    path = out_dir / MANIFEST_FILENAME
    if not files:
        if path.is_file() and not path.is_symlink():
            path.unlink()
        return
    aside = out_dir / f"{MANIFEST_FILENAME}.partial"
    aside.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": dict(sorted(files.items()))}, indent=1) + "\n")
    as_umask_allows(aside)
    os.replace(aside, path)


def _settle(out_dir: Path, listed: dict[str, Record], before: dict[str, Identity], *, remove: bool) -> None:
    """After the export: give what it wrote the umask's mode, remove (when told) what it replaced, record what stands."""
    after = _files(out_dir)
    written = sorted(name for name, identity in after.items() if before.get(name) != identity)
    for name in written:
        as_umask_allows(out_dir / name)
    untouched = {name: record for name, record in listed.items() if name in after and after[name] == before.get(name)}
    if remove:
        _remove_listed(out_dir, sorted(untouched))
        untouched = {}
    _write_manifest(out_dir, {**untouched, **{name: _record(out_dir / name) for name in written}})


def make_readable(path: Path) -> None:
    """Regular files under `path` (itself included; links not followed) get the umask's mode."""
    if path.is_symlink():
        return
    if path.is_file():
        as_umask_allows(path)
    elif path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                file = Path(root) / name
                if not file.is_symlink():
                    as_umask_allows(file)


def move_into(staged: Path, out_dir: Path) -> None:
    """Rename every file under `staged` to the same place under `out_dir`; a link where a folder goes is refused."""
    for root, _, names in os.walk(staged):
        folder = out_dir / Path(root).relative_to(staged)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ExportError(f"{folder} is a link or a file where the export puts a folder; move it away, then export again.")
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(Path(root, name), folder / name)


@contextmanager
def replacing(out_dir: str | os.PathLike, *, overwrite: bool, sources: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Guard one export into `out_dir` (see the module's docstring): refuse a folder it may not use; afterwards
    remove, with `overwrite` and on success, what the earlier export listed and this one did not rewrite, and
    write the manifest. `sources` (the files the export reads) must not be among what the earlier export wrote.
    """
    out_dir = Path(out_dir)
    listed = _earlier_export(out_dir, overwrite)
    _refuse_listed_sources(out_dir, listed, sources)
    before = _files(out_dir)
    try:
        yield out_dir
    except BaseException as err:
        full = out_of_space(err)
        if out_dir.is_dir():
            try:
                _settle(out_dir, listed, before, remove=False)
            except OSError:
                if full is None:
                    raise
                (out_dir / f"{MANIFEST_FILENAME}.partial").unlink(missing_ok=True)
        if full is None:
            raise
        weights = sum(Path(source).stat().st_size for source in sources if Path(source).is_file())
        raise ExportError(
            f"{full} while exporting into {out_dir} ({free_space(out_dir)} free there); each model file it writes "
            f"holds at least about {size_in_words(weights)} (the encoder's weights), so free that much per file and export "
            "again: nothing half-written was kept."
        ) from err
    _settle(out_dir, listed, before, remove=overwrite)
