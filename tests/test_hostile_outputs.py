"""The job's writing side under hostile use: OUT_DIR over the inputs, mixed settings, many carried
members, member extensions that are paths or control characters, a worker paused past its lease."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_helpers import image_bytes, photo_samples, read_output, write_encoder_file, write_shard
from test_embed_job import snapshot, wait_for
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.serve import embed_shards
from dmt_jepa.serve.layouts import TABLE_GROUP_BYTES, ArrayShardOutput, OutputSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


@pytest.fixture(scope="module")
def other_encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("other") / "other.safetensors", seed=1)


def embed(*args: str):
    return CliRunner().invoke(app, ["embed", *map(str, args), "--workers", "0"])


def one_sentence_refusal(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Outputs never touch inputs


@pytest.mark.parametrize(
    "form",
    ["file-url", "file-url-slash", "local-url", "link-above-input", "parent-path", "parent-file-url", "chained-url"],
)
def test_an_out_dir_at_or_above_the_input_folder_is_refused_in_any_form(tmp_path, encoder_file, form):
    write_shard(tmp_path / "data" / "in" / "s.tar", photo_samples("k", 2))
    (tmp_path / "link").symlink_to(tmp_path / "data")
    out = {
        "file-url": f"file://{tmp_path}/data/in",
        "file-url-slash": f"file://{tmp_path}/data/in/",
        "local-url": f"local://{tmp_path}/data/in",
        "link-above-input": str(tmp_path / "link"),
        "parent-path": str(tmp_path / "data"),
        "parent-file-url": f"file://{tmp_path}/data/in/../",
        "chained-url": f"simplecache::file://{tmp_path}/data/in",
    }[form]
    before = files_under(tmp_path)
    one_sentence_refusal(embed(tmp_path / "data" / "in", out, "--model", encoder_file), "would overwrite")
    assert files_under(tmp_path) == before  # the input shard untouched, nothing created
    with pytest.raises(ValueError, match="would overwrite"):  # the same refusal from Python
        embed_shards(str(tmp_path / "data" / "in"), out, encoder_file, workers=0)
    assert files_under(tmp_path) == before


# Every name the job writes is its own: a planted link or FIFO is refused, never written through


@pytest.mark.parametrize(
    "name, kind, layout",
    [
        ("_stats", "link", "tar"), ("_stats/job.json", "link", "tar"), ("_stats/summary.json", "link", "tar"),
        ("_stats/job.json", "FIFO", "array"), ("pca.npy", "link", "array"),
        ("img_emb", "link", "embedding-reader"), ("metadata", "link", "embedding-reader"),
    ],
)  # fmt: skip
def test_a_link_or_fifo_at_a_name_the_job_writes_is_refused_before_any_work(tmp_path, encoder_file, name, kind, layout):
    write_shard(tmp_path / "in" / "a.tar", photo_samples("a", 2))
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "theirs.json").write_text('{"shards": []}')
    (out / name).parent.mkdir(parents=True)
    if kind == "FIFO":
        os.mkfifo(out / name)
    else:  # a folder for the names that are folders, a file for the others
        (out / name).symlink_to(elsewhere if "." not in name else elsewhere / "theirs.json")
    before = files_under(elsewhere)
    result = embed(tmp_path / "in", out, "--model", encoder_file, "--layout", layout)
    one_sentence_refusal(result, f"{out / name} is a {kind}, where `dmtjepa embed` writes")
    assert files_under(elsewhere) == before and not (out / "a.json").exists()


def test_every_path_the_job_writes_is_checked_on_the_way(tmp_path):
    from dmt_jepa.serve.safe_write import OutputDirError, writable

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "inside").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "img_emb").symlink_to(out / "inside")  # a link that stays inside OUT_DIR is refused too
    (out / "metadata").write_text("a file where a folder goes")
    (out / "a.json").symlink_to(elsewhere / "a.json")  # dangling: a write would create it there
    for relative, kind in (("img_emb/img_emb_a.npy", "link"), ("metadata/metadata_a.parquet", "file"), ("a.json", "link")):
        with pytest.raises(OutputDirError, match=f"{out / relative.split('/')[0]} is a {kind}, where"):
            writable(out, relative)
    assert writable(out, "_stats/new/a.json") == out / "_stats" / "new" / "a.json" and (out / "_stats" / "new").is_dir()
    assert not list(elsewhere.iterdir()) and not list((out / "inside").iterdir())


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("folder", ["img_emb", "metadata"])
def test_a_link_where_the_job_deletes_an_older_shard_is_refused_not_followed(tmp_path, encoder_file, folder, overwrite):
    write_shard(tmp_path / "in" / "a.tar", photo_samples("a", 2))
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for theirs in ("img_emb_a.npy", "metadata_a.parquet"):  # the names shard a has in those folders
        (elsewhere / theirs).write_text("theirs")
    if overwrite:  # a done shard in other settings, which --overwrite clears
        embed_shards(str(tmp_path / "in"), out, encoder_file, workers=0, dtype="int8")
    (out / folder).parent.mkdir(parents=True, exist_ok=True)
    (out / folder).symlink_to(elsewhere)
    before, kept = files_under(elsewhere), files_under(out)
    result = embed(tmp_path / "in", out, "--model", encoder_file, *(["--overwrite"] if overwrite else []))
    one_sentence_refusal(result, f"{out / folder} is a link, where `dmtjepa embed` writes a folder")
    assert files_under(elsewhere) == before  # nothing deleted through the link
    assert files_under(out) == kept  # nor anything of the older shard: its files are checked before any goes


def test_a_delete_removes_the_entry_itself_and_never_goes_through_a_folder_link(tmp_path):
    from dmt_jepa.serve.safe_write import OutputDirError, remove

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "metadata_real").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "theirs.npy").write_text("theirs")
    (out / "a.pooled.npy").symlink_to(elsewhere / "theirs.npy")
    os.mkfifo(out / "a.json")
    (out / "img_emb").symlink_to(elsewhere)
    remove(out, "a.pooled.npy")  # the link goes, not what it leads to
    remove(out, "a.json")  # a FIFO is removed without being opened
    remove(out, "missing.npy")
    for relative, kind in (("img_emb/theirs.npy", "link"), ("metadata_real", "folder")):
        with pytest.raises(OutputDirError, match=f"{out / relative.split('/')[0]} is a {kind}, where"):
            remove(out, relative)
    assert sorted(p.name for p in out.iterdir()) == ["img_emb", "metadata_real"]
    assert files_under(elsewhere) == {"theirs.npy": b"theirs"}


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full")
@pytest.mark.parametrize("layout", ["array", "embedding-reader"])
def test_a_full_disk_mid_job_is_one_sentence_with_the_space_an_image_takes(tmp_path, encoder_file, monkeypatch, layout):
    import builtins
    import re

    from dmt_jepa.serve import layouts

    write_shard(tmp_path / "in" / "a.tar", photo_samples("a", 3))
    write_shard(tmp_path / "in" / "b.tar", photo_samples("b", 3, seed=1))
    out = tmp_path / "out"

    def b_onto_a_full_disk(path, mode="r", *args, **kwargs):
        """Shard b's vectors go to /dev/full, which refuses every write as a full disk does."""
        full = "w" in mode and re.fullmatch(r"\.b\.(patches|pooled)\.npy\..*\.partial", Path(path).name)
        return builtins.open("/dev/full" if full else path, mode, *args, **kwargs)

    monkeypatch.setattr(layouts, "open", b_onto_a_full_disk, raising=False)
    result = embed(tmp_path / "in", out, "--model", encoder_file, "--layout", layout, "--dtype", "float32")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith(f"error: no space left on device while writing into OUT_DIR {out} ("), result.stderr
    assert "rerun the same command: the shards finished before are kept and nothing half-written is left." in result.stderr
    # what a finished shard's vectors take per image, from its file: the figure said must agree
    vectors = out / ("a.patches.npy" if layout == "array" else "img_emb/img_emb_a.npy")
    per_image = (vectors.stat().st_size - 128) / 3  # the .npy header is 128 bytes
    said = float(result.stderr.split("take about ")[1].split(" KB per image")[0])
    assert said == pytest.approx(per_image / 1e3, abs=0.05)
    left = sorted(p.name for p in out.rglob("*") if p.is_file() and p.parent.name != "_stats")
    assert "a.json" in left and not [name for name in left if name.startswith((".b", "b.")) or "_b." in name], left
    monkeypatch.undo()
    again = embed(tmp_path / "in", out, "--model", encoder_file, "--layout", layout, "--dtype", "float32")
    assert again.exit_code == 0 and "1 shards embedded, 1 already done" in again.output, again.output


def test_an_out_dir_beside_or_inside_the_input_folder_is_accepted(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 2))
    embed_shards(str(tmp_path / "in"), tmp_path / "beside", encoder_file, workers=0)
    embed_shards(str(tmp_path / "in"), f"file://{tmp_path}/in/sub", encoder_file, workers=0)
    assert snapshot(tmp_path / "in" / "sub") == snapshot(tmp_path / "beside")


def test_a_memory_out_dir_is_refused_from_the_cli_and_works_from_python(tmp_path, encoder_file):
    import fsspec

    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 3))
    url = "memory://hostile-outputs/out"
    one_sentence_refusal(embed(tmp_path / "in", url, "--model", encoder_file), "vanish")
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/hostile-outputs/out")
    embed_shards(str(tmp_path / "in"), url, encoder_file, workers=0)
    embed_shards(str(tmp_path / "in"), tmp_path / "local", encoder_file, workers=0)
    try:
        assert fs.cat_file("/hostile-outputs/out/s.tar") == (tmp_path / "local" / "s.tar").read_bytes()
        assert json.loads(fs.cat_file("/hostile-outputs/out/s.json"))["embedded"] == 3
    finally:
        fs.rm("/hostile-outputs", recursive=True)


# One set of settings per OUT_DIR


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model", "OTHER"], "model_sha256"),
        (["--layout", "array"], "layout"),
        (["--dtype", "int8"], "dtype"),
        (["--size", "128"], "input_size"),
        (["--pca", "4"], "pca"),
        (["--layers", "0"], "layers"),
    ],
)
def test_other_settings_with_other_shard_names_are_refused(tmp_path, encoder_file, other_encoder_file, extra, words):
    write_shard(tmp_path / "first" / "s0.tar", photo_samples("a", 2))
    write_shard(tmp_path / "second" / "t0.tar", photo_samples("b", 2, seed=1))
    embed_shards(str(tmp_path / "first"), tmp_path / "out", encoder_file, workers=0)
    kept = snapshot(tmp_path / "out")
    extra = [str(other_encoder_file) if e == "OTHER" else e for e in extra]
    model = [] if "--model" in extra else ["--model", encoder_file]
    one_sentence_refusal(embed(tmp_path / "second", tmp_path / "out", *model, *extra), words)
    assert snapshot(tmp_path / "out") == kept  # nothing written, nothing mixed in


def test_layers_and_no_layers_are_other_settings_both_ways(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s0.tar", photo_samples("k", 2))
    without = embed(tmp_path / "in", tmp_path / "plain", "--model", encoder_file)
    assert without.exit_code == 0, without.output
    with_layers = embed(tmp_path / "in", tmp_path / "layers", "--model", encoder_file, "--layers", "0")
    assert with_layers.exit_code == 0, with_layers.output
    for out, extra in [(tmp_path / "layers", []), (tmp_path / "plain", ["--layers", "0"])]:
        kept = snapshot(out)
        one_sentence_refusal(embed(tmp_path / "in", out, "--model", encoder_file, *extra), "layers")
        assert snapshot(out) == kept
    redo = embed(tmp_path / "in", tmp_path / "layers", "--model", encoder_file, "--overwrite")
    assert redo.exit_code == 0 and "1 shards embedded" in redo.output, redo.output
    assert snapshot(tmp_path / "layers") == snapshot(tmp_path / "plain")  # the layers are gone: a plain run's bytes


def test_overwrite_leaves_exactly_the_files_of_a_clean_run_in_the_new_settings(tmp_path, encoder_file, other_encoder_file):
    write_shard(tmp_path / "in" / "s0.tar", photo_samples("k", 2))
    write_shard(tmp_path / "old" / "t0.tar", photo_samples("o", 2, seed=3))
    embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0, pca=4)
    embed_shards(str(tmp_path / "old"), tmp_path / "out", encoder_file, workers=0, pca=4)
    result = embed(tmp_path / "in", tmp_path / "out", "--model", other_encoder_file, "--layout", "array", "--overwrite")
    assert result.exit_code == 0, result.output
    embed_shards(str(tmp_path / "in"), tmp_path / "clean", other_encoder_file, workers=0, layout="array")
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "clean")  # no s0.tar, no t0.*, no pca.npy
    assert sorted(p.name for p in (tmp_path / "out" / "_stats").iterdir()) == sorted(
        p.name for p in (tmp_path / "clean" / "_stats").iterdir()
    )


def test_a_remote_out_dir_holds_one_set_of_settings_too(tmp_path, encoder_file, other_encoder_file):
    import fsspec

    write_shard(tmp_path / "first" / "s0.tar", photo_samples("a", 2))
    write_shard(tmp_path / "second" / "t0.tar", photo_samples("b", 2, seed=1))
    url, fs = "memory://hostile-settings/out", fsspec.filesystem("memory")
    try:
        embed_shards(str(tmp_path / "first"), url, encoder_file, workers=0)
        with pytest.raises(ValueError, match="model_sha256"):
            embed_shards(str(tmp_path / "second"), url, other_encoder_file, workers=0)
        embed_shards(str(tmp_path / "second"), url, other_encoder_file, workers=0, layout="array", overwrite=True)
        embed_shards(str(tmp_path / "second"), tmp_path / "clean", other_encoder_file, workers=0, layout="array")
        remote = {p.rsplit("/", 1)[-1] for p in fs.ls("/hostile-settings/out", detail=False)} - {"_stats"}
        assert remote == set(snapshot(tmp_path / "clean"))
        for name in remote:
            assert fs.cat_file(f"/hostile-settings/out/{name}") == (tmp_path / "clean" / name).read_bytes()
    finally:
        fs.rm("/hostile-settings", recursive=True)


# Bounded memory in the array layout


def test_carried_members_are_spilled_to_the_file_aside_as_they_arrive(tmp_path):
    spec = OutputSpec(layout="array", dtype="float32")
    out = ArrayShardOutput(tmp_path, "s", "me", spec, grid=(2, 2), dim=3)
    rng = np.random.default_rng(0)
    member = 50_000
    count = 8 * TABLE_GROUP_BYTES // member  # eight row groups' worth of carried bytes
    record = {"original_size": [8, 8], "input_size": [8, 8], "grid": [2, 2], "resize": "crop"}
    tracemalloc.start()
    try:
        for i in range(count):
            out.add(f"k{i}", np.full((2, 2, 3), i, np.float32), record, carried={"bin": rng.bytes(member)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = count * member
    assert peak < total / 4, (peak, total)  # what the python side held never came near the members' total
    assert out.table_partial.stat().st_size > total / 2  # already in the file aside, before the commit
    out.commit({"shard": "s.tar"})
    table = pq.read_table(tmp_path / "s.parquet")
    rng = np.random.default_rng(0)
    assert table.column("key").to_pylist() == [f"k{i}" for i in range(count)]
    assert table.column("row").to_pylist() == list(range(count))
    assert [dict(m)["bin"] for m in table.column("members").to_pylist()] == [rng.bytes(member) for _ in range(count)]
    assert (np.load(tmp_path / "s.patches.npy")[:, 0, 0, 0] == np.arange(count)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.parquet", "s.patches.npy"]


def test_a_sample_of_many_members_holds_a_bounded_share_of_them_in_memory(tmp_path, encoder_file):
    from dmt_jepa.serve.shards import CARRIED_MEMBERS_BUDGET, ShardReader

    member, count, bound = 60_000, 100, 64 << 10
    members = {"png": image_bytes(32, 32), **{f"m{i:03d}": bytes([i]) * member for i in range(count)}}
    shard = write_shard(tmp_path / "in" / "s.tar", [("k", members), ("next", {"png": image_bytes(32, 32)})])
    fits = CARRIED_MEMBERS_BUDGET * bound // member  # 17: the members whose bytes fit the sample's budget, in order
    tracemalloc.start()
    try:
        with open(shard, "rb") as stream:
            first, second = ShardReader(stream, images_only=True, max_carried_bytes=bound)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sorted(first.carried()) == [f"m{i:03d}" for i in range(fits)]
    assert first.not_carried.listed() == [f"m{i:03d}" for i in range(fits, count)]  # every member dropped is named
    assert sum(map(len, first.carried().values())) <= CARRIED_MEMBERS_BUDGET * bound
    assert peak < (fits + 8) * member < count * member / 3, peak  # never near the sample's 6 MB of members
    assert second.key == "next" and second.carried() == {}  # the budget is per sample
    embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0)
    with tarfile.open(tmp_path / "out" / "s.tar") as tar:
        carried = sorted(name for name in tar.getnames() if name.startswith("k.in."))
        record = json.loads(tar.extractfile("k.json").read())
    assert carried == [f"k.in.m{i:03d}" for i in range(fits)] and record["not_carried"] == first.not_carried.listed()


def test_a_sample_of_thousands_of_members_names_the_first_hundred_and_counts_the_rest(tmp_path, encoder_file):
    from dmt_jepa.serve.shards import CARRIED_MEMBERS_BUDGET, ShardReader

    count, bound, listed = 6_000, 10, 100
    many = {f"m{i:04d}": b"x" * bound for i in range(count)}
    shard = write_shard(tmp_path / "in" / "s.tar", [("k", {"png": image_bytes(32, 32), **many}), ("bare", many)])
    fits = CARRIED_MEMBERS_BUDGET  # members of `bound` bytes each whose bytes fit the sample's budget, in order
    dropped = [f"m{i:04d}" for i in range(fits, fits + listed)] + [f"and {count - fits - listed} more"]
    no_image = ", ".join(f"m{i:04d}" for i in range(listed)) + f", and {count - listed} more"
    for layout in ("tar", "array"):
        out = tmp_path / layout
        embed_shards(str(tmp_path / "in"), out, encoder_file, workers=0, layout=layout, max_carried_bytes=bound)
        if layout == "tar":
            record = json.loads(read_output(out / "s.tar")["k"]["json"])
            assert len(record["not_carried"]) == listed + 1 and record["not_carried"] == dropped
        else:
            [not_carried] = pq.read_table(out / "s.parquet").column("not_carried").to_pylist()
            assert not_carried == dropped
        [failure] = json.loads((out / "s.json").read_text())["failures"]
        assert failure == {"key": "bare", "reason": f"the sample has no image member (found: {no_image})"}
    with open(shard, "rb") as stream:
        first, second = ShardReader(stream, images_only=True, max_carried_bytes=bound)
    assert sorted(first.carried()) == [f"m{i:04d}" for i in range(fits)]
    # What is held of the names stays at `listed` whatever the member count; the rest only counted, exactly.
    assert (len(first.not_carried.kept), first.not_carried.more) == (listed, count - fits - listed)
    assert (len(first.names.kept), first.names.more) == (listed, count + 1 - listed)  # the png is a member too
    assert (len(second.names.kept), second.names.more) == (listed, count - listed)


# Carried member extensions


def test_carried_extensions_are_made_safe_and_every_dropped_member_is_listed(tmp_path, encoder_file):
    members = {
        "png": image_bytes(40, 40),
        "jpg": image_bytes(50, 50, "JPEG"),  # ranks above png: the png is neither embedded nor carried
        "a\nb": b"newline",
        "x\\y": b"backslash",
        "a..b": b"dots",
        "..": b"only dots",
        "%41": b"percent",
        "seg.png": b"a mask",
        "big": b"z" * 200,
        "": b"empty extension",  # the member `k.`
        "cls": b"7",
    }
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "s.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"k.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected = {"a%0Ab": b"newline", "x%5Cy": b"backslash", "a.%2Eb": b"dots", "%2E%2E": b"only dots"}
    expected |= {"%2541": b"percent", "seg.png": b"a mask", "cls": b"7"}
    assert all(unquote(safe) in members for safe in expected)  # the rule is reversible
    dropped = ["png", "big", ""]
    for layout in ("tar", "array"):
        out = tmp_path / layout
        embed_shards(str(tmp_path / "in"), out, encoder_file, workers=0, layout=layout, max_carried_bytes=100)
        if layout == "tar":
            with tarfile.open(out / "s.tar") as tar:
                names = tar.getnames()
            assert all("\n" not in n and "\\" not in n and ".." not in n for n in names), names
            sample = read_output(out / "s.tar")["k"]
            carried = {ext[3:]: data for ext, data in sample.items() if ext.startswith("in.")}
            not_carried = json.loads(sample["json"])["not_carried"]
        else:
            table = pq.read_table(out / "s.parquet")
            carried = dict(table.column("members").to_pylist()[0])
            not_carried = table.column("not_carried").to_pylist()[0]
        assert carried == expected
        assert sorted(not_carried) == sorted(dropped)
        assert json.loads((out / "s.json").read_text())["embedded"] == 1


# Workers paused past their lease


# The real CLI in a real process; the first process to commit stops itself right there (past the
# ownership check, before the renames), as a worker paused by the OS at the worst moment would.
STOP_IN_COMMIT = """
import os, signal, sys
from dmt_jepa.serve.shards import ShardOutput
commit = ShardOutput.commit
def stopping_commit(self, record):
    try:
        os.close(os.open(os.environ["STOP_MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        pass
    else:
        os.kill(os.getpid(), signal.SIGSTOP)
    commit(self, record)
ShardOutput.commit = stopping_commit
from dmt_jepa.cli.main import app
app(sys.argv[1:])
"""


def stopped(process: subprocess.Popen) -> bool:
    try:
        return Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def pause_one_worker_past_the_lease(tmp_path: Path, encoder_file: Path, clean: dict, rep: int) -> None:
    """Two workers on one OUT_DIR; the one paused in its commit finds the shard taken over, drops it, exits 0."""
    out, mark, lease = tmp_path / f"out{rep}", tmp_path / f"stopped{rep}", 1.0
    args = [str(tmp_path / "in"), str(out), "--model", str(encoder_file), "--workers", "0", "--batch-size", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STOP_MARK": str(mark)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", STOP_IN_COMMIT, "embed", *args, "--lease", str(lease)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        wait_for(lambda: any(stopped(w) for w in workers), timeout=120)
        paused = next(w for w in workers if stopped(w))
        other = next(w for w in workers if w is not paused)
        _, stderr = other.communicate(timeout=180)  # takes the shard over after the lease and commits it
        assert other.returncode == 0, stderr
        paused.send_signal(signal.SIGCONT)
        _, stderr = paused.communicate(timeout=120)
        assert paused.returncode == 0, stderr
        assert "error" not in stderr, stderr
        assert snapshot(out) == clean
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
                worker.kill()
                worker.communicate()


def workers_setup(tmp_path: Path, encoder_file: Path) -> dict:
    for s in range(2):
        write_shard(tmp_path / "in" / f"s{s}.tar", photo_samples(f"k{s}_", 3, seed=s))
    embed_shards(str(tmp_path / "in"), tmp_path / "clean", encoder_file, workers=0, batch_size=4)
    return snapshot(tmp_path / "clean")


def test_a_worker_paused_past_its_lease_in_its_commit_drops_the_shard_and_exits_0(tmp_path, encoder_file):
    pause_one_worker_past_the_lease(tmp_path, encoder_file, workers_setup(tmp_path, encoder_file), rep=0)


@pytest.mark.slow
def test_a_worker_paused_past_its_lease_ten_times_in_a_row(tmp_path, encoder_file):
    clean = workers_setup(tmp_path, encoder_file)
    for rep in range(10):
        pause_one_worker_past_the_lease(tmp_path, encoder_file, clean, rep)


def test_a_fifo_in_place_of_a_claim_file_is_not_read(tmp_path) -> None:
    """A claim file that is a FIFO would block a plain read for ever; the holder is then unknown, not waited on."""
    import os
    import threading

    from dmt_jepa.serve.claims import Claims

    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / ".shard-0.claim")
    claims = Claims(out, "me", lease=1.0)
    found = []
    reader = threading.Thread(target=lambda: found.append(claims._holder("shard-0")), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive() and found == [{}]


def test_a_remote_done_record_that_is_hand_edited_or_too_large_is_not_done(tmp_path, encoder_file, monkeypatch):
    """A remote NAME.json is read by the local rules: bounded, and a record not as embed writes it is redone."""
    import fsspec

    import dmt_jepa.serve.remote as serve_remote
    from dmt_jepa.serve.remote import RemoteOut

    write_shard(tmp_path / "in" / "s.tar", photo_samples("k", 3))
    url, fs = "memory://hostile-remote-record/out", fsspec.filesystem("memory")
    try:
        embed_shards(str(tmp_path / "in"), url, encoder_file, workers=0)
        remote = RemoteOut(url)
        good = json.loads(fs.cat_file("/hostile-remote-record/out/s.json"))
        assert remote.read_record("s") == good
        fs.pipe_file("/hostile-remote-record/out/s.json", json.dumps(good | {"embedded": "three"}).encode())
        assert remote.read_record("s") is None
        fs.pipe_file("/hostile-remote-record/out/s.json", json.dumps(good).encode())
        monkeypatch.setattr(serve_remote, "MAX_JSON_BYTES", 64)  # far below the record's size
        assert remote.read_record("s") is None
    finally:
        fs.rm("/hostile-remote-record", recursive=True)
