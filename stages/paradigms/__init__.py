"""Stage three's paradigms (stages/finetune.py runs them): one module each, registered by name."""
# isort: skip_file  (the import order is the registration order, which the CLI lists)

from stages.paradigms.base import Paradigm, gather_outputs, get_paradigm, list_paradigms, register_paradigm
from stages.paradigms.text4vis import Text4Vis  # noqa: E402  (registration order: the CLI's order)
from stages.paradigms.actionclip import ActionCLIP  # noqa: E402

__all__ = ["Paradigm", "Text4Vis", "ActionCLIP", "register_paradigm", "get_paradigm", "list_paradigms",
           "gather_outputs"]
