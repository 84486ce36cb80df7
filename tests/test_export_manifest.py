"""Export manifests: --overwrite removes only what an earlier export listed; a folder without one is never emptied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_hostile_outputs import files_under, one_sentence_refusal
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.encoder_file import info_from_encoder, save_encoder
from dmt_jepa.export.errors import ExportError
from dmt_jepa.export.out_dir import MANIFEST_FILENAME, read_manifest, replacing
from dmt_jepa.export.triton import parse_config
from dmt_jepa.models import VisionTransformer


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2).eval()
    return save_encoder(tmp_path_factory.mktemp("enc") / "enc.safetensors", encoder, info_from_encoder(encoder, "custom"))


def export(encoder: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["export", str(encoder), "--out", str(out), *extra])


def fake_export(out: Path, files: dict[str, str], *, overwrite: bool = False) -> None:
    """An export that writes `files` (relative path -> text), guarded as every export is."""
    with replacing(out, overwrite=overwrite):
        for name, text in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)


def listed(out: Path) -> list[str]:
    return sorted(json.loads((out / MANIFEST_FILENAME).read_text())["files"])


@pytest.mark.parametrize(
    "extra",
    [[], ["--overwrite"], ["--overwrite", "--format", "hf"], ["--overwrite", "--format", "triton", "--model-name", "src"]],
)
def test_a_folder_no_export_recorded_is_refused_whatever_the_flags(encoder_file, tmp_path, extra):
    project = tmp_path / "project"
    for name, text in {".git/HEAD": "ref: main", "src/model.onnx": "mine", "src/config.pbtxt": "mine", "notes.md": "x"}.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    before = files_under(project)
    # triton guards the model folder OUT/NAME, here project/src
    one_sentence_refusal(export(encoder_file, project, *extra), "no export recorded")
    assert files_under(project) == before and not (project / MANIFEST_FILENAME).exists()


@pytest.mark.parametrize("extra, folder", [(["--fp16"], ""), (["--format", "triton", "--model-name", "m"], "m")])
def test_the_manifest_lists_every_file_written_with_its_size_and_digest(encoder_file, tmp_path, extra, folder):
    assert export(encoder_file, tmp_path / "out", *extra).exit_code == 0
    unit = tmp_path / "out" / folder
    files = {p.relative_to(unit).as_posix(): p.read_bytes() for p in unit.rglob("*") if p.is_file()}
    files.pop(MANIFEST_FILENAME)
    assert len(files) >= 2
    assert read_manifest(unit) == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
    }


def test_overwrite_removes_only_listed_files_and_the_folders_they_leave_empty(tmp_path):
    out = tmp_path / "out"
    fake_export(out, {"a.txt": "1", "sub/b.txt": "1", "gone/c.txt": "1"})
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "mine.txt").write_text("mine")
    with pytest.raises(ExportError, match="add --overwrite"):
        fake_export(out, {"a.txt": "2"})
    fake_export(out, {"a.txt": "2"}, overwrite=True)
    assert files_under(out) == {
        MANIFEST_FILENAME: (out / MANIFEST_FILENAME).read_bytes(), "a.txt": b"2", "notes.txt": b"mine", "sub/mine.txt": b"mine",
    }  # fmt: skip
    assert listed(out) == ["a.txt"]


@pytest.mark.parametrize("damage", ["edited", "link", "folder", "linked parent"])
def test_a_listed_file_that_changed_is_refused_and_nothing_is_removed(tmp_path, damage):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "b.txt").write_text("1")
    fake_export(out, {"a.txt": "1", "sub/b.txt": "1"})
    if damage == "edited":
        (out / "a.txt").write_text("edited by hand")
    elif damage == "link":
        (out / "a.txt").unlink()
        (out / "a.txt").symlink_to(outside / "b.txt")  # same bytes as listed, but not the file written
    elif damage == "folder":
        (out / "a.txt").unlink()
        (out / "a.txt").mkdir()
    else:
        (out / "sub" / "b.txt").unlink()
        (out / "sub").rmdir()
        (out / "sub").symlink_to(outside)
    before, kept = files_under(out), files_under(outside)
    with pytest.raises(ExportError, match="no longer the file an earlier export wrote"):
        fake_export(out, {"c.txt": "2"}, overwrite=True)
    assert files_under(out) == before and files_under(outside) == kept


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "a/../../outside.txt", "./a.txt", ""])
def test_a_manifest_that_names_a_path_outside_the_folder_is_refused(tmp_path, name):
    out = tmp_path / "out"
    fake_export(out, {"a.txt": "1"})
    (tmp_path / "outside.txt").write_text("1")
    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    manifest["files"][name] = manifest["files"]["a.txt"]
    (out / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="not a manifest an export wrote"):
        fake_export(out, {"c.txt": "2"}, overwrite=True)
    assert (tmp_path / "outside.txt").read_text() == "1" and (out / "a.txt").read_text() == "1"


def test_a_manifest_that_lists_a_folder_does_not_remove_it(tmp_path):
    out = tmp_path / "out"
    fake_export(out, {"a.txt": "1"})
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref")
    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    manifest["files"][".git"] = {"size": 0, "sha256": "0" * 64}
    (out / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="no longer the file"):
        fake_export(out, {"a.txt": "2"}, overwrite=True)
    assert (out / ".git" / "HEAD").read_text() == "ref"


def test_a_failed_export_records_what_it_wrote_so_a_later_overwrite_clears_it(tmp_path):
    out = tmp_path / "out"
    fake_export(out, {"a.txt": "1", "b.txt": "1"})
    with pytest.raises(RuntimeError, match="check failed"), replacing(out, overwrite=True):
        (out / "a.txt").write_text("2")
        (out / "half.txt").write_text("2")
        raise RuntimeError("check failed")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILENAME, "a.txt", "b.txt", "half.txt"]  # none removed
    assert listed(out) == ["a.txt", "b.txt", "half.txt"] and read_manifest(out)["a.txt"]["size"] == 1
    fake_export(out, {"a.txt": "3"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILENAME, "a.txt"]


def test_an_input_an_earlier_export_wrote_is_refused(encoder_file, tmp_path):
    out = tmp_path / "out"
    with replacing(out, overwrite=False):
        out.mkdir()
        (out / "enc.safetensors").write_bytes(encoder_file.read_bytes())
    before = files_under(out)
    one_sentence_refusal(export(out / "enc.safetensors", out, "--overwrite"), "holds the input")
    assert files_under(out) == before


def test_triton_adds_a_model_beside_others_and_replaces_one_alone(encoder_file, tmp_path):
    repo = tmp_path / "models"
    (repo / "theirs" / "1").mkdir(parents=True)
    (repo / "theirs" / "config.pbtxt").write_text('name: "theirs"')  # a model no export here wrote
    (repo / "theirs" / "1" / "model.plan").write_bytes(b"engine")
    for name in ("first", "second"):
        result = export(encoder_file, repo, "--format", "triton", "--model-name", name)
        assert result.exit_code == 0, result.output
    siblings = {name: files_under(repo / name) for name in ("theirs", "second")}
    (repo / "first" / "labels.txt").write_text("mine")  # a file of the user's inside the model folder
    one_sentence_refusal(export(encoder_file, repo, "--format", "triton", "--model-name", "first"), "--overwrite")
    result = export(encoder_file, repo, "--format", "triton", "--model-name", "first", "--layers", "-1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert {name: files_under(repo / name) for name in ("theirs", "second")} == siblings
    assert sorted(p.name for p in repo.iterdir()) == ["first", "second", "theirs"]
    config = parse_config((repo / "first" / "config.pbtxt").read_text())
    assert [t.name for t in config.output][-1] == "hidden_states_1"
    assert (repo / "first" / "labels.txt").read_text() == "mine"
    assert listed(repo / "first") == ["1/model.onnx", "config.pbtxt"]


# A full disk while exporting: one sentence with the space it needs, nothing half-written


def full_disk_export(encoder_file: Path, out: Path, monkeypatch, fmt: str, extra: tuple[str, ...] = ()):
    """Export where the model file named `fmt` fails as on a full disk: "onnx": the fp16 graph goes to /dev/full,
    which refuses every write; "timm": the weights meet the error safetensors gives on a full tmpfs (it writes
    through a memory map, which /dev/full does not refuse)."""
    if fmt == "onnx":
        from dmt_jepa.export import onnx_export

        real = onnx_export.export_graph

        def graph_onto_a_full_disk(encoder, info, path, *args, fp16=False, **kwargs):
            return real(encoder, info, Path("/dev/full") if fp16 else path, *args, fp16=fp16, **kwargs)

        monkeypatch.setattr(onnx_export, "export_graph", graph_onto_a_full_disk)
    else:
        from safetensors import SafetensorError

        from dmt_jepa.export import weights

        def weights_onto_a_full_disk(tensors, path, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(weights, "save_file", weights_onto_a_full_disk)
    return export(encoder_file, out, "--format", fmt, *extra)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full")
@pytest.mark.parametrize("fmt, extra, kept", [("onnx", ("--fp16",), ["encoder.onnx"]), ("timm", (), [])])
def test_a_full_disk_while_exporting_is_one_sentence_and_keeps_only_whole_files(
    encoder_file, tmp_path, monkeypatch, fmt, extra, kept
):
    out = tmp_path / "out"
    result = full_disk_export(encoder_file, out, monkeypatch, fmt, extra)
    one_sentence_refusal(result, f"error: no space left on device while exporting into {out} (")
    said = result.stderr.split("holds at least about ")[1].split(" KB")[0]
    assert float(said) == pytest.approx(encoder_file.stat().st_size / 1e3, abs=0.1)  # the encoder's weights
    assert sorted(files_under(out)) == sorted([*kept, *([MANIFEST_FILENAME] if kept else [])])  # no partial file
    if kept:
        assert listed(out) == kept  # the whole file is recorded, so a later --overwrite may replace it
    monkeypatch.undo()
    again = export(encoder_file, out, "--format", fmt, *extra, "--overwrite")
    assert again.exit_code == 0, again.output
