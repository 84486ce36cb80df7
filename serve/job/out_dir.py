"""OUT_DIR before and around the work: refusals, preparation, --overwrite's clearing, a remote OUT_DIR, and
the sentence for a write into it that failed.

Everything here runs before the first shard is claimed (or, for `write_failure`, after the job
stopped): a wrong OUT_DIR is refused in one sentence before any work, and names the job writes
whatever its shards are called are checked by the write guard (serve/safe_write.py).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dmt_jepa.disk_space import free_space, out_of_space, size_in_words
from dmt_jepa.serve.inputs import ShardSource
from dmt_jepa.serve.job.options import EmbedOptions
from dmt_jepa.serve.layouts import EMBEDDING_READER_DIRS
from dmt_jepa.serve.pca import PCA_FILE
from dmt_jepa.serve.remote import RemoteOut, is_url, location
from dmt_jepa.serve.safe_write import OutputDirError, checked, remove
from dmt_jepa.serve.shards import identity_difference, remove_shard_files
from dmt_jepa.serve.stats import JOB, STATS_DIR, SUMMARY


def check_identity(out_dir: str | os.PathLike, identity: dict, records: dict[str, dict]) -> None:
    """Refuse a run whose settings differ from those of any shard OUT_DIR holds: one set of settings per OUT_DIR.

    Runs before the PCA is fitted, so the projection's hash is not compared here (a changed pca.npy
    only makes its shards not done).
    """
    for name, record in sorted(records.items()):
        difference = identity_difference(record, identity, unknown=("pca_sha256",))
        if difference is not None:
            raise OutputDirError(
                f"OUT_DIR {out_dir} already holds {name}, which {difference}; rerun with the same settings, "
                "choose another OUT_DIR, or pass --overwrite to replace every shard made otherwise."
            )


def refuse_out_over_inputs(out_dir: str | os.PathLike, shards: Sequence[ShardSource]) -> None:
    """Refuse an OUT_DIR (path or URL) that is an input shard's folder or one above it."""
    store, root = location(os.fspath(out_dir))
    above = root.rstrip("/") + "/"
    for shard in shards:
        if shard.url.startswith("pipe:"):
            continue
        shard_store, path = location(shard.url)
        folder = posixpath.dirname(path)
        if shard_store == store and (folder == root or folder.startswith(above)):
            raise OutputDirError(
                f"OUT_DIR {out_dir} is the folder of the input shard {shard.url} or one above it, so outputs would "
                "overwrite inputs; choose an OUT_DIR outside the input folders."
            )


def prepare_out_dir(out_dir: Path, layout: str = "tar") -> Path:
    """Create OUT_DIR and prove it writable; each name the job writes whatever its shards are called must be
    missing, or a real folder or regular file as the job writes it (serve/safe_write.py)."""
    folders = [STATS_DIR, *(EMBEDDING_READER_DIRS if layout == "embedding-reader" else ())]
    for name in folders:
        checked(out_dir, name, folder=True)
    for name in (f"{STATS_DIR}/{JOB}", f"{STATS_DIR}/{SUMMARY}", PCA_FILE):
        checked(out_dir, name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(f"cannot write to OUT_DIR {out_dir} ({err.strerror or err}); choose a writable directory.") from err
    return out_dir


def open_remote(out_dir: str | os.PathLike) -> RemoteOut | None:
    if not is_url(out_dir):
        return None
    try:
        return RemoteOut(str(out_dir))
    except (OSError, ValueError, ImportError) as err:
        raise OutputDirError(f"cannot open OUT_DIR {out_dir} ({err}); check the URL and its credentials.") from err


def clear_other_settings(out: Path, remote: RemoteOut | None, identity: dict, records: dict[str, dict], keep_pca: bool) -> None:
    """--overwrite: remove every shard made with other settings (all layouts, with its stats), and a
    pca.npy this run does not use, so that OUT_DIR holds one set of settings again."""
    cleared = [name for name, record in records.items() if identity_difference(record, identity) is not None]
    relatives = [f"{STATS_DIR}/{name}.json" for name in cleared]
    if cleared:
        relatives.append(f"{STATS_DIR}/{SUMMARY}")
    if not keep_pca:
        relatives.append(PCA_FILE)
    for name in cleared:
        remove_shard_files(out, name)
        if remote is not None:
            remote.remove_shard(name)
    for relative in relatives:
        remove(out, relative)
        if remote is not None:
            remote.remove(relative)


def write_failure(
    out_dir: str | os.PathLike,
    out: Path,
    err: OSError,
    options: EmbedOptions,
    layers: Sequence[int],
    grid: tuple[int, int],
    dim: int,
) -> str:
    """The sentence for a write into OUT_DIR that failed mid-job; for a full disk or quota, with the space free
    there and about how much each image's embeddings take (OutputSpec.bytes_per_image)."""
    kept = "the shards finished before are kept and nothing half-written is left"
    full = out_of_space(err)
    if full is None:
        return (
            f"writing into OUT_DIR {out_dir} failed ({err.strerror or err}); {kept}: fix the cause (free space?) "
            "and rerun the same command."
        )
    per_image = replace(options.output, layers=tuple(layers)).bytes_per_image(grid, dim)
    return (
        f"{full} while writing into OUT_DIR {out_dir} ({free_space(out)} free there); the embeddings take about "
        f"{size_in_words(per_image)} per image ({size_in_words(1000 * per_image)} per 1,000), plus the members "
        f"carried, so free that much for the images still to embed and rerun the same command: {kept}."
    )
