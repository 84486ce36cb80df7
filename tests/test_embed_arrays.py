"""Self-describing array outputs: Parquet schema metadata, --layers in the array layout, the embedding-reader layout."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_helpers import photo_samples, write_encoder_file, write_shard

from dmt_jepa.serve import OutputDirError, embed_shards, open_embeddings
from dmt_jepa.serve.api import preprocess_for
from dmt_jepa.serve.backends import load_backend
from dmt_jepa.serve.images import prepare
from dmt_jepa.serve.layouts import SCHEMA_METADATA_KEY
from dmt_jepa.serve.reader import EmbeddingsError


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Shard a with 3 photos, shard b whose only sample is not an image (nothing embedded)."""
    root = tmp_path_factory.mktemp("in")
    write_shard(root / "a.tar", photo_samples("a", 3))
    write_shard(root / "b.tar", [("broken", {"png": b"not a png", "cls": b"1"})])
    return root


def _embed(inputs, out, encoder_file, **settings):
    return embed_shards(str(inputs), out, encoder_file, workers=0, **settings)


@pytest.fixture(scope="module")
def int8_layers(tmp_path_factory, inputs, encoder_file):
    out = tmp_path_factory.mktemp("int8") / "out"
    _embed(inputs, out, encoder_file, layout="array", dtype="int8", pooled=True, layers=(0, -1))
    return out


def test_schema_metadata_alone_gives_the_float32_vectors(int8_layers):
    table = pq.read_table(int8_layers / "a.parquet")
    meta = json.loads(table.schema.metadata[SCHEMA_METADATA_KEY])
    record = json.loads((int8_layers / "a.json").read_text())
    assert (meta["dtype"], meta["dim"], meta["grid"], meta["layers"]) == ("int8", 32, [4, 4], [0, 1])
    assert meta["model"]["sha256"] == record["model"]["sha256"] and meta["identity"] == record["identity"]
    assert "scale" in meta["dequantize"]
    assert sorted(meta["arrays"]) == sorted(
        ["patches", "patches_scale", "pooled", "pooled_scale", "layer_0", "layer_0_scale", "layer_1", "layer_1_scale"]
    )
    assert meta["arrays"]["layer_0"] == {"file": "a.layer_0.npy", "dtype": "int8", "shape": ["N", 4, 4, 32]}
    # What a reader without dmt-jepa does: the files and the rule from the metadata, rows by the `row` column.
    emb = open_embeddings(int8_layers)
    for stem in ("patches", "pooled", "layer_0", "layer_1"):
        values = np.load(int8_layers / meta["arrays"][stem]["file"])
        scale = np.load(int8_layers / meta["arrays"][f"{stem}_scale"]["file"])
        assert values.dtype == np.int8 and scale.dtype == np.float32
        for key, row in zip(table.column("key").to_pylist(), table.column("row").to_pylist()):
            vector = values[row].astype(np.float32) * scale[row][..., None]
            item = emb[key]
            want = {"patches": item.patches, "pooled": item.pooled}.get(stem)
            want = item.layers[int(stem[-1])] if want is None else want
            np.testing.assert_array_equal(vector, want)


def test_array_layers_are_the_backends_blocks_in_every_layout(tmp_path, inputs, encoder_file, int8_layers):
    _embed(inputs, tmp_path / "array", encoder_file, layout="array", dtype="float32", layers=(0, -1))
    _embed(inputs, tmp_path / "tar", encoder_file, layout="tar", dtype="float32", layers=(0, -1))
    array, tar, int8 = open_embeddings(tmp_path / "array"), open_embeddings(tmp_path / "tar"), open_embeddings(int8_layers)
    assert json.loads((tmp_path / "array" / "a.json").read_text())["files"] == [
        "a.patches.npy", "a.layer_0.npy", "a.layer_1.npy", "a.parquet",
    ]  # fmt: skip
    backend = load_backend(encoder_file, layers=[0])
    prep = preprocess_for(backend)
    for key, members in photo_samples("a", 3):
        a, t, q = array[key], tar[key], int8[key]
        assert sorted(a.layers) == sorted(t.layers) == [0, 1]
        np.testing.assert_array_equal(a.layers[1], a.patches)  # the last block after the norm is the grid
        for i in (0, 1):
            np.testing.assert_array_equal(a.layers[i], t.layers[i])
            cos = (
                (a.layers[i] * q.layers[i]).sum(-1) / np.linalg.norm(a.layers[i], axis=-1) / np.linalg.norm(q.layers[i], axis=-1)
            )
            assert cos.min() > 0.99  # int8 against float32, vector by vector
        image = next(v for e, v in members.items() if e in ("png", "jpg"))
        _, _, first = backend.run_pixels(np.array(prepare(image, prep)[0][None]))
        np.testing.assert_allclose(a.layers[0], first[0], atol=1e-4)
    batch = next(array.batches(8))
    np.testing.assert_array_equal(batch.layers[0][1], array[batch.keys[1]].layers[0])


def test_embedding_reader_reads_the_folders(tmp_path, inputs, encoder_file):
    embedding_reader = pytest.importorskip("embedding_reader", reason="the embedding-reader library is not installed")
    out = tmp_path / "out"
    _embed(inputs, out, encoder_file, layout="embedding-reader", dtype="float32")
    _embed(inputs, tmp_path / "array", encoder_file, layout="array", dtype="float32", pooled=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if "_stats" not in p.parts) == [
        "a.json",
        "b.json",
        "img_emb",
        "img_emb/img_emb_a.npy",
        "metadata",
        "metadata/metadata_a.parquet",
    ]  # fmt: skip: shard b embedded nothing, so it has no file the library would pair wrongly
    reader = embedding_reader.EmbeddingReader(
        str(out / "img_emb"), file_format="parquet_npy", meta_columns=["key"], metadata_folder=str(out / "metadata")
    )
    assert (reader.count, reader.dimension) == (3, 32)
    got = {}
    for vectors, meta in reader(batch_size=2, show_progress=False):
        got.update(zip(meta["key"], vectors))
    reference = open_embeddings(tmp_path / "array")  # pooled vectors written by the other array layout
    assert sorted(got) == sorted(reference.keys)
    for key, vector in got.items():
        np.testing.assert_array_equal(vector, reference[key].pooled)
    emb = open_embeddings(out)
    assert len(emb) == 3 and emb[0].patches is None
    np.testing.assert_array_equal(emb.pooled(), np.stack([reference[k].pooled for k in emb.keys]))
    meta = json.loads(pq.read_schema(out / "metadata" / "metadata_a.parquet").metadata[SCHEMA_METADATA_KEY])
    assert meta["layout"] == "embedding-reader" and meta["arrays"]["pooled"]["file"] == "img_emb/img_emb_a.npy"


@pytest.mark.parametrize(
    "settings, message", [({"dtype": "int8"}, "float16 or float32"), ({"layers": (0,)}, "pooled vectors only")]
)
def test_embedding_reader_refuses_what_it_cannot_hold(tmp_path, inputs, encoder_file, settings, message):
    with pytest.raises(ValueError, match=message):
        _embed(inputs, tmp_path / "out", encoder_file, layout="embedding-reader", **settings)


@pytest.mark.parametrize("kind", ["link", "file"])
def test_embedding_reader_folders_must_be_its_own(tmp_path, inputs, encoder_file, kind):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    if kind == "link":
        (out / "img_emb").symlink_to(elsewhere)
    else:
        (out / "metadata").write_text("a file where the folder goes")
    with pytest.raises(OutputDirError, match=f"is a {kind}, where `dmtjepa embed` writes a folder of its own"):
        _embed(inputs, out, encoder_file, layout="embedding-reader")
    assert not list(elsewhere.iterdir()) and not (out / "a.json").exists()


def test_rerun_with_other_layers_refuses_then_overwrite_leaves_no_stale_layer(tmp_path, inputs, encoder_file):
    out = tmp_path / "out"
    _embed(inputs, out, encoder_file, layout="array", layers=(0,))
    with pytest.raises(OutputDirError, match="layers"):
        _embed(inputs, out, encoder_file, layout="array", layers=(1,))
    assert (out / "a.layer_0.npy").exists()
    _embed(inputs, out, encoder_file, layout="array", layers=(1,), overwrite=True)
    assert not (out / "a.layer_0.npy").exists() and (out / "a.layer_1.npy").exists()
    assert sorted(open_embeddings(out)[0].layers) == [1]
    _embed(inputs, out, encoder_file, layout="embedding-reader", overwrite=True)  # to another layout: array files go
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["a.json", "b.json"]


def test_reader_refuses_layers_that_lie(tmp_path, inputs, encoder_file):
    out = tmp_path / "out"
    _embed(inputs, out, encoder_file, layout="array", layers=(0,))
    record = json.loads((out / "a.json").read_text())
    (out / "a.json").write_text(json.dumps({**record, "layers": [0, 1]}))
    with pytest.raises(EmbeddingsError, match="records layers"):
        open_embeddings(out)
    (out / "a.json").write_text(json.dumps(record))
    grid = np.load(out / "a.layer_0.npy")
    np.save(out / "a.layer_0.npy", grid[:, :2])  # a grid of another size than the patches'
    with pytest.raises(EmbeddingsError, match="differ in width or grid"):
        open_embeddings(out)
    (out / "a.json").write_text(json.dumps({**record, "files": [*record["files"], "../a.layer_0.npy"]}))
    with pytest.raises(EmbeddingsError, match="not a done record"):
        open_embeddings(out)
