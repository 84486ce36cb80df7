"""`dmtjepa info OUT_DIR` (and the job's stats) on OUT_DIRs someone else touched: damaged files are
named in one sentence each and left out, a mix of models is reported as such; never a hang or a traceback."""

import json
import os
import shutil
from pathlib import Path

import pytest
from hostile_helpers import damaged_copy, two_models, within
from typer.testing import CliRunner

from dmt_jepa.cli.main import app
from dmt_jepa.serve import embed_shards

SETTINGS = dict(workers=0, batch_size=3, layout="array", dtype="float16")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """part-0 (3 images) by one model in `good`; part-1 (2 images) by another model in `other`."""
    root = tmp_path_factory.mktemp("hostile-info")
    model, other = two_models(root, 3)
    embed_shards(str(root / "in" / "part-0.tar"), root / "good", model, **SETTINGS)
    embed_shards(str(root / "in" / "part-1.tar"), root / "other", other, **SETTINGS)
    return root


def invoke(out, *extra):
    """`dmtjepa info OUT`; it must exit 0 within 10 s (a FIFO must not block it)."""
    fifos = [p for p in Path(out).rglob("*") if p.is_fifo()] if isinstance(out, Path) else []
    result = within(10, lambda: CliRunner().invoke(app, ["info", str(out), *extra]), *fifos)
    assert result.exit_code == 0, result.output
    return result.stdout


def info(out):
    return json.loads(invoke(out, "--json"))


def text(out):
    return invoke(out)


def test_info_takes_a_file_url(made):
    assert info(f"file://{made / 'good'}")["shards_done"] == 1
    assert "shards done: 1 of 1 in the job" in text(f"file://{made / 'good'}")


def test_info_reports_a_mix_of_models_instead_of_counting_them_as_one_job(made, tmp_path):
    out = damaged_copy(made / "good", tmp_path)
    for path in (made / "other").glob("part-1.*"):
        shutil.copy(path, out / path.name)
    shutil.copy(made / "other" / "_stats" / "job.json", out / "_stats" / "job.json")  # the last job: part-1 only
    described = info(out)
    assert described["shards_done"] == 1 and described["shards_in_job"] == 1 and described["not_in_job"] == ["part-0"]
    assert sorted(g["shards"] for g in described["groups"]) == [["part-0"], ["part-1"]]
    assert len({g["model"]["sha256"] for g in described["groups"]}) == 2
    shown = text(out)
    assert "shards done: 1 of 1 in the job, and 1 more that the last job did not list (part-0)" in shown
    assert "mixed: 2 different models or settings" in shown and "2 of 1" not in shown


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"embedded": "many"}, "embedded is not a count"),
        ({"failures": ["disk full"]}, "failures is not a list"),
        ({"identity": "mine"}, "identity is not an object"),
        ({"files": ["part-0.parquet", "/etc/passwd"]}, "files names others"),
    ],
)
def test_info_names_a_hand_edited_done_record_and_leaves_it_out(made, tmp_path, edit, words):
    out = damaged_copy(made / "good", tmp_path)
    record = json.loads((out / "part-0.json").read_text())
    (out / "part-0.json").write_text(json.dumps({**record, **edit}))
    described = info(out)
    assert described["shards_done"] == 0 and described["embedded"] == 0 and described["data_bytes"] == 0
    assert list(described["damaged"]) == ["part-0.json"] and words in described["damaged"]["part-0.json"]
    assert f"damaged, left out: {out / 'part-0.json'} is not a done record" in text(out)


def test_info_names_hand_edited_stats_and_summary_files(made, tmp_path):
    out = damaged_copy(made / "good", tmp_path)
    (out / "_stats" / "part-0.json").write_text(json.dumps({"embedded": "x"}))
    (out / "_stats" / "summary.json").write_text(json.dumps({"embedded": 3, "wall_seconds": "long"}))
    (out / "_stats" / "job.json").write_text("[not json")
    described = info(out)
    assert sorted(described["damaged"]) == ["_stats/job.json", "_stats/part-0.json", "_stats/summary.json"]
    assert described["summary"] is None and described["shards_in_job"] is None and described["shards_done"] == 1
    assert f"damaged, left out: {out / '_stats' / 'summary.json'} is not a stats record" in text(out)


def test_a_hand_edited_stats_record_costs_its_figures_only(made, tmp_path):
    out = damaged_copy(made / "good", tmp_path)
    (out / "_stats" / "part-0.json").write_text(json.dumps({"embedded": "x", "failed": [], "host": 1}))
    (out / "_stats" / "summary.json").unlink(missing_ok=True)
    again = embed_shards(str(made / "in" / "part-0.tar"), out, made / "a.safetensors", **SETTINGS)
    assert again.skipped == ["part-0"] and again.job["shards_with_stats"] == 0 and again.job["embedded"] == 0


@pytest.mark.parametrize("name", ["zz.json", "_stats/summary.json", "_stats/job.json", "_stats/part-0.json"])
def test_a_fifo_among_the_json_files_is_named_without_blocking(made, tmp_path, name):
    out = damaged_copy(made / "good", tmp_path)
    (out / name).unlink(missing_ok=True)
    os.mkfifo(out / name)
    described = info(out)
    assert "is a FIFO" in described["damaged"][name]


def test_a_record_linked_to_dev_zero_is_named_not_read(made, tmp_path):
    out = damaged_copy(made / "good", tmp_path)
    os.symlink("/dev/zero", out / "zz.json")
    described = info(out)
    assert "leads outside" in described["damaged"]["zz.json"] and described["shards_done"] == 1
