"""Datasets are a registry: a layout defined in one file (this one) is loaded by name and extracted
like a built-in; an unknown name is one line that lists the registered ones."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import framecode as fc
from cache.datasets import DatasetSpec, VideoItem
from cache.errors import DatasetError
from conftest import extract_in_process, run_cli
from pipeline.datasets import DATASETS, DatasetArgs, get_dataset, list_datasets, load_dataset, register_dataset

# ---------------------------------------------------------------------------------------------
# The whole of a new layout: every video in one folder, named <class>__<n>.mp4; class ids are
# the sorted class names; every video is in the train split.

_FLAT_NAME = re.compile(r"^(?P<cls>.+)__(?P<n>\d+)\.mp4$")


def load_flat(args: DatasetArgs) -> DatasetSpec:
    root = Path(args.data_root)
    if not root.is_dir():
        raise DatasetError(f"flat data root {root} is not a folder")
    found = []
    for f in sorted(root.iterdir()):
        m = _FLAT_NAME.match(f.name)
        if m is None:
            raise DatasetError(f"flat data root {root}: {f.name!r} is not named <class>__<n>.mp4")
        found.append((m["cls"], str(f.resolve())))
    classes = sorted({c for c, _ in found})
    items = [VideoItem(path, classes.index(c)) for c, path in found]
    return DatasetSpec("flat", classes, {"train": items}, str(root.resolve()), {"folder": str(root.resolve())})


register_dataset("flat", load_flat, help="every video in one folder, named <class>__<n>.mp4")

# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    for cls, n in [("waving", 0), ("waving", 1), ("clapping", 0), ("jumping", 0), ("clapping", 1)]:
        fc.write_video(root / f"{cls}__{n}.mp4", "h264", n=6)
    return root


def test_a_layout_registered_in_a_test_module_is_loaded_by_name(flat_root):
    assert "flat" in list_datasets() and get_dataset("flat").help.startswith("every video")
    assert "flat" not in DATASETS  # DATASETS: the built-in layouts only
    spec = load_dataset("flat", data_root=flat_root)
    assert spec.classes == ["clapping", "jumping", "waving"]
    assert [(Path(it.path).name, it.label) for it in spec.splits["train"]] == [
        ("clapping__0.mp4", 0), ("clapping__1.mp4", 0), ("jumping__0.mp4", 1), ("waving__0.mp4", 2), ("waving__1.mp4", 2)]
    assert spec.args == {"data_root": str(flat_root.resolve())}  # recorded for the registered layout too
    with pytest.raises(RuntimeError, match="'flat' registered twice"):
        register_dataset("flat", load_flat)


def test_extract_runs_on_the_registered_layout(flat_root, tmp_path):
    from cache.meta import extract_command
    from cache.store import DONE, open_store

    spec = load_dataset("flat", data_root=flat_root)
    res = extract_in_process(spec, tmp_path / "cache", workers=1, text="none", frames=4, shard_size=2)
    assert res.videos == 5
    st = open_store(tmp_path / "cache")
    assert st.splits == ["train"]
    assert st.status("train").tolist() == [DONE] * 5
    assert [(os.path.basename(p), lab) for p, lab in st.items("train")] == [
        ("clapping__0.mp4", 0), ("clapping__1.mp4", 0), ("jumping__0.mp4", 1), ("waving__0.mp4", 2), ("waving__1.mp4", 2)]
    assert st.labels("train").tolist() == [0, 0, 1, 2, 2]
    assert st.meta["dataset"]["name"] == "flat" and st.meta["dataset"]["classes"] == ["clapping", "jumping", "waving"]
    assert f"--dataset flat --data-root {flat_root.resolve()}" in extract_command(st.meta)
    assert not st.verify()


def test_an_unknown_dataset_is_one_line_naming_the_registered_ones():
    with pytest.raises(DatasetError) as e:
        load_dataset("kinetics")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unknown dataset 'kinetics'; known: ")
    assert msg.endswith(", ".join(list_datasets())) and "flat" in msg


def test_the_cli_names_the_registered_layouts(tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as e:  # in-process, so the layout registered above is listed too
        main(["extract", "--dataset", "kinetics", "--out", str(tmp_path / "c")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: unknown dataset 'kinetics'; known: {', '.join(list_datasets())}"]
    assert "flat" in list_datasets()
    helptext = " ".join(run_cli("extract", "--help", env={"COLUMNS": "200"}, check=True).stdout.split())
    assert " | ".join(DATASETS) in helptext  # a fresh process: the built-in layouts


def test_split_ids_are_checked_by_the_registry():
    with pytest.raises(DatasetError, match=r"^ucf101 split_id must be 1, 2 or 3, got 4$"):
        load_dataset("ucf101", data_root="nowhere", split_id=4)
    assert get_dataset("ucf101").split_ids == (1, 2, 3) and get_dataset("k400").split_ids == ()
    assert not get_dataset("custom").default_root


@pytest.mark.parametrize("name, expect", [
    ("k400", ["train.csv, validate.csv", "<youtube_id>_<start:06d>_<end:06d>.mp4", "kinetics-dataset"]),
    ("ssv2", ["something-something-v2-train.json", "20bn-something-something-v2/<id>.webm"]),
    ("ucf101", ["ucfTrainTestlist/classInd.txt", "UCF-101/<ClassName>/"]),
    ("hmdb51", ["testTrainMulti_7030_splits/<class>_test_split1.txt", "hmdb51_org/<class>/"]),
    ("demo", ["train.txt, val.txt, classes.txt", "make extract DATASET=demo"]),
])
def test_a_missing_data_root_shows_the_tree_the_dataset_needs(tmp_path, capsys, name, expect):
    """`extract --dataset k400` with no data: the layout under the given root and where its files
    come from, then how to point elsewhere; exit 2, no cache folder made."""
    from pipeline.cli import main

    root = tmp_path / "data" / name
    with pytest.raises(SystemExit) as e:
        main(["extract", "--dataset", name, "--data-root", str(root), "--out", str(tmp_path / "c"), "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == f"error: {name} data root {root} does not exist; put the dataset there as"
    assert all(s in err for s in expect) and f"{root}/" in lines[1]
    assert lines[-1].startswith("or pass --data-root DIR")
    assert not (tmp_path / "c").exists()
