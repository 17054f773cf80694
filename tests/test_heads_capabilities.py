"""A new head is one file: registered from this test module, it trains through `train_head`.

Also the optional head capabilities (video embedding, logits from an embedding, frozen backbone
weights): declared on `Head` with defaults, present where a head overrides them, and what stage
two asks instead of probing attributes.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from cache.errors import ConfigError
from cache.meta import ProtocolRecord
from conftest import cli_in_process, extracted_store
from stages.evaluate import evaluate_run
from stages.heads import DataKeys, Head, create_head, example_batch, get_head_entry, register_head
from stages.recipes import protocol_eval_overrides
from stages.train import TrainCfg, train_head

NAME = "test_frame_mlp"


@dataclass
class FrameMLPCfg:
    num_classes: int = 400
    embed_dim: int = 512
    hidden: int = 64


@register_head(NAME, FrameMLPCfg, tiny={"num_classes": 4, "embed_dim": 32, "hidden": 16})
class FrameMLPHead(Head):
    """Frame mean -> MLP (the video embedding) -> linear classifier. Nothing outside this class
    and its decorator tells the pipeline it exists."""

    def __init__(self, cfg: FrameMLPCfg):
        super().__init__(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.embed_dim))
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def data_keys(self) -> DataKeys:
        return DataKeys(frame_emb=True)

    def video_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(batch["frame_emb"].float().mean(dim=1))  # (B, T, E) -> (B, E)

    def logits_from_embedding(self, video: torch.Tensor) -> torch.Tensor:
        return self.fc(video)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.logits_from_embedding(self.video_embedding(batch))}


@pytest.fixture(scope="module")
def store(demo_small, tmp_path_factory):
    """demo_small (4 classes) through the tiny CLIP, extracted in this process."""
    return extracted_store(demo_small.root, tmp_path_factory.mktemp("newhead") / "cache", text="clip_single")


def test_a_head_registered_from_a_test_module_trains_through_train_head(store, tmp_path):
    cfg = TrainCfg(head=NAME, epochs=3, batch_size=4, lr=1e-2, eval_average="embeddings")
    res = train_head(store, cfg, {"hidden": 8}, run_dir=tmp_path / "run", progress=False, log=lambda *a, **k: None)
    assert res["head"] == NAME and res["eval_videos"] == 8
    assert len(res["history"]) == 3 and all(h["train_loss"] > 0 for h in res["history"])
    assert 0 <= res["final"]["top1"] <= 100
    E = int(store.meta["dims"]["embed_dim"])
    assert res["trainable_params"] == (E * 8 + 8) + (8 * E + E) + (E * 4 + 4)  # dims from the cache, hidden=8
    # the run folder alone rebuilds the head through the registry and scores the same videos alike
    again = evaluate_run(tmp_path / "run", eval_average="embeddings")
    assert again["top1"] == pytest.approx(res["final"]["top1"]) and again["n"] == res["final"]["n"]


def test_evaluate_reuses_the_runs_averaging_rule(demo_small, tmp_path, capsys):
    """`pipeline evaluate --run RUN` on a multi-view cache combines the views as the run did (here
    embeddings), so it writes the run's own scores; `--average scores` is another rule, said so."""
    multi = extracted_store(demo_small.root, tmp_path / "cache", views="1x3", text="clip_single")
    cfg = TrainCfg(head=NAME, epochs=2, batch_size=4, lr=1e-2, eval_average="embeddings")
    res = train_head(multi, cfg, {"hidden": 8}, run_dir=tmp_path / "run", progress=False, log=lambda *a, **k: None)
    run = tmp_path / "run"
    code, out, err = cli_in_process(capsys, "evaluate", "--run", run)
    assert code == 0, err
    assert "embeddings averaged over views" in out and f"top1 {res['final']['top1']:.1f}%" in out
    assert (run / "eval-val" / "predictions.csv").read_text() == (run / "predictions.csv").read_text()
    code, out, err = cli_in_process(capsys, "evaluate", "--run", run, "--average", "scores")
    assert code == 0 and "scores averaged over views" in out, err
    assert (run / "eval-val" / "predictions.csv").read_text() != (run / "predictions.csv").read_text()
    assert evaluate_run(run)["average"] == "embeddings"


def test_capabilities_are_declared_where_a_head_overrides_them():
    assert FrameMLPHead.supports("video_embedding") and FrameMLPHead.supports("logits_from_embedding")
    assert not FrameMLPHead.supports("set_backbone_weights")
    assert get_head_entry("evl").head_cls.supports("set_backbone_weights")
    assert get_head_entry("text4vis").head_cls.supports("video_embedding")
    tap = create_head("tap", tiny=True)
    assert not tap.supports("video_embedding") and not tap.supports("set_backbone_weights")
    with pytest.raises(ConfigError, match="no video embedding"):
        tap.video_embedding(example_batch(tap))
    with pytest.raises(ConfigError, match="takes no backbone weights"):
        tap.set_backbone_weights({})
    with pytest.raises(ValueError, match="unknown head capability"):
        Head.supports("fly")
    # a protocol's embedding averaging reaches the heads that can average embeddings, and only those
    meta = types.SimpleNamespace(protocol=ProtocolRecord(name="text4vis", eval_average="embeddings"))  # a CacheMeta's field
    assert protocol_eval_overrides(meta, NAME)[0] == protocol_eval_overrides(meta, "text4vis")[0] \
        == {"eval_average": "embeddings"}
    assert protocol_eval_overrides(meta, "tap")[0] == {}


def test_the_default_logits_from_embedding_is_cosine_with_the_classifier():
    head = create_head("text4vis", tiny=True)
    K, E = head.classifier_shape()
    w = torch.randn(K, E, generator=torch.Generator().manual_seed(0))
    head.set_classifier(w)
    video = torch.randn(3, E, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.normalize(video, dim=-1) @ torch.nn.functional.normalize(w, dim=-1).T
    torch.testing.assert_close(Head.logits_from_embedding(head, video), expected)
    with pytest.raises(ConfigError, match="no classifier"):
        Head.logits_from_embedding(create_head("tap", tiny=True), video)
