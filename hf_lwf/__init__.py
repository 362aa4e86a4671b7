"""hf_lwf: Learning With Forgetting ("Graceful Forgetting in Generative Language Models") for the HF Trainer."""

from .callback import LWFCallback
from .checkpoint import last_complete_checkpoint
from .config import LWFConfig, LWFTrainingArguments
from .run import LWFRun, LWFUnlearningError
from .state import LWFState
from .trainer import LWFTrainer, LWFTrainerMixin


__version__ = "0.1.0"

__all__ = [
    "LWFCallback", "LWFConfig", "LWFRun", "LWFState", "LWFTrainer", "LWFTrainerMixin", "LWFTrainingArguments",
    "LWFUnlearningError", "last_complete_checkpoint", "__version__",
]
