"""Shipped class names spell classes as the official label lists do (SPEC section 7): text
classifiers and zero-shot prompts read them. The loaders still map on-disk folder names (HMDB-51
folders use underscores; some Kinetics mirrors drop the parentheses) to these classes."""

from __future__ import annotations

import os

from pipeline.datasets import VideoItem, builtin_classnames, load_dataset

# The nine Kinetics-400 names that carry parentheses in kinetics_400_labels.csv.
K400_PARENTHESISED = [
    "hurling (sport)",
    "passing American football (in game)",
    "passing American football (not in game)",
    "petting animal (not cat)",
    "punching person (boxing)",
    "shooting goal (soccer)",
    "skiing (not slalom or crosscountry)",
    "tying knot (not on a tie)",
    "using remote controller (not gaming)",
]

# The 14 HMDB-51 classes whose folder names carry underscores.
HMDB_SPACED = [
    "brush hair", "climb stairs", "draw sword", "fall floor", "flic flac", "kick ball", "ride bike",
    "ride horse", "shake hands", "shoot ball", "shoot bow", "shoot gun", "swing baseball", "sword exercise",
]


def test_hmdb51_names_have_spaces():
    hmdb = builtin_classnames("hmdb51")
    assert len(hmdb) == 51 and len(set(hmdb)) == 51
    assert not [n for n in hmdb if "_" in n]
    assert set(HMDB_SPACED) <= set(hmdb)
    assert sum(" " in n for n in hmdb) == 14
    # the official ids: the folder names sorted; spelled with spaces the order is the same
    assert hmdb == sorted(hmdb, key=lambda n: n.replace(" ", "_"))


def test_k400_parenthesised_names():
    k400 = builtin_classnames("k400")
    assert len(k400) == 400 and len(set(k400)) == 400
    assert sorted(n for n in k400 if "(" in n or ")" in n) == K400_PARENTHESISED
    assert all(n.count("(") == 1 and n.endswith(")") for n in K400_PARENTHESISED)
    # the official ids are the raw labels sorted: with the brackets kept, plain sorting gives them
    assert k400 == sorted(k400)
    assert k400.index("passing American football (in game)") == 208
    assert k400.index("using remote controller (not gaming)") == 374


def test_hmdb51_folders_map_to_spaced_classes(tmp_path):
    """All 51 official split files (underscored folder names): every folder lands on its class."""
    hmdb = builtin_classnames("hmdb51")
    folders = [n.replace(" ", "_") for n in hmdb]
    sp = tmp_path / "testTrainMulti_7030_splits"
    sp.mkdir()
    for f in reversed(folders):  # creation order must not matter
        (sp / f"{f}_test_split1.txt").write_text(f"{f}_a.avi 1\n{f}_b.avi 2\n")
    (tmp_path / "hmdb51_org").mkdir()
    spec = load_dataset("hmdb51", data_root=tmp_path)
    assert spec.classes == hmdb
    assert spec.sources["classes"].endswith("hmdb51.txt")
    for item in spec.splits["train"]:
        folder = os.path.basename(os.path.dirname(item.path))
        assert os.path.basename(item.path) == f"{folder}_a.avi"
        assert spec.classes[item.label] == folder.replace("_", " ")
    assert len(spec.splits["train"]) == len(spec.splits["val"]) == 51


def test_hmdb51_generic_list_checks_underscored_folders(tmp_path):
    """`path label` lists of HMDB-51 keep checking the folder against the (spaced) class."""
    (tmp_path / "train.txt").write_text("brush_hair/a.avi 0\nsword_exercise/b.avi 45\n")
    spec = load_dataset("hmdb51", video_root=tmp_path, train_list=tmp_path / "train.txt")
    assert [spec.classes[i.label] for i in spec.splits["train"]] == ["brush hair", "sword exercise"]
    (tmp_path / "bad.txt").write_text("brush_hair/a.avi 1\n")
    import pytest

    from cache.errors import DatasetError

    with pytest.raises(DatasetError, match="folder 'brush_hair'"):
        load_dataset("hmdb51", video_root=tmp_path, train_list=tmp_path / "bad.txt")


def test_k400_csv_labels_keep_parentheses(tmp_path):
    """Official CSV labels (with brackets) and a mirror's labels without them reach one spelling."""
    (tmp_path / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "passing American football (in game),a,0,10,train\n"
        "passing American football not in game,b,0,10,train\n"
        "hurling (sport),c,0,10,train\n")
    spec = load_dataset("k400", data_root=tmp_path, video_root=tmp_path)
    assert spec.classes == ["hurling (sport)", "passing American football (in game)",
                            "passing American football (not in game)"]
    assert [i.label for i in spec.splits["train"]] == [1, 2, 0]
    assert spec.splits["train"][0] == VideoItem(str(tmp_path / "a_000000_000010.mp4"), 1)
