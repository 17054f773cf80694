"""Evaluation: a head on a split of cached data (multi-view), a trained run folder, the metrics.

Shared by stage two (evaluation every ``eval_every`` epochs, and ``pipeline evaluate`` on a run
folder, possibly on another dataset's cache) and stage three (a fine-tuned backbone's frame
embeddings through its head). Metrics are top-1, top-5 and mean-class accuracy in percent.
A split's dataset comes from stages/data/open.py, whatever the source; its batches from
stages/data/loader.py (the batch plumbing, ``collate_items`` and ``to_device``: stages/data/batch.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, Subset

from cache.errors import CacheMismatchError, ConfigError, DatasetError
from cache.store import FeatureStore
from stages.checkpoint import load_checkpoint
from stages.classifiers import text_classifier
from stages.config import validate_choice
from stages.data.batch import to_device
from stages.data.loader import eval_loader
from stages.data.open import open_source, split_dataset
from stages.data.zarr_split import CacheSplit, check_cache_for_head, select_videos
from stages.dist import DistContext
from stages.heads.registry import Head, get_head_entry, make_cfg
from stages.runs import autocast

__all__ = ["EVAL_AVERAGES", "accuracy_metrics", "view_scores", "evaluate_head", "evaluate_run"]

EVAL_AVERAGES = ("scores", "embeddings")


# ----------------------------------------------------------------------------- metrics
def accuracy_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 and mean-class accuracy (percent)."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(dim=1)
    per_class = [correct1[labels == c].float().mean().item() for c in labels.unique()]
    return {"top1": 100 * correct1.float().mean().item(), "top5": 100 * correct5.float().mean().item(),
            "mean_class": 100 * float(np.mean(per_class)), "n": int(len(labels))}


@torch.no_grad()
def view_scores(head: Head, batch: dict[str, torch.Tensor], embeddings: bool, classifier: torch.Tensor | None = None,
                device=torch.device("cpu"), amp_dtype=None) -> torch.Tensor:
    """(B, K) scores of a batch of multi-view videos (tensors (B, V, ...)).

    ``embeddings`` False: the softmax scores of the views are averaged. True (Text4Vis): the
    video embeddings of the views are averaged as they come out of the head, and the average is
    normalised once by the cosine classifier, as Text4Vis's test code does (normalising each view
    first would weigh the views equally whatever their norm). ``classifier`` (K', E): score the
    average against it instead of the head's own W (zero-shot on other classes).
    """
    V = next(iter(batch.values())).shape[1]
    per_view = []
    for v in range(V):
        view = {k: t[:, v] for k, t in batch.items()}
        with autocast(device, amp_dtype):
            per_view.append(head.video_embedding(view).float() if embeddings else head(view)["logits"].float())
    stacked = torch.stack(per_view)  # (V, B, K) or (V, B, E)
    if not embeddings:
        return stacked.softmax(-1).mean(0)
    emb = stacked.mean(0)  # (V, B, E) -> (B, E), raw: normalised once below
    if classifier is None:
        return head.logits_from_embedding(emb)
    return F.normalize(emb, dim=-1) @ F.normalize(classifier.to(emb), dim=-1).T


def evaluate_head(head: Head, data: CacheSplit, device: torch.device, batch_size: int = 64,
                  average: str = "scores", classifier: torch.Tensor | None = None,
                  amp_dtype=None, dist_ctx: DistContext | None = None, split: bool = True,
                  keep: dict | None = None) -> dict[str, float]:
    """Multi-view evaluation: run each view, average scores (or embeddings, Text4Vis style).

    ``classifier`` (K', E) given: logits come from cosine similarity of the head's video
    embedding with it (zero-shot on other classes, cross-dataset evaluation). Under torchrun
    (``dist_ctx`` with several ranks) each rank scores every world-th video and the scores are
    gathered: every rank returns the metrics of the whole set (``split=False``: each rank's
    ``data`` is already its own share). ``keep``: a dict that receives the (N, K) "scores" and (N,)
    "labels" evaluated (stages/run_outputs.py writes a run's per-class results from them).
    """
    head.eval()
    ctx = dist_ctx or DistContext()
    use_emb = classifier is not None or average == "embeddings"
    if use_emb and not head.supports("video_embedding"):
        raise ConfigError(f"head '{head.name}' has no video embedding: it cannot average embeddings or swap classes")
    if ctx.enabled and split:
        data = data.rank_subset(ctx.rank, ctx.world) if isinstance(data, IterableDataset) else \
            Subset(data, range(ctx.rank, len(data), ctx.world))
    loader = eval_loader(data, batch_size, device)  # stored bytes, converted on the device (stages/data/loader.py)
    all_scores, all_labels = [], []
    for batch in loader:
        batch = to_device(batch, device)
        labels = batch.pop("label")
        scores = view_scores(head, batch, use_emb, classifier, device, amp_dtype)
        all_scores.append(scores.float().cpu())
        all_labels.append(labels.cpu())
    parts = ctx.all_objects((all_scores, all_labels))  # [(scores, labels)] of every rank
    scores = [x for p in parts for x in p[0]]
    labels = [x for p in parts for x in p[1]]
    if not scores:
        raise DatasetError("no videos to evaluate")
    scores, labels = torch.cat(scores), torch.cat(labels)
    if keep is not None:
        keep.update(scores=scores, labels=labels)
    return accuracy_metrics(scores, labels)


# ----------------------------------------------------------------------------- streaming sources
# A source other than a Zarr FeatureStore (stages/data/wds_split.WdsSource: WebDataset shards) builds its
# own dataset per split: an IterableDataset that shuffles itself through a buffer, seeded by
# set_epoch. Everything else treats it as a store (meta, labels, status, text, aux).
def evaluate_run(run_dir: str | Path, cache: str | Path | None = None, split: str = "val",
                 text_set: str = "", eval_average: str = "", allow_partial: bool = False,
                 outputs: str | Path | None = None) -> dict:
    """Evaluate a trained run, on its own cache or on another one (cross-dataset zero-shot).

    A cache is a Zarr folder or a WebDataset export's header: a run trained from shards is
    re-evaluated from its shards. On another dataset's cache the head's classifier is swapped for that cache's class text
    embeddings (cosine similarity with the head's video embedding), so the other cache must
    come from the same backbone weights and sampling. ``eval_average``: how multi-view scores are
    combined, "" for the rule the run was trained and evaluated with (its recorded ``eval_average``:
    a Text4Vis run on a 4x3 cache averages embeddings), so that the run's own split gives the run's
    own figure. ``outputs``: a folder to write the per-class results, confusion matrix and
    predictions into (stages/run_outputs.py).
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "last.pt"
    if not ckpt_path.exists():
        raise ConfigError(f"no checkpoint in run folder {run_dir}")
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or "head" not in ckpt or "cache" not in ckpt.get("config", {}):
        raise ConfigError(f"{run_dir} is not a stage-two run (a stage-three run keeps its evaluation in "
                          "metrics.json; `pipeline finetune-export` turns its backbone into a checkpoint to extract with)")
    if eval_average:
        validate_choice("average", eval_average, EVAL_AVERAGES)
    resolved = ckpt["config"]
    own = open_source(resolved["cache"], resolved.get("source", ""))
    target = open_source(cache) if cache else own
    head_cfg = {k: v for k, v in resolved["head"].items() if k != "name"}
    name = resolved["head"]["name"]
    head = get_head_entry(name).head_cls(make_cfg(name, head_cfg))
    head.load_state_dict(ckpt["head"])
    # the run's own rule (a closed-form head's run averaged scores whatever it recorded)
    eval_average = eval_average or ("scores" if head.uses_sklearn else resolved["train"].get("eval_average", "scores"))
    swap = target.key != own.key
    if swap:
        same = (target.info.backbone.weights == own.info.backbone.weights
                and target.info.backbone.arch == own.info.backbone.arch)
        if not same:
            raise CacheMismatchError(f"cache {target.path} was made with other backbone weights "
                                     f"({target.info.backbone.weights[:24]}...) than the run's cache")
        if not head.has_classifier:
            raise ConfigError(f"head '{name}' has no text classifier: it cannot be evaluated on other classes")
    elif text_set:
        raise ConfigError("a text set applies only when evaluating on another dataset's cache (--cache); "
                          "on its own cache a run keeps the classifier it was trained with")
    inputs = check_cache_for_head(target, head.data_keys(), name, [split])
    if isinstance(target, FeatureStore):
        target.require_sound({split: inputs[split].array_names()}, allow_partial, log=print)
    idx = select_videos(target, split)
    data = split_dataset(target, inputs[split], idx, train=False, label_map=None)
    classifier = None
    if swap:
        classifier = text_classifier(target, head, text_set or resolved["train"].get("text_set", ""))
    kept: dict = {}
    metrics = evaluate_head(head, data, torch.device("cpu"), average=eval_average, classifier=classifier, keep=kept)
    if outputs is not None:
        from stages.run_outputs import write_scores

        write_scores(Path(outputs), kept["scores"].numpy(), kept["labels"].numpy(), store=target, split=split,
                     indices=idx, classes=None, title=f"{name} ({split})")
    return {"run": str(run_dir), "cache": str(target.path), "split": split, "swapped_classifier": swap,
            "average": eval_average, **metrics}
