"""The calibrated int8 cache: a model is reused only for the same graph, pixels and versions, and only when intact."""

import multiprocessing
import os

import numpy as np
import pytest
from embed_helpers import TRAIN_SIZE, tiny_encoder, tiny_model_files, write_onnx_model

from dmt_jepa.encoder_file import info_from_encoder
from dmt_jepa.serve import calibration
from dmt_jepa.serve.calibration import CACHE_FOLDER, calibrated_int8, calibration_key, scene_pixels


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return tiny_model_files(tmp_path_factory.mktemp("models"))["onnx"]


@pytest.fixture(scope="module")
def fresh(onnx_model, tmp_path_factory):
    """The model calibration makes without any cache, stamped with its key, and its bytes."""
    key = calibration_key(onnx_model, pixels())
    out = calibration.quantize_static_int8(onnx_model, pixels(), info(), tmp_path_factory.mktemp("fresh") / "int8.onnx", key)
    return out.read_bytes()


def info():
    return info_from_encoder(tiny_encoder(), "vit_test")


def pixels(count: int = 6, seed: int = 0) -> np.ndarray:
    return scene_pixels(count, (TRAIN_SIZE, TRAIN_SIZE), seed=seed)


def entries(cache):
    folder = cache / CACHE_FOLDER
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def calibrations(monkeypatch) -> list:
    """Records each real calibration, so a test can tell a cache hit from a miss."""
    made = []
    real = calibration.quantize_static_int8

    def counted(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "quantize_static_int8", counted)
    return made


def test_a_second_calibration_of_the_same_inputs_comes_from_the_cache(onnx_model, fresh, tmp_path, monkeypatch):
    made = calibrations(monkeypatch)
    first = calibrated_int8(onnx_model, pixels(), info(), tmp_path / "a.onnx", cache=tmp_path / "cache")
    second = calibrated_int8(onnx_model, pixels(), info(), tmp_path / "b.onnx", cache=tmp_path / "cache")
    assert len(made) == 1
    assert first.read_bytes() == second.read_bytes() == fresh
    [name] = entries(tmp_path / "cache")
    assert name.startswith(calibration_key(onnx_model, pixels()) + "-")


def test_the_key_changes_with_every_input(onnx_model, tmp_path, monkeypatch):
    changed = tmp_path / "changed.onnx"
    data = bytearray(onnx_model.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    keys = {
        calibration_key(onnx_model, pixels()),
        calibration_key(changed, pixels()),
        calibration_key(onnx_model, pixels(seed=1)),
        calibration_key(onnx_model, pixels()[:5]),
        calibration_key(onnx_model, pixels().reshape(3, 2 * TRAIN_SIZE, TRAIN_SIZE, 3)),  # same bytes, other shape
    }
    monkeypatch.setattr(calibration, "_library_versions", lambda: "onnx 0, onnxruntime 0")
    keys.add(calibration_key(onnx_model, pixels()))
    monkeypatch.undo()
    monkeypatch.setattr(calibration, "QUANTISER_SETTINGS", "other settings")
    keys.add(calibration_key(onnx_model, pixels()))
    assert len(keys) == 7


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "link to another file", "folder"])
def test_a_damaged_entry_is_calibrated_again_never_run(onnx_model, fresh, tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    calibrated_int8(onnx_model, pixels(), info(), tmp_path / "a.onnx", cache=cache)
    [name] = entries(cache)
    entry = cache / CACHE_FOLDER / name
    if damage == "flipped byte":
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:1000])
    elif damage == "link to another file":
        other = tmp_path / "other.onnx"
        other.write_bytes(fresh[:-1] + bytes([fresh[-1] ^ 1]))
        entry.unlink()
        entry.symlink_to(other)
    else:
        entry.unlink()
        entry.mkdir()
    made = calibrations(monkeypatch)
    out = calibrated_int8(onnx_model, pixels(), info(), tmp_path / "b.onnx", cache=cache)
    assert len(made) == 1 and out.read_bytes() == fresh
    if damage != "folder":  # a folder in the way is left alone, and the cache simply not kept
        assert entry.is_file() and not entry.is_symlink() and entry.read_bytes() == fresh


def test_every_calibrated_model_carries_the_key_of_what_made_it(onnx_model, fresh, tmp_path):
    import onnx

    props = {p.key: p.value for p in onnx.load_from_string(fresh).metadata_props}
    source = {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}
    assert props == {**source, calibration.CALIBRATION_KEY_PROP: calibration_key(onnx_model, pixels())}
    uncached = calibrated_int8(onnx_model, pixels(), info(), tmp_path / "a.onnx", cache=None)
    assert uncached.read_bytes() == fresh  # with or without a cache, the same bytes


def poison(cache, onnx_model, tmp_path, kind) -> str:
    """Leave under the key of pixels() an entry whose name checks out but whose model is not the one for that key."""
    folder = cache / CACHE_FOLDER
    key = calibration_key(onnx_model, pixels())
    if kind == "another calibration renamed":  # another pixel set's model, under this key and its own content hash
        calibrated_int8(onnx_model, pixels(seed=1), info(), tmp_path / "other.onnx", cache=cache)
        [other] = entries(cache)
        data = (folder / other).read_bytes()
        (folder / other).unlink()
    else:  # a model made before entries carried their key
        data = calibration.quantize_static_int8(onnx_model, pixels(), info(), tmp_path / "old.onnx").read_bytes()
        folder.mkdir(parents=True)
    name = f"{key}-{calibration._content_hash(data)}.onnx"
    (folder / name).write_bytes(data)
    return name


@pytest.mark.parametrize("kind", ["another calibration renamed", "made before keys were stamped"])
def test_a_poisoned_or_stale_entry_is_deleted_and_calibrated_again_with_one_notice(
    onnx_model, fresh, tmp_path, monkeypatch, kind
):
    cache = tmp_path / "cache"
    bad = poison(cache, onnx_model, tmp_path, kind)
    made, notices = calibrations(monkeypatch), []
    out = calibrated_int8(onnx_model, pixels(), info(), tmp_path / "a.onnx", cache=cache, notices=notices)
    assert len(made) == 1 and out.read_bytes() == fresh  # calibrated again, never the entry's model
    [notice] = notices
    assert bad in notice and "deleted and the model calibrated again" in notice and "\n" not in notice
    [kept] = entries(cache)
    assert kept != bad and (cache / CACHE_FOLDER / kept).read_bytes() == fresh
    later = []
    assert calibrated_int8(onnx_model, pixels(), info(), tmp_path / "b.onnx", cache=cache, notices=later).read_bytes() == fresh
    assert len(made) == 1 and later == []  # the next run takes the good entry, silently


def test_a_poisoned_entry_reaches_the_user_as_one_backend_notice(onnx_model, tmp_path, monkeypatch):
    from dmt_jepa.serve.backends import load_backend

    monkeypatch.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path))
    bad = poison_for_backend(onnx_model, tmp_path)
    backend = load_backend(onnx_model, "onnxruntime-cpu", "int8-static")
    [notice] = backend.notices
    assert bad in notice and "calibrated again" in notice
    assert entries(tmp_path) and bad not in entries(tmp_path)


def test_a_cached_model_that_fails_the_first_batch_check_is_deleted_so_the_next_run_calibrates(
    onnx_model, tmp_path, tmp_path_factory, monkeypatch
):
    from dmt_jepa.serve.backends import BackendError, checked_run, load_backend
    from dmt_jepa.serve.calibration import DEFAULT_CALIBRATION_IMAGES

    # Another model's calibrated graph under this model's key, stamped with it too (a stale entry no check can
    # tell from a good one): only the first batch, compared with fp32, shows it.
    other_weights = write_onnx_model(tmp_path_factory.mktemp("other-model") / "other.onnx", tiny_encoder(seed=5))
    key = calibration_key(onnx_model, scene_pixels(DEFAULT_CALIBRATION_IMAGES, (TRAIN_SIZE, TRAIN_SIZE)))
    data = calibration.quantize_static_int8(other_weights, pixels(), info(), tmp_path / "stale.onnx", key).read_bytes()
    (tmp_path / CACHE_FOLDER).mkdir()
    (tmp_path / CACHE_FOLDER / f"{key}-{calibration._content_hash(data)}.onnx").write_bytes(data)
    monkeypatch.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path))
    batch = pixels(count=2, seed=3)
    with pytest.raises(BackendError, match="the cached calibrated model it ran was deleted") as caught:
        checked_run(load_backend(onnx_model, "onnxruntime-cpu", "int8-static"), batch)
    assert "\n" not in str(caught.value) and entries(tmp_path) == []
    made = calibrations(monkeypatch)
    _, worst = checked_run(load_backend(onnx_model, "onnxruntime-cpu", "int8-static"), batch)  # calibrated again
    assert len(made) == 1 and worst is not None and len(entries(tmp_path)) == 1


def poison_for_backend(onnx_model, tmp_path) -> str:
    """An entry under the key the onnxruntime backend computes (the default calibration set) holding a model
    calibrated on other images."""
    from dmt_jepa.serve.calibration import DEFAULT_CALIBRATION_IMAGES

    folder = tmp_path / CACHE_FOLDER
    folder.mkdir(parents=True)
    key = calibration_key(onnx_model, scene_pixels(DEFAULT_CALIBRATION_IMAGES, (TRAIN_SIZE, TRAIN_SIZE)))
    data = calibration.quantize_static_int8(onnx_model, pixels(), info(), tmp_path / "other.onnx", "0" * 64).read_bytes()
    name = f"{key}-{calibration._content_hash(data)}.onnx"
    (folder / name).write_bytes(data)
    return name


def test_a_cache_that_cannot_be_written_costs_only_the_time(onnx_model, fresh, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    out = calibrated_int8(onnx_model, pixels(), info(), tmp_path / "a.onnx", cache=blocked)
    assert out.read_bytes() == fresh

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(calibration.os, "replace", disk_full)
    out = calibrated_int8(onnx_model, pixels(), info(), tmp_path / "b.onnx", cache=tmp_path / "cache")
    assert out.read_bytes() == fresh
    assert os.listdir(tmp_path / "cache" / CACHE_FOLDER) == []  # the partial file went too


def test_the_least_recently_used_entries_go_and_foreign_files_stay(onnx_model, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "CACHE_ENTRIES", 2)
    cache = tmp_path / "cache"
    (cache / CACHE_FOLDER).mkdir(parents=True)
    (cache / CACHE_FOLDER / "notes.onnx").write_text("the user's own file")
    keys = [calibration_key(onnx_model, pixels(seed=s)) for s in range(3)]
    for seed in (0, 1):
        calibrated_int8(onnx_model, pixels(seed=seed), info(), tmp_path / "x.onnx", cache=cache)
    for age, name in enumerate(n for n in entries(cache) if n != "notes.onnx"):
        os.utime(cache / CACHE_FOLDER / name, (1e9 + age, 1e9 + age))  # distinct times, whatever the clock
    calibrated_int8(onnx_model, pixels(seed=0), info(), tmp_path / "x.onnx", cache=cache)  # a hit: now used last
    calibrated_int8(onnx_model, pixels(seed=2), info(), tmp_path / "x.onnx", cache=cache)
    kept = {name.split("-")[0] for name in entries(cache) if name != "notes.onnx"}
    assert kept == {keys[0], keys[2]}
    assert "notes.onnx" in entries(cache)


def _calibrate_into(model, cache, out):
    calibrated_int8(model, pixels(), info(), out, cache=cache)


def test_two_processes_calibrating_into_one_cache_leave_one_whole_entry(onnx_model, fresh, tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_calibrate_into, args=(onnx_model, tmp_path / "cache", tmp_path / f"{i}.onnx")) for i in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert (tmp_path / "0.onnx").read_bytes() == (tmp_path / "1.onnx").read_bytes() == fresh
    [name] = entries(tmp_path / "cache")  # no partial file left beside it
    assert (tmp_path / "cache" / CACHE_FOLDER / name).read_bytes() == fresh


def test_onnxruntime_static_int8_loads_from_the_cache_the_second_time(onnx_model, tmp_path, monkeypatch):
    from dmt_jepa.serve.backends import load_backend

    monkeypatch.setenv("DMT_JEPA_CACHE_DIR", str(tmp_path))
    made = calibrations(monkeypatch)
    images = np.random.default_rng(0).standard_normal((2, 3, TRAIN_SIZE, TRAIN_SIZE)).astype(np.float32)
    first = load_backend(onnx_model, "onnxruntime-cpu", "int8-static").run(images)
    second = load_backend(onnx_model, "onnxruntime-cpu", "int8-static").run(images)
    assert len(made) == 1 and len(entries(tmp_path)) == 1
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
