"""A head from the user's own file: it trains through the CLI, and `heads --check` holds it to the contract."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import demo_args, run_cli

GOOD = textwrap.dedent('''
    from dataclasses import dataclass

    import torch
    from torch import nn

    from stages.heads import DataKeys, Head, register_head


    @dataclass
    class MeanMaxCfg:
        num_classes: int = 400   # filled from the cache
        embed_dim: int = 512     # filled from the cache
        hidden: int = 64


    @register_head("meanmax", MeanMaxCfg, tiny={"num_classes": 5, "embed_dim": 16, "hidden": 8})
    class MeanMaxHead(Head):
        """Mean and max of the frame embeddings, a small MLP."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.mlp = nn.Sequential(nn.Linear(2 * cfg.embed_dim, cfg.hidden), nn.GELU(),
                                     nn.Linear(cfg.hidden, cfg.num_classes))

        def data_keys(self):
            return DataKeys(frame_emb=True)

        def forward(self, batch):
            x = batch["frame_emb"].float()
            return {"logits": self.mlp(torch.cat([x.mean(1), x.amax(1)], -1))}
''')

# a parameter the forward never uses: no gradient; and a second head whose logits have the wrong width
BROKEN = GOOD.replace('"meanmax"', '"unused_param"').replace(
    "        self.mlp = nn.Sequential(",
    "        self.spare = nn.Linear(4, 4)\n        self.mlp = nn.Sequential(") + textwrap.dedent('''

    @register_head("wrong_width", MeanMaxCfg, tiny={"num_classes": 5, "embed_dim": 16})
    class WrongWidth(Head):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes - 1)

        def data_keys(self):
            return DataKeys(frame_emb=True)

        def forward(self, batch):
            return {"logits": self.fc(batch["frame_emb"].float().mean(1))}
''')


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("heads")
    out = {"good": GOOD, "broken": BROKEN, "raises": "import torch\nraise ValueError('no weights here')\n",
           "empty": "X = 1\n", "syntax": "def f(:\n"}
    for name, text in out.items():
        (d / f"{name}.py").write_text(text)
    (d / "notes.txt").write_text("x")
    return d


def test_heads_check_passes_a_good_head(files):
    proc = run_cli("heads", "--check", files / "good.py")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [l.split()[0] for l in lines[:-1]] == ["ok"] * 4 and all(" meanmax " in l for l in lines[:-1])
    assert "logits (3, 5)" in proc.stdout and lines[-1] == "4 of 4 checks passed"


def test_heads_check_fails_a_parameter_without_gradient_and_a_wrong_shape(files):
    proc = run_cli("heads", "--check", files / "broken.py")
    assert proc.returncode == 1
    fails = [l for l in proc.stdout.splitlines() if l.startswith("FAIL")]
    assert len(fails) == 2, proc.stdout
    assert "unused_param  gradients: no gradient for spare.weight, spare.bias" in fails[0]
    assert "wrong_width  output shape: logits (3, 4), expected (3, 5)" in fails[1]
    assert proc.stdout.splitlines()[-1] == "5 of 7 checks passed, 2 failed"


@pytest.mark.parametrize("case, words", [("missing.py", "no such file"), ("raises.py", "raised ValueError at line 2"),
                                         ("empty.py", "registers no head"), ("syntax.py", "raised SyntaxError"),
                                         ("notes.txt", "not a Python file")])
def test_a_bad_head_file_is_one_line_exit_2(files, case, words):
    runs = [["heads", "--check", files / case]]
    if case in ("missing.py", "raises.py"):  # train loads the file the same way
        runs.append(["train", "--head", "meanmax", "--head-module", files / case, "--cache", files])
    for args in runs:
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
        assert "Traceback" not in proc.stderr


def test_a_head_from_a_user_file_trains_from_the_cli(demo_small, files, tmp_path):
    cache = tmp_path / "cache"
    run_cli(*demo_args(demo_small, cache, "--text", "none"), check=True)
    run = tmp_path / "run"
    args = ["train", "--head-module", files / "good.py", "--head", "meanmax", "--cache", cache, "--set", "epochs=3",
            "--set", "batch_size=4", "--set", "hidden=16", "--run-dir", run, "--no-progress"]
    proc = run_cli(*args, check=True)
    assert "meanmax: top1" in proc.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["head"] == {"name": "meanmax", "num_classes": 4, "embed_dim": 32, "hidden": 16}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_params"] == (64 * 16 + 16) + (16 * 4 + 4) and len(metrics["history"]) == 3
    assert (run / "best.pt").exists() and (run / "predictions.csv").exists()
    again = run_cli(*args, check=True)  # the same command reuses the finished run
    assert "meanmax: top1" in again.stdout and json.loads((run / "metrics.json").read_text()) == metrics
    evaluated = run_cli("evaluate", "--run", run, "--head-module", files / "good.py", check=True)
    assert f"top1 {metrics['final']['top1']:.1f}%" in evaluated.stdout
    # without the file the head is unknown: one line naming the heads there are
    proc = run_cli("train", "--head", "meanmax", "--cache", cache, "--no-progress")
    assert proc.returncode == 2 and "unknown head 'meanmax'" in proc.stderr
