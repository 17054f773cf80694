"""Dataset definitions: official layouts parse into the right items, bad input is one clear error."""

import json
import os
import random

import pytest

from cache.errors import DatasetError
from pipeline.datasets import (
    DATASETS,
    VideoItem,
    builtin_classnames,
    load_dataset,
    read_class_file,
    read_video_list,
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ---------------------------------------------------------------------------------------------
# Shipped class names


@pytest.mark.parametrize("name,count", [("k400", 400), ("ucf101", 101), ("hmdb51", 51), ("ssv2", 174)])
def test_shipped_class_files(name, count):
    names = builtin_classnames(name)
    assert len(names) == count
    assert len(set(names)) == count
    assert all(n == n.strip() and n for n in names)


def test_shipped_class_order_matches_official_ids():
    k400 = builtin_classnames("k400")
    assert k400[0] == "abseiling" and k400[399] == "zumba"
    # kinetics_400_labels.csv order: the raw labels sorted, "(not slalom ...)" before "crosscountry"
    assert k400[308:311] == ["skiing (not slalom or crosscountry)", "skiing crosscountry", "skiing slalom"]
    ucf = builtin_classnames("ucf101")
    assert ucf[0] == "ApplyEyeMakeup" and ucf[36] == "HandstandPushups" and ucf[100] == "YoYo"
    hmdb = builtin_classnames("hmdb51")
    assert hmdb == sorted(hmdb) and hmdb[0] == "brush hair" and hmdb[-1] == "wave"
    ssv2 = builtin_classnames("ssv2")
    assert ssv2[0] == "Approaching something with your camera"
    assert ssv2[173] == "Wiping something off of something"
    assert not any("[" in n or "]" in n for n in ssv2)


def test_builtin_classnames_unknown():
    with pytest.raises(DatasetError, match="no shipped class names"):
        builtin_classnames("demo")


# ---------------------------------------------------------------------------------------------
# Generic list format


def test_generic_list_videos_and_frame_folders(tmp_path):
    lst = write(
        tmp_path / "train.txt",
        "# comment line\n"
        "a/x.mp4 0\n"
        "\n"
        "b/frames_1 16 2\n"
        "/abs/path/y.avi 1\n"
        "air drumming/z.mp4 1\n",
    )
    items = read_video_list(lst, tmp_path / "root", 3)
    root = str(tmp_path / "root")
    assert items == [
        VideoItem(os.path.join(root, "a", "x.mp4"), 0),
        VideoItem(os.path.join(root, "b", "frames_1"), 2, 16),
        VideoItem("/abs/path/y.avi", 1),
        VideoItem(os.path.join(root, "air drumming", "z.mp4"), 1),
    ]


def test_generic_list_does_not_check_videos_exist(tmp_path):
    lst = write(tmp_path / "l.txt", "missing.mp4 0\n")
    assert len(read_video_list(lst, tmp_path, 1)) == 1


@pytest.mark.parametrize(
    "line,problem",
    [
        ("only_path.mp4", "one field"),
        ("a.mp4 x", "label 'x' is not an integer"),
        ("a.mp4 1.5", "not an integer"),
        ("dir abc 1", "frame count 'abc' is not an integer"),
        ("dir 0 1", "frame count 0 must be positive"),
        ("a.mp4 8 1", "is a video file"),
        ("dir 1 2 1", "too many fields"),
        ("a b c 1", "too many fields"),
        ("a.mp4 3", "label 3 is out of range for 3 classes"),
        ("a.mp4 -1", "label -1 is out of range"),
    ],
)
def test_generic_list_errors_name_file_and_line(tmp_path, line, problem):
    lst = write(tmp_path / "mylist.txt", "ok.mp4 0\n# c\n" + line + "\n")
    with pytest.raises(DatasetError) as e:
        read_video_list(lst, tmp_path, 3, split="train")
    msg = str(e.value)
    assert f"train list {lst} line 3" in msg
    assert problem in msg


def test_generic_list_missing_and_empty(tmp_path):
    with pytest.raises(DatasetError, match="val list .*nope.txt does not exist"):
        read_video_list(tmp_path / "nope.txt", tmp_path, 3, split="val")
    empty = write(tmp_path / "empty.txt", "# nothing\n\n")
    with pytest.raises(DatasetError, match="empty.txt: no videos listed"):
        read_video_list(empty, tmp_path, 3)


def test_folder_check_catches_one_based_lists(tmp_path):
    classes = ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    lst = write(tmp_path / "t.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    with pytest.raises(DatasetError, match=r"t.txt line 1: label 1 is class 'ApplyLipstick' but .* folder 'ApplyEyeMakeup'"):
        read_video_list(lst, tmp_path, 3, classes=classes)
    assert read_video_list(lst, tmp_path, 3)[0].label == 1  # without classes no folder check


# ---------------------------------------------------------------------------------------------
# Class files


def test_class_file_plain_and_csv(tmp_path):
    plain = write(tmp_path / "c.txt", "walk\nrun\n  jump  \n\n\n")
    assert read_class_file(plain) == ["walk", "run", "jump"]
    csvf = write(tmp_path / "labels.csv", 'id,name\n2,jump\n0,walk\n1,"put something, then leave"\n')
    assert read_class_file(csvf) == ["walk", "put something, then leave", "jump"]
    swapped = write(tmp_path / "swapped.csv", "name,id\nb,1\na,0\n")
    assert read_class_file(swapped) == ["a", "b"]


@pytest.mark.parametrize(
    "fname,text,where,problem",
    [
        ("c.txt", "a\nb\na\n", "line 3", "class 'a' repeats line 1"),
        ("c.txt", "a\n\nb\n", "line 2", "blank line"),
        ("c.csv", "id,name\n0,a\n0,b\n", "line 3", "id 0 repeats line 2"),
        ("c.csv", "id,name\n0,a\n1,a\n", "line 3", "class 'a' repeats line 2"),
        ("c.csv", "id,name\n0,a\n2,b\n", "line 3", "id 2 is out of range"),
        ("c.csv", "id,name\nx,a\n", "line 2", "id 'x' is not an integer"),
        ("c.csv", "id,name\n0,a,b\n", "line 2", "expected 2 comma-separated fields"),
    ],
)
def test_class_file_errors(tmp_path, fname, text, where, problem):
    f = write(tmp_path / fname, text)
    with pytest.raises(DatasetError) as e:
        read_class_file(f)
    assert f"class file {f} {where}" in str(e.value)
    assert problem in str(e.value)


def test_class_file_missing_or_empty(tmp_path):
    with pytest.raises(DatasetError, match="class file .*none.txt does not exist"):
        read_class_file(tmp_path / "none.txt")
    with pytest.raises(DatasetError, match="empty"):
        read_class_file(write(tmp_path / "e.txt", "\n\n"))


# ---------------------------------------------------------------------------------------------
# custom and demo


def test_custom(tmp_path):
    (tmp_path / "v").mkdir()
    write(tmp_path / "classes.txt", "a\nb\n")
    write(tmp_path / "tr.txt", "x.mp4 0\ny.mp4 1\n")
    write(tmp_path / "va.txt", "z.mp4 1\n")
    spec = load_dataset("custom", video_root=tmp_path / "v", train_list=tmp_path / "tr.txt",
                        val_list=tmp_path / "va.txt", classes=tmp_path / "classes.txt")
    assert spec.name == "custom" and spec.classes == ["a", "b"]
    assert list(spec.splits) == ["train", "val"]
    assert [i.label for i in spec.splits["train"]] == [0, 1]
    assert spec.splits["val"][0].path == str(tmp_path / "v" / "z.mp4")
    assert spec.sources["train"] == str(tmp_path / "tr.txt")
    assert spec.sources["classes"] == str(tmp_path / "classes.txt")
    with pytest.raises(DatasetError, match="custom dataset needs video_root, classes"):
        load_dataset("custom", train_list=tmp_path / "tr.txt")


def test_custom_classes_may_name_a_builtin_list(tmp_path):
    write(tmp_path / "tr.txt", "x.mp4 100\n")
    spec = load_dataset("custom", video_root=tmp_path, train_list=tmp_path / "tr.txt", classes="ucf101")
    assert len(spec.classes) == 101 and spec.splits["train"][0].label == 100


def test_demo_layout(tmp_path):
    (tmp_path / "videos").mkdir()
    write(tmp_path / "classes.txt", "a\nb\nc\n")
    write(tmp_path / "train.txt", "c0/000.mp4 0\nc2/001.mp4 2\n")
    write(tmp_path / "val.txt", "c1/002.mp4 1\n")
    spec = load_dataset("demo", data_root=tmp_path)
    assert spec.video_root == str(tmp_path / "videos")
    assert spec.splits["train"][1] == VideoItem(str(tmp_path / "videos" / "c2" / "001.mp4"), 2)
    assert [i.label for i in spec.splits["val"]] == [1]
    assert "test" not in spec.splits


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'kinetics'.*k400"):
        load_dataset("kinetics")
    assert set(DATASETS) == {"demo", "k400", "ucf101", "hmdb51", "ssv2", "custom"}


# ---------------------------------------------------------------------------------------------
# Kinetics-400


def test_k400_official_csv(tmp_path):
    root = tmp_path / "k400"
    # columns in a different order than the official file; parse by header name
    write(root / "train.csv",
          "youtube_id,time_end,label,time_start,split,is_cc\n"
          "abc,20,skiing slalom,10,train,0\n"
          "def,5,skiing (not slalom or crosscountry),0,train,0\n"
          "ghi,130,skiing crosscountry,120,train,0\n"
          "jkl,40,skiing slalom,30,train,0\n")
    write(root / "validate.csv",
          "label,youtube_id,time_start,time_end,split\n"
          "skiing crosscountry,mno,7,17,val\n")
    write(root / "test.csv", "youtube_id,time_start,time_end,split\nzzz,0,10,test\n")  # no labels: skipped
    vids = root / "videos"
    per_class = touch(vids / "train" / "skiing slalom" / "abc_000010_000020.mp4")
    flat = touch(vids / "def_000000_000005.mp4")
    touch(vids / "val" / "mno_000007_000017.mp4")
    spec = load_dataset("k400", data_root=root)
    assert spec.classes == ["skiing (not slalom or crosscountry)", "skiing crosscountry", "skiing slalom"]
    tr = spec.splits["train"]
    assert tr[0] == VideoItem(str(per_class), 2)
    assert tr[1] == VideoItem(str(flat), 0)
    # absent file: still an item, at the expected path under the video root
    assert tr[2] == VideoItem(str(vids / "ghi_000120_000130.mp4"), 1)
    assert spec.splits["val"] == [VideoItem(str(vids / "val" / "mno_000007_000017.mp4"), 1)]
    assert list(spec.splits) == ["train", "val"]
    assert spec.sources["val"] == str(root / "validate.csv")


def test_k400_full_csv_uses_official_ids(tmp_path):
    shipped = builtin_classnames("k400")
    rows = [f"{name},vid{i},0,10,train" for i, name in enumerate(shipped)]
    random.Random(0).shuffle(rows)
    write(tmp_path / "train.csv", "label,youtube_id,time_start,time_end,split\n" + "\n".join(rows) + "\n")
    spec = load_dataset("k400", data_root=tmp_path, video_root=tmp_path)
    # sorting these names without their brackets would swap "skiing crosscountry" and "skiing not slalom ..."
    assert spec.classes == shipped
    by_path = {os.path.basename(i.path): i.label for i in spec.splits["train"]}
    assert by_path["vid309_000000_000010.mp4"] == 309


@pytest.mark.parametrize(
    "fname,text,where,problem",
    [
        ("validate.csv", "label,youtube_id,time_start,time_end\na,x,0,10\nzzz,y,0,10\n", "line 3", "label 'zzz' is not one of the classes"),
        ("validate.csv", "label,youtube_id,time_start,time_end\na,x,zero,10\n", "line 2", "time_start 'zero'"),
        ("validate.csv", "label,youtube_id,time_end\na,x,10\n", "line 1", "lacks column(s) time_start"),
        ("validate.csv", "label,youtube_id,time_start,time_end\na,x,0\n", "line 2", "expected 4 comma-separated fields"),
    ],
)
def test_k400_errors(tmp_path, fname, text, where, problem):
    write(tmp_path / "train.csv", "label,youtube_id,time_start,time_end,split\na,v1,0,10,train\nb,v2,0,10,train\n")
    f = write(tmp_path / fname, text)
    with pytest.raises(DatasetError) as e:
        load_dataset("k400", data_root=tmp_path)
    assert f"val list {f} {where}" in str(e.value)
    assert problem in str(e.value)


def test_k400_generic_txt_lists(tmp_path):
    write(tmp_path / "train.txt", "abseiling/a.mp4 0\nzumba/b.mp4 399\n")
    spec = load_dataset("k400", video_root=tmp_path, train_list=tmp_path / "train.txt")
    assert spec.classes == builtin_classnames("k400")
    assert [i.label for i in spec.splits["train"]] == [0, 399]
    # a .txt train list with --data-root holding the official CSVs: those are not `path label` lists
    write(tmp_path / "validate.csv", "label,youtube_id,time_start,time_end\nzumba,x,0,10\n")
    spec = load_dataset("k400", data_root=tmp_path, video_root=tmp_path, train_list=tmp_path / "train.txt")
    assert list(spec.splits) == ["train"]


def _looped_k400(root):
    """A K400 layout whose video root holds symlink loops (to itself, to its parent, to a sibling)."""
    write(root / "train.csv", "label,youtube_id,time_start,time_end,split\n"
                              "abseiling,abc,0,10,train\nzumba,def,0,10,train\n")
    a = touch(root / "videos" / "a" / "abc_000000_000010.mp4")
    b = touch(root / "videos" / "b" / "def_000000_000010.mp4")
    os.symlink(".", root / "videos" / "self")
    os.symlink("..", root / "videos" / "a" / "up")
    os.symlink("../..", root / "videos" / "a" / "upup")
    os.symlink("../a", root / "videos" / "b" / "to_a")
    return a, b


def test_k400_walks_each_real_folder_once_through_symlink_loops(tmp_path, monkeypatch):
    a, b = _looped_k400(tmp_path)
    listed = []
    real_scandir = os.scandir

    def scandir(path="."):
        listed.append(os.path.realpath(path))
        if len(listed) > 50:  # before the fix: exponentially many paths through the loops
            raise AssertionError(f"the walk does not end: {len(listed)} folders listed, e.g. {path}")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    spec = load_dataset("k400", data_root=tmp_path)
    assert [i.path for i in spec.splits["train"]] == [str(a), str(b)]
    # every real folder once: the video root, a, b, and the data root the `upup` link leads out to
    assert sorted(listed) == sorted({str(tmp_path / "videos"), str(tmp_path / "videos" / "a"),
                                     str(tmp_path / "videos" / "b"), str(tmp_path)})


# ---------------------------------------------------------------------------------------------
# UCF-101


def _ucf_tree(root):
    ann = root / "ucfTrainTestlist"
    write(ann / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n3 HandstandPushups\n")
    write(ann / "trainlist01.txt",
          "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
          "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\n")
    write(ann / "testlist01.txt",
          "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\n"
          "HandstandPushups/v_HandStandPushups_g01_c01.avi\n")
    write(ann / "trainlist02.txt", "ApplyLipstick/v_ApplyLipstick_g01_c01.avi 2\n")
    write(ann / "testlist02.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\n")
    (root / "UCF-101").mkdir(parents=True)
    return ann


def test_ucf101_official_lists(tmp_path):
    _ucf_tree(tmp_path)
    spec = load_dataset("ucf101", data_root=tmp_path)
    vroot = tmp_path / "UCF-101"
    assert spec.classes == ["ApplyEyeMakeup", "ApplyLipstick", "HandstandPushups"]
    assert spec.video_root == str(vroot)
    assert spec.splits["train"] == [
        VideoItem(str(vroot / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi"), 0),
        VideoItem(str(vroot / "HandstandPushups" / "v_HandStandPushups_g08_c01.avi"), 2),
    ]
    # testlist carries no label: it comes from the folder name via classInd
    assert [i.label for i in spec.splits["val"]] == [1, 2]
    spec2 = load_dataset("ucf101", data_root=tmp_path, split_id=2)
    assert [i.label for i in spec2.splits["train"]] == [1]
    assert [i.label for i in spec2.splits["val"]] == [0]
    assert spec2.sources["train"].endswith("trainlist02.txt")


def test_ucf101_errors(tmp_path):
    ann = _ucf_tree(tmp_path)
    write(ann / "testlist01.txt", "ApplyLipstick/v_a.avi\nBowling/v_Bowling_g01_c01.avi\n")
    with pytest.raises(DatasetError, match=r"testlist01.txt line 2: folder 'Bowling'"):
        load_dataset("ucf101", data_root=tmp_path)
    write(ann / "trainlist01.txt", "ApplyEyeMakeup/v_a.avi 2\n")
    with pytest.raises(DatasetError, match=r"trainlist01.txt line 1: label 2 is 'ApplyLipstick' but the folder is 'ApplyEyeMakeup'"):
        load_dataset("ucf101", data_root=tmp_path)
    write(ann / "trainlist01.txt", "ApplyEyeMakeup/v_a.avi 4\n")
    with pytest.raises(DatasetError, match=r"trainlist01.txt line 1: label 4 is out of range"):
        load_dataset("ucf101", data_root=tmp_path)
    with pytest.raises(DatasetError, match="split_id must be 1, 2 or 3"):
        load_dataset("ucf101", data_root=tmp_path, split_id=4)
    with pytest.raises(DatasetError, match="needs classInd.txt"):
        load_dataset("ucf101", data_root=tmp_path / "UCF-101")


# ---------------------------------------------------------------------------------------------
# HMDB-51


def test_hmdb51_split_files(tmp_path):
    sp = tmp_path / "testTrainMulti_7030_splits"
    write(sp / "wave_test_split1.txt", "w1.avi 1 \nw2.avi 2 \nw3.avi 0 \n")
    write(sp / "brush_hair_test_split1.txt", "b1.avi 2\nb2.avi 1\n")
    write(sp / "brush_hair_test_split2.txt", "b1.avi 1\nb2.avi 2\n")
    write(sp / "wave_test_split2.txt", "w1.avi 0\nw2.avi 1\nw3.avi 2\n")
    vroot = tmp_path / "hmdb51_org"
    vroot.mkdir()
    spec = load_dataset("hmdb51", data_root=tmp_path)
    assert spec.classes == ["brush hair", "wave"]  # folders keep their underscores
    assert spec.splits["train"] == [VideoItem(str(vroot / "brush_hair" / "b2.avi"), 0),
                                    VideoItem(str(vroot / "wave" / "w1.avi"), 1)]
    assert spec.splits["val"] == [VideoItem(str(vroot / "brush_hair" / "b1.avi"), 0),
                                  VideoItem(str(vroot / "wave" / "w2.avi"), 1)]
    spec2 = load_dataset("hmdb51", data_root=tmp_path, split_id=2)
    assert [os.path.basename(i.path) for i in spec2.splits["train"]] == ["b1.avi", "w2.avi"]
    assert [os.path.basename(i.path) for i in spec2.splits["val"]] == ["b2.avi", "w3.avi"]


def test_hmdb51_errors(tmp_path):
    (tmp_path / "v").mkdir()
    with pytest.raises(DatasetError, match="no split files <class>_test_split1.txt"):
        load_dataset("hmdb51", data_root=tmp_path, video_root=tmp_path / "v")
    f = write(tmp_path / "run_test_split1.txt", "r1.avi 1\nr2.avi 3\n")
    with pytest.raises(DatasetError) as e:
        load_dataset("hmdb51", data_root=tmp_path, video_root=tmp_path / "v")
    assert f"hmdb51 split file {f} line 2" in str(e.value) and "split tag '3'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Something-Something v2


def _ssv2_tree(root):
    labels = {"Putting something on something": "1", "Approaching something with your camera": "0",
              "Putting something, something and something on the table": "2"}
    write(root / "something-something-v2-labels.json", json.dumps(labels, indent=1))
    train = [
        {"id": "78687", "label": "putting cup on box", "template": "Putting [something] on [something]",
         "placeholders": ["cup", "box"]},
        {"id": "42326", "label": "approaching tree with camera",
         "template": "Approaching [something] with your camera", "placeholders": ["tree"]},
    ]
    write(root / "something-something-v2-train.json", json.dumps(train, indent=2))
    val = [{"id": "5", "template": "Putting [something], [something] and [something] on the table"}]
    write(root / "something-something-v2-validation.json", json.dumps(val, indent=2))
    (root / "20bn-something-something-v2").mkdir()


def test_ssv2_official_json(tmp_path):
    _ssv2_tree(tmp_path)
    spec = load_dataset("ssv2", data_root=tmp_path)
    vroot = tmp_path / "20bn-something-something-v2"
    assert spec.classes == ["Approaching something with your camera", "Putting something on something",
                            "Putting something, something and something on the table"]
    assert spec.splits["train"] == [VideoItem(str(vroot / "78687.webm"), 1), VideoItem(str(vroot / "42326.webm"), 0)]
    assert spec.splits["val"] == [VideoItem(str(vroot / "5.webm"), 2)]


def test_ssv2_errors(tmp_path):
    _ssv2_tree(tmp_path)
    bad = [{"id": "1", "template": "Approaching [something] with your camera"},
           {"id": "2", "template": "Juggling [something]"}]
    f = write(tmp_path / "something-something-v2-validation.json", json.dumps(bad, indent=2))
    with pytest.raises(DatasetError) as e:
        load_dataset("ssv2", data_root=tmp_path)
    assert f"val list {f} line 6" in str(e.value) and "'Juggling [something]'" in str(e.value)
    t = write(tmp_path / "something-something-v2-test.json", json.dumps([{"id": "9"}]))
    with pytest.raises(DatasetError, match=r"test list .*test.json line 1: video 9 has no \"template\""):
        load_dataset("ssv2", data_root=tmp_path, val_list=tmp_path / "something-something-v2-train.json", test_list=t)
    broken = write(tmp_path / "broken.json", '[\n{"id": "1",\n"template": }\n]')
    with pytest.raises(DatasetError, match=r"broken.json line 3: not valid JSON"):
        load_dataset("ssv2", data_root=tmp_path, train_list=broken)


def test_ssv2_template_brackets_removed():
    from pipeline.datasets import _ssv2_class

    assert _ssv2_class("Putting [something], [something] and [something] on the table") == (
        "Putting something, something and something on the table")
    assert _ssv2_class("Putting [number of] [something] onto [something]") == "Putting number of something onto something"
    assert _ssv2_class("Twisting (wringing) [something] wet until water comes out") in builtin_classnames("ssv2")
