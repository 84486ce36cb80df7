"""`open_embeddings` and pca.npy against OUT_DIRs someone else touched: each damage ends in one
sentence naming the file, or in the right pairing of keys and vectors; never a hang or a traceback."""

import json
import os
import shutil
import stat
import tarfile
import zlib
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from embed_helpers import photo_samples, tiny_encoder, write_shard
from hostile_helpers import damaged_copy, two_models, within
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.serve import EmbeddingsError, OutputDirError, embed_shards, open_embeddings

SETTINGS = dict(workers=0, batch_size=3, dtype="float32", pooled=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Good outputs of one 4-image shard: array and tar layouts, a --pca 4 run, and part-1 by another model."""
    root = tmp_path_factory.mktemp("hostile-reader")
    model, other = two_models(root, 4)
    for layout in ("array", "tar"):
        embed_shards(str(root / "in" / "part-0.tar"), root / layout, model, layout=layout, **SETTINGS)
    embed_shards(str(root / "in" / "part-0.tar"), root / "pca", model, layout="array", pca=4, **SETTINGS)
    embed_shards(str(root / "in" / "part-1.tar"), root / "other", other, layout="array", **SETTINGS)
    return root


def by_hand(out):
    """key -> (patches [h, w, D], pooled [D]) read without the reader: the table's row column indexes the arrays."""
    table = pq.read_table(out / "part-0.parquet")
    patches, pooled = np.load(out / "part-0.patches.npy"), np.load(out / "part-0.pooled.npy")
    return {key: (patches[row], pooled[row]) for key, row in zip(table["key"].to_pylist(), table["row"].to_pylist())}


def refused(out, *words):
    """open_embeddings(out), and reading every row, ends in one EmbeddingsError sentence holding `words`."""
    with pytest.raises(EmbeddingsError) as caught:
        emb = open_embeddings(out)
        for i in range(len(emb)):
            emb[i]
    message = str(caught.value)
    assert "\n" not in message and message.endswith("."), message
    for word in words:
        assert word in message, message
    return message


def test_a_table_in_another_order_still_pairs_each_key_with_its_own_vectors(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    want = by_hand(out)
    table = pq.read_table(out / "part-0.parquet")
    pq.write_table(table.take([3, 0, 2, 1]), out / "part-0.parquet")
    emb = open_embeddings(out)
    assert emb.keys == ["a0000", "a0001", "a0002", "a0003"]  # row order, as written
    for key, (patches, pooled) in want.items():
        np.testing.assert_array_equal(emb[key].patches, patches)
        np.testing.assert_array_equal(emb[key].pooled, pooled)
    assert emb.metadata()["row"].to_pylist() == [0, 1, 2, 3]
    for batch in emb.batches(batch_size=4):
        for key, grid in zip(batch.keys, batch.patches):
            np.testing.assert_array_equal(grid, want[key][0])


@pytest.mark.parametrize(
    "rows, words",
    [
        ([0, 1, 3], ["row column", "0 to 2"]),  # a row missing: a key would take its neighbour's vectors
        ([0, 1, 1, 3], ["row column", "repeated"]),
    ],
)
def test_a_table_missing_or_repeating_rows_is_refused(made, tmp_path, rows, words):
    out = damaged_copy(made / "array", tmp_path)
    table = pq.read_table(out / "part-0.parquet")
    pq.write_table(table.take(rows), out / "part-0.parquet")
    refused(out, "part-0.parquet", *words)


def test_a_table_with_more_rows_than_the_arrays_is_refused_not_an_index_error(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    table = pq.read_table(out / "part-0.parquet")
    extra = table.slice(0, 1).set_column(0, "key", pa.array(["ghost"])).set_column(1, "row", pa.array([4], pa.int64()))
    pq.write_table(pa.concat_tables([table, extra]), out / "part-0.parquet")
    refused(out, "holds 4 rows", "part-0.parquet 5")


def test_an_array_with_more_rows_than_the_table_is_refused(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    pooled = np.load(out / "part-0.pooled.npy")
    np.save(out / "part-0.pooled.npy", np.concatenate([pooled, pooled[:1]]))
    refused(out, "part-0.pooled.npy holds 5 rows")


def test_an_array_of_the_wrong_rank_is_refused(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    patches = np.load(out / "part-0.patches.npy")
    np.save(out / "part-0.patches.npy", patches.reshape(4, 16, 32))  # [N, h*w, D]: the grid lost
    refused(out, "part-0.patches.npy", "[4, 16, 32]", "[N, h, w, D]")


def test_a_truncated_npy_is_refused(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    path = out / "part-0.patches.npy"
    os.truncate(path, path.stat().st_size - 100)
    refused(out, "part-0.patches.npy", "not a readable .npy")


def test_a_pickled_npy_is_refused_and_never_unpickled(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    np.save(out / "part-0.pooled.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    refused(out, "part-0.pooled.npy", "Python objects")


def test_a_garbage_parquet_is_refused(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    (out / "part-0.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    refused(out, "part-0.parquet", "not a readable Parquet")


# Tables bound to their own arrays: equal row counts are not enough


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, made):
    """OUT_DIRs (array with int8 and pooled vectors, embedding-reader) of two 4-image shards of one model."""
    root = tmp_path_factory.mktemp("two-shards")
    write_shard(root / "in" / "part-0.tar", photo_samples("a", 4))
    write_shard(root / "in" / "part-2.tar", photo_samples("c", 4, seed=2))
    for layout, dtype in (("array", "int8"), ("embedding-reader", "float32")):
        embed_shards(str(root / "in"), root / layout, made / "a.safetensors", layout=layout, **{**SETTINGS, "dtype": dtype})
    return root


def test_each_row_carries_the_crc32_of_its_stored_bytes_in_every_array(two_shards):
    out = two_shards / "array"
    table = pq.read_table(out / "part-2.parquet")
    record = json.loads((out / "part-2.json").read_text())
    parts = ("patches", "patches_scale", "pooled", "pooled_scale")
    for row, digests in zip(table["row"].to_pylist(), table["crc32"].to_pylist()):
        assert sorted(dict(digests)) == sorted(parts)
        for part in parts:  # computed here from np.load, apart from the writer's running sums
            assert dict(digests)[part] == zlib.crc32(np.load(out / f"part-2.{part}.npy")[row].tobytes())
    arrays = [file for file in record["files"] if file.endswith(".npy")]  # the table may be rewritten: no size
    assert record["sizes"] == {file: (out / file).stat().st_size for file in arrays} and len(arrays) == 4


@pytest.mark.parametrize(
    "layout, files",
    [
        ("embedding-reader", ["img_emb/img_emb_part-0.npy", "img_emb/img_emb_part-2.npy"]),
        ("array", ["part-0.pooled.npy", "part-2.pooled.npy"]),
        ("array", ["part-0.patches.npy", "part-2.patches.npy"]),
        ("array", ["part-0.pooled_scale.npy", "part-2.pooled_scale.npy"]),
    ],
)
def test_arrays_of_equal_length_swapped_between_shards_are_refused_at_open(two_shards, tmp_path, layout, files):
    out = damaged_copy(two_shards / layout, tmp_path)
    first, second = (out / f for f in files)
    assert first.stat().st_size == second.stat().st_size  # equal length: row counts and sizes agree
    swapped = tmp_path / "swap"
    first.rename(swapped), second.rename(first), swapped.rename(second)
    with pytest.raises(EmbeddingsError) as caught:
        open_embeddings(out)  # at open: no row need be read for the swap to show
    message = str(caught.value)
    assert f"{first} row 0 is not the data" in message and "swapped" in message and "\n" not in message, message


@pytest.mark.parametrize("damage", ["column dropped", "column of text"])
def test_a_table_whose_crc32_column_was_dropped_or_replaced_is_refused(two_shards, tmp_path, damage):
    out = damaged_copy(two_shards / "array", tmp_path)
    table = pq.read_table(out / "part-2.parquet")  # the schema metadata, which describes the column, is kept
    index = table.column_names.index("crc32")
    if damage == "column dropped":
        table = table.remove_column(index)
    else:
        table = table.set_column(index, "crc32", pa.array(["0"] * table.num_rows))
    pq.write_table(table, out / "part-2.parquet")
    refused(out, "part-2.parquet", "crc32 column")


def test_a_damaged_middle_row_is_refused_when_read_and_the_other_rows_still_read(two_shards, tmp_path):
    out = damaged_copy(two_shards / "array", tmp_path)
    path = out / "part-2.patches.npy"
    values = np.load(path, mmap_mode="r")
    row_bytes, header = values[0].nbytes, path.stat().st_size - values.nbytes
    with open(path, "r+b") as f:  # one byte of row 2 of 4 changed in place: sizes and row counts unchanged
        f.seek(header + 2 * row_bytes + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    emb = open_embeddings(out)  # the first and last rows are intact
    good = open_embeddings(two_shards / "array")
    start = emb.keys.index("c0000")
    for row in (0, 1, 3):
        np.testing.assert_array_equal(emb[start + row].patches, good[start + row].patches)
    refused(out, f"{path} row 2 is not the data part-2.parquet was written with")


@pytest.mark.parametrize("layout, file", [("array", "part-2.pooled.npy"), ("tar", "part-0.tar")])
def test_a_data_file_grown_since_it_was_written_is_refused(two_shards, made, tmp_path, layout, file):
    out = damaged_copy((two_shards if layout == "array" else made) / layout, tmp_path)
    with open(out / file, "ab") as f:
        f.write(bytes(1024))  # appended by a sync tool: every row and sample still reads
    refused(out, f"{file} is", "bytes")  # an .npy is also refused by its own header's size, before NAME.json's


def test_tables_with_their_crc32_column_still_read_elsewhere(two_shards):
    table = pq.read_table(two_shards / "embedding-reader" / "metadata")  # a folder of tables, as pyarrow reads it
    assert table.num_rows == 8 and table.schema.field("crc32").type == pa.map_(pa.string(), pa.uint32())


@pytest.mark.parametrize("cut", ["inside the last member", "between two samples", "inside a header"])
def test_a_truncated_output_tar_is_refused(made, tmp_path, cut):
    out = damaged_copy(made / "tar", tmp_path)
    path = out / "part-0.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last_sample = next(m for m in members if m.name.startswith("a0003."))
    size = {
        "inside the last member": members[-1].offset_data + members[-1].size // 2,
        "between two samples": last_sample.offset,
        "inside a header": last_sample.offset + 100,
    }[cut]
    os.truncate(path, size)
    refused(out, "part-0.tar")


def test_a_fifo_named_like_a_done_record_is_refused_without_blocking(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    os.mkfifo(out / "zz.json")
    err = within(10, lambda: open_embeddings(out), out / "zz.json")
    assert isinstance(err, EmbeddingsError) and "zz.json is a FIFO" in str(err)


def test_a_fifo_in_place_of_a_data_file_is_refused_without_blocking(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    (out / "part-0.pooled.npy").unlink()
    os.mkfifo(out / "part-0.pooled.npy")
    err = within(10, lambda: open_embeddings(out), out / "part-0.pooled.npy")
    assert isinstance(err, EmbeddingsError) and "part-0.pooled.npy is a FIFO" in str(err)


@pytest.mark.parametrize("name", ["part-0.json", "_stats/summary.json"])
def test_the_job_reads_its_records_by_the_same_rules_and_never_blocks(made, tmp_path, name):
    out = damaged_copy(made / "array", tmp_path)
    (out / name).unlink()
    os.mkfifo(out / name)
    run = partial(embed_shards, str(made / "in" / "part-0.tar"), out, made / "a.safetensors", layout="array", **SETTINGS)
    outcome = within(60, run, out / name)
    if name == "part-0.json":  # a FIFO in place of a shard's record marks nothing done: the shard is redone
        assert outcome.completed == ["part-0"] and outcome.job["embedded"] == 4
        assert (out / name).is_file() and len(open_embeddings(out)) == 4
    else:  # a name the job writes whatever its shards are called: refused before any work, left as it is
        assert isinstance(outcome, OutputDirError) and "summary.json is a FIFO" in str(outcome)
        assert stat.S_ISFIFO(os.lstat(out / name).st_mode)


def test_a_done_record_linked_to_dev_zero_is_refused(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    os.symlink("/dev/zero", out / "zz.json")
    err = within(10, lambda: open_embeddings(out))
    assert isinstance(err, EmbeddingsError) and "zz.json leads outside" in str(err)


def test_links_leading_out_of_out_dir_are_refused(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(out / "part-0.patches.npy", outside / "part-0.patches.npy")
    os.symlink(outside / "part-0.patches.npy", out / "part-0.patches.npy")
    refused(out, "part-0.patches.npy leads outside")
    (out / "part-0.patches.npy").unlink()
    shutil.move(outside / "part-0.patches.npy", out / "part-0.patches.npy")
    os.symlink("part-0.patches.npy", out / "inside.npy")  # a link that stays inside is followed
    assert len(open_embeddings(out)) == 4


def test_a_hand_edited_done_record_is_refused_in_one_sentence(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    record = json.loads((out / "part-0.json").read_text())
    (out / "part-0.json").write_text(json.dumps({**record, "files": record["files"] + ["../../etc/passwd"]}))
    refused(out, "part-0.json", "files")
    (out / "part-0.json").write_text(json.dumps({**record, "embedded": 9}))
    refused(out, "counts 9 embedded")


def test_shards_of_different_models_are_refused_not_mixed(made, tmp_path):
    out = damaged_copy(made / "array", tmp_path)
    for path in (made / "other").glob("part-1.*"):
        shutil.copy(path, out / path.name)
    assert len(open_embeddings(made / "other")) == 2  # each set reads on its own
    refused(out, "mixes shards", "model_sha256")


def test_a_pca_file_that_is_not_the_projection_is_refused_by_the_reader(made, tmp_path):
    out = damaged_copy(made / "pca", tmp_path)
    assert open_embeddings(out).pca.shape == (5, 32)
    np.save(out / "pca.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(out, "pca.npy", "Python objects")
    np.save(out / "pca.npy", np.ones((9, 32), np.float32))
    refused(out, "pca.npy holds 8 axes, the shards were projected on 4")
    np.save(out / "pca.npy", np.ones((5, 32), np.float32))  # the right shape, another projection
    refused(out, "pca.npy is not the projection")


def embed_cli(made, out, model, *extra):
    return CliRunner().invoke(
        app, ["embed", str(made / "in" / "part-0.tar"), str(out), "--model", str(model), "--workers", "0",
              "--batch-size", "3", "--dtype", "float32", "--pooled", "--layout", "array", *extra],
    )  # fmt: skip


@pytest.mark.parametrize(
    "matrix, words",
    [
        (np.ones((5, 16), np.float32), "projects 16-dimensional vectors, the model gives 32"),
        (np.array([{"a": 1}] * 5, dtype=object), "Python objects"),
    ],
)
def test_a_wrong_pca_file_stops_the_job_in_one_sentence_and_loses_nothing(made, tmp_path, matrix, words):
    out = damaged_copy(made / "pca", tmp_path)
    np.save(out / "pca.npy", matrix, allow_pickle=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = embed_cli(made, out, made / "a.safetensors", "--pca", "4")
    assert result.exit_code == 2, result.output
    assert words in result.stderr and "pca.npy" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_model_that_overflows_stops_pca_in_one_sentence(made, tmp_path):
    encoder = tiny_encoder()
    with torch.no_grad():
        encoder.patch_embed.proj.weight.mul_(1e36)  # finite weights whose activations overflow to inf, then NaN
    model = save_encoder(tmp_path / "overflow.safetensors", encoder, info_from_encoder(encoder, arch="vit_test"))
    result = embed_cli(made, tmp_path / "out", model, "--pca", "4")
    assert result.exit_code == 2, result.output
    assert "non-finite" in result.stderr and len(result.stderr.strip().splitlines()) == 1
