"""Stage one computes what OpenAI's CLIP computes (SPEC section 8).

OpenAI's weights were trained with QuickGELU; open_clip 3.x builds nn.GELU for `ViT-B-16` even
with pretrained='openai' and only warns. Here an implementation of OpenAI CLIP's architecture,
written below from the published description (no open_clip module in it), gets random weights
of the ViT-B/16 shape, and the model `extract` builds (stages.backbone.load_clip + FrozenCLIP,
and the text path of stages.text) must give the same image and text embeddings within 1e-5
relative (fp32), for the weights loaded

  (a) by the tag 'openai', served from a local offline Hugging Face hub cache (the file planted
      where open_clip's registry entry points: timm/vit_base_patch16_clip_224.openai), and
  (b) from a local OpenAI-format file: a TorchScript archive as OpenAI releases them.

The GELU build of the same weights must not match. A checkpoint whose activation cannot be
known is refused (one line, exit 2, nothing written).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import demo_args, run_cli

REL_TOL = 1e-5
WIDTH, HEADS, PATCH, IMAGE = 768, 12, 16, 224      # ViT-B/16's vision tower
T_WIDTH, T_HEADS, CONTEXT, VOCAB = 512, 8, 77, 49408  # its text tower
EMBED = 512
OPENAI_KEYS = {"input_resolution", "context_length", "vocab_size"}
# The full ViT-B-16 (12 + 12 blocks, 150M parameters) is slow on a CPU: the default run uses the
# same shapes with 2 + 2 blocks, registered with open_clip as an architecture of its own whose
# 'openai' registry entry is a copy of ViT-B-16's (so quick_gelu comes from open_clip's own
# metadata) that points at a hub repository of its own; `-m slow` runs the real ViT-B-16/'openai'.
SMALL_ARCH, SMALL_LAYERS, SMALL_REPO = "clipcache-test-b16-d2", 2, "clipcache-test/vit_b16_d2.openai"
FULL_ARCH, FULL_LAYERS, FULL_REPO = "ViT-B-16", 12, "timm/vit_base_patch16_clip_224.openai"  # open_clip's entry
PROMPTS = ["a video of a person brush hair.", "a video of a person passing American football (in game)."]


# ----------------------------------------------------------------------------- the reference
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one packed q/k/v projection and an output projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        n, length, width = x.shape
        head_dim = width // self.heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(width, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
        if mask is not None:
            scores = scores + mask
        out = torch.matmul(scores.softmax(dim=-1), v)  # (n, heads, length, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), mlp = c_fc, QuickGELU, c_proj."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class VisionTransformer(nn.Module):
    """Patches by a bias-free convolution, a class token, positions, ln_pre, the blocks; ln_post
    of the class token, then the projection."""

    def __init__(self, layers: int):
        super().__init__()
        grid = IMAGE // PATCH
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(WIDTH))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, layers, HEADS)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.empty(WIDTH, EMBED))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.conv1(image)                                    # (n, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)                         # (n, grid*grid, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        blocks = []
        for block in self.transformer.resblocks:
            x = block(x, None)
            blocks.append(x)
        return self.ln_post(x[:, 0]) @ self.proj, blocks


class OpenAICLIP(nn.Module):
    """The text tower: token + position embeddings, causally masked blocks, ln_final, the end-of-text
    token's features (the highest token id) through text_projection."""

    def __init__(self, layers: int):
        super().__init__()
        self.visual = VisionTransformer(layers)
        self.token_embedding = nn.Embedding(VOCAB, T_WIDTH)
        self.positional_embedding = nn.Parameter(torch.empty(CONTEXT, T_WIDTH))
        self.transformer = Transformer(T_WIDTH, layers, T_HEADS)
        self.ln_final = nn.LayerNorm(T_WIDTH)
        self.text_projection = nn.Parameter(torch.empty(T_WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # the extra entries of OpenAI's released checkpoints
        self.register_buffer("input_resolution", torch.tensor(IMAGE))
        self.register_buffer("context_length", torch.tensor(CONTEXT))
        self.register_buffer("vocab_size", torch.tensor(VOCAB))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)  # a token sees itself and what precedes it
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        for block in self.transformer.resblocks:
            x = block(x, mask)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection

    def forward(self, image: torch.Tensor, tokens: torch.Tensor):
        return self.visual(image)[0], self.encode_text(tokens)


def random_weights(model: nn.Module, seed: int = 0) -> None:
    """Seeded random values for every parameter, scaled so activations stay O(1) through 12 blocks
    (where GELU and QuickGELU differ by about 1%)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith((".weight", ".bias")) and ".ln_" in f".{name}":  # LayerNorm
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif name == "token_embedding.weight":
                p.copy_(0.02 * noise)
            elif name.endswith("positional_embedding"):
                p.copy_(0.01 * noise)
            elif name == "logit_scale":
                p.fill_(math.log(1 / 0.07))
            elif p.ndim == 1:  # class_embedding
                p.copy_(noise * p.shape[0] ** -0.5)
            elif name in ("visual.proj", "text_projection"):
                p.copy_(noise * p.shape[0] ** -0.5)  # used as x @ proj: fan-in is the first dim
            else:
                p.copy_(noise * math.prod(p.shape[1:]) ** -0.5)


# ----------------------------------------------------------------------------- fixtures
def _register_small_arch(folder: Path, monkeypatch) -> None:
    """ViT-B-16's open_clip config with 2 + 2 blocks, and a copy of its 'openai' registry entry."""
    import open_clip
    from open_clip import pretrained as registry

    cfg = open_clip.get_model_config(FULL_ARCH)
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = SMALL_LAYERS
    (folder / f"{SMALL_ARCH}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    entry = dict(registry.get_pretrained_cfg(FULL_ARCH, "openai"), hf_hub=f"{SMALL_REPO}/", url="")
    monkeypatch.setitem(registry._PRETRAINED, SMALL_ARCH, {"openai": entry})


@pytest.fixture(scope="module", params=["small", pytest.param("full", marks=pytest.mark.slow)])
def official(request, tmp_path_factory):
    """The reference with random weights, its outputs, and the weights in the two places (a), (b)."""
    import open_clip
    from safetensors.torch import save_file

    arch, layers, repo_id = ((SMALL_ARCH, SMALL_LAYERS, SMALL_REPO) if request.param == "small"
                             else (FULL_ARCH, FULL_LAYERS, FULL_REPO))
    root = tmp_path_factory.mktemp(f"official_clip_{request.param}")
    monkeypatch = pytest.MonkeyPatch()
    request.addfinalizer(monkeypatch.undo)
    if arch == SMALL_ARCH:
        _register_small_arch(root, monkeypatch)
    ref = OpenAICLIP(layers).eval()
    random_weights(ref)
    tokens = open_clip.get_tokenizer(arch)(PROMPTS)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image_emb, blocks = ref.visual(images)
        text_emb = ref.encode_text(tokens)
    state = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    # (a) the hub copy of OpenAI's weights is in open_clip's layout: no OpenAI-only entries
    hub = root / "hub"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v for k, v in state.items() if k not in OPENAI_KEYS}, str(snapshot / "open_clip_model.safetensors"))
    # (b) OpenAI's release format: a TorchScript archive of the model, with its extra entries
    archive = root / f"{arch}.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(ref, (images[:1], tokens[:1]), check_trace=False), str(archive))
    del ref
    return {"arch": arch, "layers": layers, "images": images, "tokens": tokens, "image_emb": image_emb,
            "cls": blocks[-1][:, 0], "text_emb": text_emb, "hub": hub,
            "hub_file": snapshot / "open_clip_model.safetensors", "archive": archive, "keys": set(state)}


@pytest.fixture
def offline_hub(official, monkeypatch):
    """open_clip's hub downloads served from the planted cache only (no network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(official["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return official["hub"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-row relative difference ||a - b|| / ||b||."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def _extract_outputs(model, official) -> dict[str, torch.Tensor]:
    """What stage one computes with ``model``: FrozenCLIP without and with a tap of the last block
    (the two encoder paths), and the cached text embedding (stages.text, normalised)."""
    import open_clip

    from stages.backbone import BackboneInfo, FrozenCLIP, model_config
    from stages.text import clip_text_embeddings

    arch = official["arch"]
    info = BackboneInfo.from_config(model_config(arch))
    plain = FrozenCLIP(model, (), False, info)(official["images"])
    tapped = FrozenCLIP(model, (official["layers"],), False, info)(official["images"])
    template = ["a video of a person {}."]
    classes = [p[len("a video of a person "):-1] for p in PROMPTS]
    text = torch.from_numpy(clip_text_embeddings(model, open_clip.get_tokenizer(arch), classes, template))[:, 0]
    return {"image": plain["frame_emb"], "image_tapped": tapped["frame_emb"], "cls": tapped["cls"][:, 0], "text": text}


def _assert_official(out: dict, official: dict) -> None:
    ref_text = F.normalize(official["text_emb"], dim=-1)
    errors = {"image": _rel(out["image"], official["image_emb"]),
              "image_tapped": _rel(out["image_tapped"], official["image_emb"]),
              "cls": _rel(out["cls"], official["cls"]),
              "text": _rel(out["text"], ref_text)}
    assert max(errors.values()) < REL_TOL, errors


# ----------------------------------------------------------------------------- the tests
def test_openai_tag_builds_the_official_model(official, offline_hub):
    from stages.backbone import checkpoint_activation, clip_identity, load_clip, model_activation

    arch = official["arch"]
    assert clip_identity(arch, "openai")["activation"] == "quick_gelu"
    model = load_clip(arch, "openai")  # served from the planted hub cache
    assert model_activation(model) == "quick_gelu"
    assert set(model.state_dict()) == official["keys"] - OPENAI_KEYS  # the reference's layout is open_clip's
    _assert_official(_extract_outputs(model, official), official)
    # the hub file alone (open_clip's layout) does not say which activation it needs
    assert checkpoint_activation(official["hub_file"]) == (None, "a state dict")


def test_openai_torchscript_file_builds_the_official_model(official):
    from stages.backbone import checkpoint_activation, load_clip, model_activation

    assert checkpoint_activation(official["archive"]) == ("quick_gelu", "an OpenAI TorchScript checkpoint")
    model = load_clip(official["arch"], str(official["archive"]))
    assert model_activation(model) == "quick_gelu"
    _assert_official(_extract_outputs(model, official), official)


def test_gelu_build_of_the_same_weights_is_not_the_official_model(official):
    """What open_clip builds unless told: nn.GELU. Named explicitly (the hub file alone cannot
    say), the same weights load and compute something else."""
    from stages.backbone import load_clip, model_activation

    model = load_clip(official["arch"], str(official["hub_file"]), activation="gelu")
    assert model_activation(model) == "gelu"
    out = _extract_outputs(model, official)
    assert _rel(out["image"], official["image_emb"]) > 100 * REL_TOL
    assert _rel(out["text"], F.normalize(official["text_emb"], dim=-1)) > 100 * REL_TOL


def test_activation_mismatch_is_an_error_not_a_warning(official, offline_hub):
    from cache.errors import ModelError
    from stages.backbone import load_clip

    for weights in ("openai", str(official["archive"])):
        with pytest.raises(ModelError, match="trained with quick_gelu"):
            load_clip(official["arch"], weights, activation="gelu")


def test_openai_state_dict_layout_is_recognised(tmp_path):
    """A state dict saved from OpenAI's model (its extra entries kept) is OpenAI's: QuickGELU. The
    built-in tiny model says GELU in its config, so OpenAI-format weights for it are a mismatch."""
    from cache.errors import ModelError
    from stages.backbone import checkpoint_activation, load_clip, model_activation

    state = dict(load_clip("tiny", seed=3).state_dict())
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(VOCAB))
    path = tmp_path / "openai_layout.pt"
    torch.save(state, path)
    assert checkpoint_activation(path) == ("quick_gelu", "an OpenAI-format state dict")
    with pytest.raises(ModelError, match="clipcache-tiny builds gelu.*trained with quick_gelu"):
        load_clip("tiny", str(path))
    # a clipcache record names the activation; loading drops it with OpenAI's entries
    state["clipcache_activation"] = "gelu"
    for k in OPENAI_KEYS:
        del state[k]
    torch.save(state, path)
    assert checkpoint_activation(path) == ("gelu", "the checkpoint's own record")
    model = load_clip("tiny", str(path))
    assert model_activation(model) == "gelu"
    assert torch.equal(model.state_dict()["visual.proj"], state["visual.proj"])


def test_cli_refuses_a_checkpoint_whose_activation_is_unknown(demo_small, tmp_path):
    """An open_clip-layout file without a record says nothing about its activation: refused in one
    line, exit 2, nothing written. Named by the user, the activation goes into the cache key."""
    from pipeline.datasets import load_dataset
    from stages.backbone import load_clip
    from stages.extract import ExtractCfg, plan_extraction

    ckpt = tmp_path / "laion_or_openai.pt"
    torch.save(load_clip("tiny").state_dict(), ckpt)
    out = tmp_path / "cache"
    proc = run_cli(*demo_args(demo_small, out, "--model", "ViT-B-16", "--pretrained", ckpt, "--text", "none"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot tell which activation" in lines[0] and "--activation" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]

    spec = load_dataset("demo", data_root=demo_small.root)
    plans = {act: plan_extraction(spec, ExtractCfg(model="ViT-B-16", pretrained=str(ckpt), activation=act,
                                                   text="none"), out=out) for act in ("gelu", "quick_gelu")}
    assert plans["gelu"].key != plans["quick_gelu"].key
    assert plans["quick_gelu"].meta.content.clip["activation"] == "quick_gelu"
    assert plans["quick_gelu"].meta.backbone.activation_from == "--activation quick_gelu"
    assert not out.exists()


def test_cache_records_activation_resize_and_interpolation(demo_small, tmp_path):
    """The 'openai' tag keys and records QuickGELU (the plan reads open_clip's registry, nothing is
    downloaded); a mismatching --activation is refused before anything is written."""
    from cache.errors import ModelError
    from pipeline.datasets import load_dataset
    from stages.extract import ExtractCfg, describe_plan, plan_extraction

    spec = load_dataset("demo", data_root=demo_small.root)
    out = tmp_path / "cache"
    with pytest.raises(ModelError, match="--activation gelu builds gelu.*trained with quick_gelu"):
        plan_extraction(spec, ExtractCfg(model="ViT-B-16", pretrained="openai", activation="gelu"), out=out)
    plan = plan_extraction(spec, ExtractCfg(model="ViT-B-16", pretrained="openai", text="none"), out=out)
    assert plan.meta.content.clip == {"activation": "quick_gelu", "resize": "short_side_then_square_crop",
                                            "interpolation": "bicubic_antialias"}
    assert plan.meta.backbone.activation == "quick_gelu"
    assert plan.meta.backbone.activation_from == "open_clip's registry entry of ViT-B-16 'openai'"
    assert any("activation quick_gelu" in line for line in describe_plan(plan))
    laion = plan_extraction(spec, ExtractCfg(model="ViT-B-16", pretrained="laion2b_s34b_b88k", text="none"), out=out)
    assert laion.meta.content.clip["activation"] == "gelu"
    assert plan_extraction(spec, ExtractCfg(model="tiny", text="none"), out=out).meta.content.clip["activation"] \
        == "gelu"
    json.dumps(plan.meta.to_dict())  # the metadata stays plain JSON
    assert not out.exists()


def test_pretrained_tag_without_a_network_names_the_file_to_fetch(demo_small, tmp_path):
    """`--pretrained openai` offline (the tests run with HF_HUB_OFFLINE=1, as a machine without a
    network ends up): one line naming the file, where it comes from and the flags that take it,
    exit 2, no hub chatter, no cache folder; `--dry-run` says the same before a run starts."""
    base = ["extract", "--dataset", "demo", "--data-root", demo_small.root, "--model", "ViT-B-16", "--pretrained",
            "openai", "--out", tmp_path / "c", "--no-progress"]
    proc = run_cli(*base)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the 'openai' weights of ViT-B-16 are not on this machine")
    assert "/ViT-B-16.pt on a machine with a network, then pass --pretrained /path/to/ViT-B-16.pt " \
           "--activation quick_gelu" in lines[0]
    assert not (tmp_path / "c").exists()
    dry = run_cli(*base, "--dry-run", check=True).stdout
    assert "weights  'openai' of ViT-B-16: not downloaded yet" in dry and "--pretrained /path/to/ViT-B-16.pt" in dry


def test_extract_and_finetune_default_to_the_papers_backbone_with_its_openai_weights(demo_small, tmp_path):
    """One set of defaults: ViT-B-16 with OpenAI's weights for extract (and finetune); the built-in
    models a random init; a model without default weights is told to name them."""
    from cache.errors import ModelError
    from stages.backbone import resolve_pretrained

    assert resolve_pretrained("ViT-B-16", "auto")[0] == "openai"
    assert resolve_pretrained("tiny", "auto")[0] == "" and resolve_pretrained("ViT-B-16", "none")[0] == ""
    assert resolve_pretrained("ViT-B-16", "laion400m_e32") == ("laion400m_e32", "")
    with pytest.raises(ModelError, match=r"has no default weights: pass --pretrained TAG or PATH \(its tags: "
                                         r"datacomp_s34b_b86k\)"):
        resolve_pretrained("ViT-B-32-256", "auto")
    dry = run_cli("extract", "--dataset", "demo", "--data-root", demo_small.root, "--out", tmp_path / "c",
                  "--dry-run", check=True).stdout
    assert "weights: openai (the default for ViT-B-16" in dry and "model  ViT-B-16" in dry
    assert "weights  'openai' of ViT-B-16: not downloaded yet" in dry
