"""What the `pipeline` command modules share: the options several commands take, declared once; the
tables of options an experiment file may set; and the few helpers every command prints with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.datasets import list_datasets


# ----------------------------------------------------------------------------- dataset and backbone options
# The options of every command that reads a dataset's videos (extract, finetune), declared once.
DatasetName = Annotated[str, typer.Option(help=" | ".join(list_datasets()))]
DataRoot = Annotated[Optional[Path], typer.Option(help="Dataset folder (official layout or demo folder).")]
VideoRoot = Annotated[Optional[Path], typer.Option(help="Folder the list paths are relative to.")]
TrainList = Annotated[Optional[Path], typer.Option(
    help="Train list: 'path label' lines (videos), or 'folder num_frames label' lines (frame folders).")]
ValList = Annotated[Optional[Path], typer.Option(help="Val list.")]
TestList = Annotated[Optional[Path], typer.Option(help="Test list.")]
ClassesFile = Annotated[Optional[Path], typer.Option(help="Class names: one per line, or CSV id,name.")]
SplitId = Annotated[int, typer.Option(help="Official split number (UCF-101, HMDB-51).")]
Pretrained = Annotated[str, typer.Option(help="open_clip pretrained tag or a local checkpoint path; auto: openai "
                                              "for an open_clip model that has it, a random init for the built-in "
                                              "tiny / small / demo; none: a random init.")]
Model = Annotated[str, typer.Option(help="open_clip model name (ViT-B-16, ViT-L-14, ...), or the built-in tiny / "
                                         "small / demo.")]
InitSeed = Annotated[int, typer.Option(help="Seed of the random init when no --pretrained is given.")]
Activation = Annotated[str, typer.Option(
    help="MLP activation the weights were trained with: auto (from the tag, the checkpoint or the model name; "
         "a checkpoint that cannot say is refused) | gelu | quick_gelu (OpenAI-trained weights).")]
Frames = Annotated[int, typer.Option(help="Frames per clip (T).")]
PerStepBatch = Annotated[Optional[int], typer.Option(
    help="Videos per step and process (the global batch is reached by gradient accumulation).")]
GlobalBatch = Annotated[Optional[int], typer.Option(
    help="Videos per optimiser step (default: the recipe's); the recipe's lr is scaled linearly unless lr is set.")]


# ----------------------------------------------------------------------------- experiment files
# Options of `train`, `compare-init` and `finetune` an experiment file may hold at top level (the others:
# --set's keys), with their types; those that set a config field are written under the field's name in config.yaml.
TRAIN_FILE_OPTIONS = {"head": "str", "cache": "path", "dataset": "str", "cache_root": "path", "run_dir": "path",
                      "recipe": "str", "wds": "str", "wds_header": "str", "wds_eval": "str", "wds_shuffle": "int",
                      "wds_resample": "bool", "allow_partial": "bool", "head_module": "path"}
TRAIN_FLAG_FIELDS = {"shots": "shots", "fraction": "fraction", "train_classes": "train_classes",
                     "test_classes": "test_classes", "init": "classifier_init", "batch": "batch_size",
                     "global_batch": "global_batch", "epochs": "epochs", "online": "online", "online_aug": "online_aug"}
# compare-init's grid may be in the file too (a run's config.yaml holds train.seed, train.shots, ...: the
# grid sets those)
COMPARE_FILE_OPTIONS = {"head": "str", "cache": "path", "dataset": "str", "cache_root": "path", "recipe": "str",
                        "inits": "str", "seeds": "str", "shots": "str", "frozen": "str"}
FINETUNE_FILE_OPTIONS = {"paradigm": "str", "dataset": "str", "data_root": "path", "video_root": "path",
                         "train_list": "path", "val_list": "path", "test_list": "path", "classes": "path",
                         "split_id": "int", "run_dir": "path", "recipe": "str"}
FINETUNE_FLAG_FIELDS = {"model": "model", "pretrained": "pretrained", "init_seed": "init_seed",
                        "activation": "activation", "frames": "frames", "views": "views", "epochs": "epochs",
                        "grad_checkpointing": "grad_checkpointing", "batch": "batch_size",
                        "global_batch": "global_batch"}
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="Experiment file (YAML): the keys of --set, and this command's options, at top level or under "
                     "sections (see configs/). Precedence: recipe < this file < --set < flags given here. A run "
                     "folder's config.yaml runs that run again.")]


def experiment_file(ctx: typer.Context, config: Optional[Path], own: dict, flag_fields: dict):
    """(the command's options, the experiment file's other keys, {field: flag value given}): stages/resolve.py's
    ``experiment_options`` with the options given on the command line (or by their environment variable;
    a flag given equal to its default counts: it still overrides the experiment file and --set)."""
    from stages.resolve import experiment_options

    given = {name for name in ctx.params  # typer's own copy of click's ParameterSource: compared by name
             if (src := ctx.get_parameter_source(name)) is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")}
    return experiment_options(config, ctx.params, given, own, flag_fields)


# ----------------------------------------------------------------------------- printing
def main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def say(lines: list[str]) -> None:
    """A resolution's lines, printed once (by the main rank under torchrun)."""
    for line in lines if main_rank() else ():
        typer.echo(line)


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)
