"""Output layouts and dtypes read back through `open_embeddings`, against float32 references."""

import io
import json

import numpy as np
import pytest
from embed_helpers import image_bytes, photo_samples, read_output, write_encoder_file, write_shard

from dmt_jepa.serve import OutputDirError, embed_images, embed_shards, open_embeddings
from dmt_jepa.serve.quantize import decode, encode


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_encoder_file(tmp_path_factory.mktemp("model") / "enc.safetensors")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards whose samples carry cls, json and txt members, one too large to carry."""
    root = tmp_path_factory.mktemp("in")
    made = {}
    for s in range(2):
        samples = photo_samples(f"s{s}_", 4, seed=s)
        for i, (key, members) in enumerate(samples):
            members["json"] = json.dumps({"url": f"http://x/{key}", "i": i}).encode()
            members["txt"] = b"x" * (5000 if (s, i) == (1, 2) else 10)
        made[f"part-{s}"] = samples
        write_shard(root / f"part-{s}.tar", samples)
    return root, made


@pytest.fixture(scope="module")
def reference(shards, encoder_file):
    """float32 patch grids per key, from the in-memory API (pinned to PyTorch in test_embed_job)."""
    _, made = shards
    out = {}
    for samples in made.values():
        images = [next(v for e, v in m.items() if e in ("png", "jpg")) for _, m in samples]
        for (key, _), grid in zip(samples, embed_images(encoder_file, images), strict=True):
            out[key] = grid
    return out


def run(shards, encoder_file, out, **settings):
    root, _ = shards
    summary = embed_shards(str(root / "part-{0..1}.tar"), out, encoder_file, workers=0, batch_size=3, **settings)
    assert summary.failed == 0 and summary.embedded == 8
    return open_embeddings(out)


def assert_close_to(stored: np.ndarray, want: np.ndarray, dtype: str) -> None:
    """Each dtype's documented bound: float32 as computed, float16 its rounding, int8 half a scale step."""
    if dtype == "float32":
        np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-5)
    elif dtype == "float16":
        np.testing.assert_allclose(stored, want, rtol=2**-10, atol=1e-4)
    else:
        step = np.abs(want).max(axis=-1, keepdims=True) / 127
        assert (np.abs(stored - want) <= step / 2 + 1e-4 * step + 1e-6).all()
    cosine = (stored * want).sum(-1) / np.linalg.norm(stored, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() > 0.999


@pytest.mark.parametrize("layout", ["tar", "array"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_every_layout_and_dtype_reads_back_within_its_bound(tmp_path, shards, encoder_file, reference, layout, dtype):
    emb = run(shards, encoder_file, tmp_path / "out", layout=layout, dtype=dtype, pooled=True)
    keys = [key for _, samples in sorted(shards[1].items()) for key, _ in samples]
    assert len(emb) == 8 and emb.keys == keys
    for key in keys:
        item = emb[key]
        assert item.key == key and item.patches.shape == (4, 4, 32)
        assert_close_to(item.patches, reference[key], dtype)
        assert_close_to(item.pooled, reference[key].mean((0, 1)), dtype)
    batches = list(emb.batches(batch_size=3))
    assert [len(b.keys) for b in batches] == [3, 1, 3, 1]  # never across shards
    np.testing.assert_array_equal(np.concatenate([b.patches for b in batches]), np.stack([emb[k].patches for k in keys]))
    np.testing.assert_array_equal(emb.pooled(), np.stack([emb[i].pooled for i in range(8)]))
    grid, meta = emb.dataset()[5]
    assert grid.shape == (4, 4, 32) and meta["key"] == keys[5] and meta["shard"] == "part-1"


def test_float32_layouts_hold_the_same_values_and_arrays_memmap(tmp_path, shards, encoder_file):
    tar = run(shards, encoder_file, tmp_path / "t", layout="tar", dtype="float32", pooled=True)
    arr = run(shards, encoder_file, tmp_path / "a", layout="array", dtype="float32", pooled=True)
    raw = read_output(tmp_path / "t" / "part-0.tar")
    mapped = np.load(tmp_path / "a" / "part-0.patches.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.shape == (4, 4, 4, 32) and mapped.dtype == np.float32
    for row, key in enumerate(sorted(raw)):
        np.testing.assert_array_equal(mapped[row], np.load(io.BytesIO(raw[key]["emb.npy"])))
    np.testing.assert_array_equal(tar.pooled(), arr.pooled())
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file()) == sorted(
        f"part-{s}.{ext}" for s in range(2) for ext in ("json", "parquet", "patches.npy", "pooled.npy")
    )


def test_int8_stores_a_scale_per_vector(tmp_path, shards, encoder_file):
    run(shards, encoder_file, tmp_path / "a", layout="array", dtype="int8")
    values = np.load(tmp_path / "a" / "part-0.patches.npy")
    scale = np.load(tmp_path / "a" / "part-0.patches_scale.npy")
    assert values.dtype == np.int8 and scale.shape == (4, 4, 4) and scale.dtype == np.float32
    assert (np.abs(values).max(-1) == 127).all()  # each vector uses the full range


def test_int8_encoding_by_hand():
    vectors = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]], np.float32)
    values, scale = encode(vectors, "int8")
    np.testing.assert_array_equal(values, [[64, -127, 32], [0, 0, 0]])  # 0.5 * 127 = 63.5 rounds to even 64
    np.testing.assert_allclose(scale, [1 / 127, 0])
    np.testing.assert_allclose(decode(values, scale), [[64 / 127, -1, 32 / 127], [0, 0, 0]], rtol=1e-6)


@pytest.mark.parametrize("layout", ["tar", "array"])
def test_pooled_only_writes_no_patch_grids(tmp_path, shards, encoder_file, reference, layout):
    emb = run(shards, encoder_file, tmp_path / "out", layout=layout, dtype="float32", pooled_only=True)
    assert emb["s0_0001"].patches is None
    np.testing.assert_allclose(emb["s0_0001"].pooled, reference["s0_0001"].mean((0, 1)), atol=1e-5)
    if layout == "array":
        assert not list((tmp_path / "out").glob("*.patches.npy"))
    else:
        members = read_output(tmp_path / "out" / "part-0.tar").values()
        assert all(set(m) == {"pooled.npy", "json", "in.cls", "in.json", "in.txt"} for m in members)


@pytest.mark.parametrize("layout", ["tar", "array"])
def test_non_image_members_are_carried_up_to_the_bound(tmp_path, shards, encoder_file, layout):
    _, made = shards
    emb = run(shards, encoder_file, tmp_path / "out", layout=layout, max_carried_bytes=4096)
    table = emb.metadata()
    assert table.column_names[:3] == ["shard", "key", "row"] and table.num_rows == 8
    rows = {row["key"]: row for row in table.to_pylist()}
    for samples in made.values():
        for key, members in samples:
            carried = dict(rows[key]["members"])
            want = {e: v for e, v in members.items() if e not in ("png", "jpg") and len(v) <= 4096}
            assert carried == want
            assert rows[key]["not_carried"] == (["txt"] if len(members["txt"]) > 4096 else [])
            assert rows[key]["grid"] == [4, 4] and rows[key]["input_size"] == [64, 64]
    assert emb["s1_0002"].metadata["not_carried"] == ["txt"]


def test_carrying_off_keeps_the_old_tar_members(tmp_path, encoder_file):
    write_shard(tmp_path / "in" / "s.tar", [("a", {"png": image_bytes(70, 70), "cls": b"1"})])
    embed_shards(str(tmp_path / "in"), tmp_path / "out", encoder_file, workers=0, max_carried_bytes=0)
    assert set(read_output(tmp_path / "out" / "s.tar")["a"]) == {"emb.npy", "json"}


def test_pca_projects_on_the_principal_axes_of_the_jobs_patches_and_a_new_dim_is_refused(
    tmp_path, shards, encoder_file, reference
):
    emb = run(shards, encoder_file, tmp_path / "out", layout="array", dtype="float32", pca=8, pooled=True)
    patches = np.concatenate([grid.reshape(-1, 32) for grid in reference.values()]).astype(np.float64)
    centred = patches - patches.mean(0)
    _, eigenvectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: the top 8 are last
    top = eigenvectors[:, ::-1][:, :8]
    mean, axes = emb.pca[0], emb.pca[1:]
    np.testing.assert_allclose(mean, patches.mean(0), atol=1e-5)
    np.testing.assert_allclose(np.abs(axes @ top), np.eye(8), atol=1e-3)  # the same axes, up to sign
    for key in emb.keys:
        want = (reference[key] - mean) @ axes.T
        np.testing.assert_allclose(emb[key].patches, want, atol=1e-4)
        np.testing.assert_allclose(emb[key].pooled, want.mean((0, 1)), atol=1e-4)
    kept = np.linalg.norm(emb.unproject(emb["s0_0000"].patches) - mean, axis=-1)
    assert (kept <= np.linalg.norm(reference["s0_0000"] - mean, axis=-1) + 1e-4).all()  # a projection only shrinks
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    with pytest.raises(OutputDirError, match="pca 8, this run has 4"):
        run(shards, encoder_file, tmp_path / "out", layout="array", dtype="float32", pca=4, pooled=True)
    again = embed_shards(str(shards[0] / "part-{0..1}.tar"), tmp_path / "out", encoder_file, workers=0, layout="array",
                         dtype="float32", pca=8, pooled=True)  # fmt: skip
    assert again.skipped == ["part-0", "part-1"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


@pytest.mark.parametrize("layout", ["tar", "array"])
def test_an_fsspec_out_dir_holds_the_same_bytes_as_a_local_one(tmp_path, shards, encoder_file, layout):
    import fsspec

    root, _ = shards
    settings = dict(workers=0, batch_size=3, layout=layout, dtype="int8", pooled=True)
    embed_shards(str(root / "part-{0..1}.tar"), tmp_path / "local", encoder_file, **settings)
    url = f"memory://embed-test-{layout}/out"
    remote = embed_shards(str(root / "part-{0..1}.tar"), url, encoder_file, **settings)
    assert remote.completed == ["part-0", "part-1"] and remote.job["embedded"] == 8
    fs = fsspec.filesystem("memory")
    listing = fs.ls(f"/embed-test-{layout}/out", detail=True)
    stored = {e["name"].rsplit("/", 1)[-1]: fs.cat_file(e["name"]) for e in listing if e["type"] == "file"}
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir() if p.is_file()}
    assert stored == local and len(local) == (4 if layout == "tar" else 12)
    assert fs.exists(f"/embed-test-{layout}/out/_stats/summary.json")
    again = embed_shards(str(root / "part-{0..1}.tar"), url, encoder_file, **settings)
    assert again.skipped == ["part-0", "part-1"] and again.embedded == 0
    file_url = embed_shards(str(root / "part-{0..1}.tar"), f"file://{tmp_path}/viafile", encoder_file, **settings)
    assert file_url.completed == ["part-0", "part-1"]
    via_file = {p.name: p.read_bytes() for p in (tmp_path / "viafile").iterdir() if p.is_file()}
    assert via_file == local


def test_a_remote_shard_without_its_done_marker_is_not_done(tmp_path, shards, encoder_file):
    import fsspec

    root, _ = shards
    url = "memory://embed-test-marker/out"
    embed_shards(str(root / "part-{0..1}.tar"), url, encoder_file, workers=0)
    fs = fsspec.filesystem("memory")
    fs.rm("/embed-test-marker/out/part-1.json")  # as if killed between the data upload and the marker
    again = embed_shards(str(root / "part-{0..1}.tar"), url, encoder_file, workers=0)
    assert again.skipped == ["part-0"] and again.completed == ["part-1"]
    assert json.loads(fs.cat_file("/embed-test-marker/out/part-1.json"))["embedded"] == 4


def test_a_remote_shard_is_published_data_first_and_its_done_marker_last(tmp_path, shards, encoder_file, monkeypatch):
    from dmt_jepa.serve.remote import RemoteOut

    pushed = []
    original = RemoteOut.push
    monkeypatch.setattr(RemoteOut, "push", lambda self, relative: (pushed.append(relative), original(self, relative)))
    root, _ = shards
    embed_shards(str(root / "part-{0..1}.tar"), "memory://embed-test-order/out", encoder_file, workers=0,
                 layout="array", dtype="int8", pooled=True)  # fmt: skip
    for name in ("part-0", "part-1"):
        marker = pushed.index(f"{name}.json")
        data = [i for i, p in enumerate(pushed) if p.startswith(f"{name}.") and p != f"{name}.json"]
        assert len(data) == 5 and max(data) < marker
