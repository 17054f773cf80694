"""The one config layer (stages/config.py): one coercion rule for every option set, experiment files
(`--config exp.yaml`), the precedence defaults < recipe < file < --set < flags given, and a run
folder's config.yaml that runs the same run again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cache.errors import ConfigError
from conftest import demo_args, run_cli
from stages.augment import AugmentCfg
from stages.config import coerce_option, load_experiment
from stages.extract import ExtractCfg
from stages.finetune import FinetuneCfg, split_finetune_overrides
from stages.heads import make_cfg
from stages.train import TrainCfg, split_overrides
from stages.video import validate_sampling

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- one coercion rule
@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("yes", True), ("NO", False), ("1", True),
                                        ("0", False), ("on", True), ("off", False), (True, True), (0, False)])
def test_bools_read_the_same_in_every_option_set(text, value):
    # a training option, a head option, a fine-tuning option and an augmentation option: one rule
    train, _ = split_overrides([f"decay_all={text}"] if isinstance(text, str) else {"decay_all": text}, "tap")
    assert train["decay_all"] is value
    assert make_cfg("evl", {"use_tca": text}).use_tca is value
    ft, aug, _ = split_finetune_overrides({"train_logit_scale": text, "aug.randaugment": text}, "actionclip")
    assert ft["train_logit_scale"] is value and aug["randaugment"] is value


@pytest.mark.parametrize("kind,value,expect", [
    ("int", "12", 12), ("int", 12, 12), ("int", "1_000", 1000),
    ("float", "1e-3", 1e-3), ("float", 3, 3.0), ("float", "0.5", 0.5),  # PyYAML reads 1e-3 as text
    ("str", "0-5,8", "0-5,8"), ("str", 5, "5"),
    ("tuple[int, ...]", "1,2, 3", (1, 2, 3)), ("tuple[int, ...]", [4, 5], (4, 5)), ("list[float]", "0.5,1", [0.5, 1.0]),
    ("int | None", "none", None), ("int | None", "7", 7), ("Optional[float]", None, None),
])
def test_values_are_typed_by_the_field(kind, value, expect):
    got = coerce_option(kind, "opt", value)
    assert got == expect and type(got) is type(expect)


@pytest.mark.parametrize("kind,value,expect", [
    ("int", "1.5", "expects int"), ("int", True, "expects int"), ("int", 2.0, "expects int"),
    ("float", "fast", "expects float"), ("float", False, "expects float"),
    ("bool", "maybe", "expects bool"), ("bool", 2, "expects bool"),
    ("str", False, "quote the value"), ("int", None, "got nothing"), ("tuple[int, ...]", "1,x", "expects int"),
])
def test_wrong_types_are_one_line_naming_the_option(kind, value, expect):
    with pytest.raises(ConfigError) as exc:
        coerce_option(kind, "opt", value)
    assert expect in str(exc.value) and "'opt'" in str(exc.value) and "\n" not in str(exc.value)


def test_keys_go_to_their_option_set_and_unknown_keys_name_the_closest():
    train, head = split_overrides(["lr=0.1", "num_layers=2", "head.dropout=0.25", "train.seed=3"], "evl")
    assert train == {"lr": 0.1, "seed": 3} and head == {"num_layers": 2, "dropout": 0.25}
    for pairs, expect in ((["lrr=1"], "did you mean 'lr'"), (["num_layer=2"], "did you mean 'num_layers'"),
                          (["head.dropuot=0.1"], "did you mean 'head.dropout'"), (["train.epoch=3"], "'train.epochs'"),
                          (["head=tap"], "--head"), (["recipe=quick"], "--recipe")):
        with pytest.raises(ConfigError) as exc:
            split_overrides(pairs, "evl")
        assert expect in str(exc.value), str(exc.value)
    with pytest.raises(ConfigError, match="did you mean 'aug.flip'"):
        split_finetune_overrides(["aug.flpi=0"], "text4vis")
    with pytest.raises(ConfigError, match="--paradigm"):
        split_finetune_overrides(["paradigm=actionclip"], "text4vis")
    ft, aug, head = split_finetune_overrides(["finetune.lr=1e-4", "aug.crop=multiscale", "layers=1"], "text4vis")
    assert ft == {"lr": 1e-4} and aug == {"crop": "multiscale"} and head == {"layers": 1}
    assert AugmentCfg(**aug).crop == "multiscale"


def test_sampling_is_validated_once_for_extract_and_finetune():
    for bad, expect in (({"frames": 0}, "frames must be at least 1"), ({"stride": 0}, "stride must be at least 1"),
                        ({"sampling": "random"}, "sampling must be one of segment, segment-start, segment-interior, dense"),
                        ({"views": "2y3"}, "views must look like CxS")):
        with pytest.raises(ConfigError) as a:
            FinetuneCfg(**bad).validate()
        with pytest.raises(ConfigError) as b:
            ExtractCfg(**bad).validate()
        assert expect in str(a.value) and expect in str(b.value)
        assert str(b.value).replace("--", "") == str(a.value).replace("--", "")  # the one message; extract names flags
    validate_sampling(8, "dense", 4, "4x3")


# ----------------------------------------------------------------------------- experiment files
def test_experiment_file_flattens_one_level_of_sections(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("head: {name: evl, num_layers: 2}\ncache: c\ntrain:\n  lr: 1e-3\n  decay_all: yes\nepochs: 3\n")
    assert load_experiment(f) == {"head.name": "evl", "head.num_layers": 2, "cache": "c", "train.lr": "1e-3",
                                  "train.decay_all": True, "epochs": 3}
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_experiment(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("content,expect", [
    (None, "does not exist"),
    ("train:\n  lr: 1\n lr2: 2\n", "is not valid YAML at line 3"),
    ("- lr\n- epochs\n", "must hold a mapping"),
    (b"\xff\xfe\x00binary", "is not text"),
    ("train:\n  opt:\n    deep: 1\n", "one level of sections"),
])
def test_unreadable_experiment_files_are_one_line(tmp_path, content, expect):
    f = tmp_path / "exp.yaml"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_experiment(f)
    assert expect in str(exc.value) and str(f) in str(exc.value) and "\n" not in str(exc.value)


def test_the_example_experiment_file_is_valid():
    keys = load_experiment(ROOT / "configs" / "evl_k400.yaml")
    head = keys.pop("head.name")
    own = {k: keys.pop(k) for k in ("dataset", "recipe")}
    train, head_opts = split_overrides(keys, head, "configs/evl_k400.yaml")
    cfg = TrainCfg(**{**train, "head": head, "recipe": own["recipe"]})
    cfg.validate()
    assert head == "evl" and cfg.lr == 4e-4 and cfg.global_batch == 256 and make_cfg("evl", head_opts).num_layers == 4


# ----------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def cache(demo_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("config") / "cache"
    run_cli(*demo_args(demo_small, out, "--layers", "last1", "--text", "clip_single"), check=True)
    return out


def _main(capsys, *args) -> str:
    from pipeline.cli import main

    capsys.readouterr()
    main([str(a) for a in args])
    return capsys.readouterr().out


def _fail(capsys, *args) -> str:
    from pipeline.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _resolved(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["train"]


def test_precedence_recipe_file_set_flags(cache, tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"head": "tap", "cache": str(cache), "recipe": "quick", "shots": 2, "init": "lda",
                                   "train": {"epochs": 0, "seed": 3, "lr": 0.25, "eval_every": 2}}))
    base = ["train", "--config", exp, "--no-progress"]
    _main(capsys, *base, "--run-dir", tmp_path / "a")
    a = _resolved(tmp_path / "a")  # the file over the quick recipe (lr 1e-3, batch 32) and the defaults
    assert (a["head"], a["recipe"], a["shots"], a["classifier_init"], a["seed"], a["lr"], a["batch_size"]) == \
        ("tap", "quick", 2, "lda", 3, 0.25, 32)
    _main(capsys, *base, "--set", "seed=4", "--set", "shots=1", "--run-dir", tmp_path / "b")
    b = _resolved(tmp_path / "b")  # --set over the file
    assert (b["seed"], b["shots"], b["lr"]) == (4, 1, 0.25)
    # flags given on the command line win over --set and the file, even when equal to their defaults
    _main(capsys, *base, "--set", "shots=1", "--shots", "0", "--init", "clip_text", "--recipe", "paper",
          "--run-dir", tmp_path / "c")
    c = _resolved(tmp_path / "c")
    assert (c["shots"], c["classifier_init"], c["recipe"], c["lr"]) == (0, "clip_text", "paper", 0.25)
    # no file: --set over the recipe, and a flag equal to its default still overrides --set
    _main(capsys, "train", "--head", "tap", "--cache", cache, "--no-progress", "--set", "epochs=0", "--set",
          "fraction=0.5", "--fraction", "1.0", "--run-dir", tmp_path / "d")
    assert _resolved(tmp_path / "d")["fraction"] == 1.0


def test_a_run_folders_config_yaml_reruns_the_same_run(cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPCACHE_ROOT", str(tmp_path / "first"))
    out = _main(capsys, "train", "--head", "text4vis", "--cache", cache, "--recipe", "quick", "--no-progress",
                "--set", "epochs=2", "--set", "batch_size=4", "--set", "layers=1", "--set", "pos_rows=8",
                "--set", "decay_all=yes", "--shots", "2")
    run = Path(out.strip().splitlines()[-1].split("run folder: ")[1])
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["head"]["name"] == "text4vis" and record["head"]["layers"] == 1
    assert "num_classes" not in record["head"]  # dims come from the cache
    assert record["train"]["shots"] == 2 and record["train"]["decay_all"] is True
    first = json.loads((run / "metrics.json").read_text())
    # the same run from its config.yaml alone, in another runs root: same run id, same metrics
    monkeypatch.setenv("CLIPCACHE_ROOT", str(tmp_path / "second"))
    out = _main(capsys, "train", "--config", run / "config.yaml", "--no-progress")
    again = Path(out.strip().splitlines()[-1].split("run folder: ")[1])
    assert again.name == run.name and again.parent == tmp_path / "second" / "runs"
    second = json.loads((again / "metrics.json").read_text())
    assert second["final"] == first["final"]
    assert [h["train_loss"] for h in second["history"]] == [h["train_loss"] for h in first["history"]]
    assert (again / "config.yaml").read_text().split("\n", 2)[2] == (run / "config.yaml").read_text().split("\n", 2)[2]
    # the file with one change is another run
    out = _main(capsys, "train", "--config", run / "config.yaml", "--no-progress", "--set", "epochs=1")
    assert Path(out.strip().splitlines()[-1].split("run folder: ")[1]).name != run.name


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist"),
    ("not_yaml", "is not valid YAML"),
    ("unknown_key", "unknown option 'train.lrr' (did you mean 'train.lr'?)"),
    ("unknown_top", "unknown option 'cahce' (did you mean 'cache'?)"),
    ("unknown_head_option", "unknown option 'head.layers'"),
    ("wrong_type", "option 'train.epochs' expects int, got 'many'"),
    ("wrong_type_option", "option 'shots' expects int"),
    ("yaml_bool_for_text", "quote the value"),
    ("no_head", "no head given"),
])
def test_bad_config_files_are_one_line_exit_2_nothing_written(cache, tmp_path, capsys, monkeypatch, case, expect):
    monkeypatch.setenv("CLIPCACHE_ROOT", str(tmp_path / "root"))
    exp = tmp_path / "exp.yaml"
    body = {"head": "tap", "cache": str(cache), "train": {"epochs": 0}}
    if case == "not_yaml":
        exp.write_text("head: tap\ntrain: {epochs: 0\n")
    elif case != "missing":
        if case == "unknown_key":
            body["train"]["lrr"] = 0.1
        elif case == "unknown_top":
            body["cahce"] = body.pop("cache")
        elif case == "unknown_head_option":
            body["head"] = {"name": "tap", "layers": 2}
        elif case == "wrong_type":
            body["train"]["epochs"] = "many"
        elif case == "wrong_type_option":
            body["shots"] = [1, 2]
        elif case == "yaml_bool_for_text":
            exp.write_text(f"head: tap\ncache: {cache}\ntrain: {{epochs: 0, text_set: no}}\n")
        elif case == "no_head":
            del body["head"]
        if case != "yaml_bool_for_text":
            exp.write_text(yaml.safe_dump(body))
    err = _fail(capsys, "train", "--config", exp, "--no-progress")
    assert expect in err
    if case not in ("missing",):
        assert str(exp) in err or case == "no_head"
    assert not (tmp_path / "root").exists()  # nothing written


@pytest.mark.slow  # three stage-three runs (evaluation only) of a tiny CLIP: about a minute on 2 busy cores
def test_finetune_config_and_its_record(demo_small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPCACHE_ROOT", str(tmp_path / "root"))
    exp = tmp_path / "ft.yaml"
    exp.write_text(yaml.safe_dump({
        "paradigm": "text4vis", "dataset": "demo", "data_root": str(demo_small.root), "recipe": "quick",
        "model": "tiny", "frames": 2, "epochs": 0,
        "finetune": {"batch_size": 4, "workers": 0, "seed": 2}, "head": {"layers": 1, "pos_rows": 8},
        "aug": {"flip": 0.0, "randaugment": "no"}}))
    out = _main(capsys, "finetune", "--config", exp, "--no-progress", "--set", "seed=5")
    run = Path(out.strip().splitlines()[-1].split("run folder: ")[1])
    resolved = json.loads((run / "config.json").read_text())
    ft = resolved["finetune"]
    assert (ft["model"], ft["frames"], ft["epochs"], ft["batch_size"], ft["seed"]) == ("tiny", 2, 0, 4, 5)
    assert resolved["augment"]["flip"] == 0.0 and resolved["head"]["layers"] == 1
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["paradigm"] == "text4vis" and record["data_root"] == str(Path(demo_small.root).resolve())
    first = json.loads((run / "metrics.json").read_text())["final"]
    # rerun from the record alone, in another root: same run id and metrics; a flag given wins over it
    monkeypatch.setenv("CLIPCACHE_ROOT", str(tmp_path / "again"))
    out = _main(capsys, "finetune", "--config", run / "config.yaml", "--no-progress")
    again = Path(out.strip().splitlines()[-1].split("run folder: ")[1])
    assert again.name == run.name and json.loads((again / "metrics.json").read_text())["final"] == first
    out = _main(capsys, "finetune", "--config", run / "config.yaml", "--no-progress", "--frames", "3",
                "--run-dir", tmp_path / "f3")
    assert json.loads((tmp_path / "f3" / "config.json").read_text())["finetune"]["frames"] == 3
    assert "did you mean 'aug.flip'" in _fail(capsys, "finetune", "--config", exp, "--set", "aug.flp=0")
