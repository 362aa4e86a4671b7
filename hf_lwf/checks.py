"""Construction-time checks of an LWF run: model, tokenizer, prompts, train set and schedule."""

from __future__ import annotations

from transformers.utils import logging

from .config import LWFConfig
from .method.selfgen import check_can_generate, context_length, encode_prompts


logger = logging.get_logger(__name__)


def check_model(config: LWFConfig, prompts: dict[str, list[str]], model, tokenizer) -> None:
    """The model can generate, the tokenizer pads, and every prompt leaves room for ``lwf_max_new_tokens``."""
    check_can_generate(model, tokenizer)
    encode_prompts(tokenizer, prompts, context_length(model), config.lwf_max_new_tokens)


def check_train_dataset(config: LWFConfig, dataset) -> None:
    """The empirical Fisher and the early schedule draw learning examples by index: they need a map-style set."""
    if config.lwf_fisher != "empirical" and config.lwf_schedule != "early":
        return
    if dataset is not None and not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(
            f"lwf_fisher={config.lwf_fisher!r} with lwf_schedule={config.lwf_schedule!r} draws learning examples by "
            f"index, which a streaming/iterable train set ({type(dataset).__name__}) cannot give: use a map-style "
            "dataset, or lwf_fisher='online' with lwf_schedule='periodic'."
        )


def warn_if_unreachable(config: LWFConfig, max_steps: int) -> None:
    """A periodic run shorter than ``lwf_unlearn_every`` reaches no unlearning point: say so before it starts."""
    every = config.lwf_unlearn_every
    if config.lwf_schedule == "periodic" and 0 < max_steps < every:
        logger.warning(
            f"This run has {max_steps} optimizer steps < lwf_unlearn_every={every}: no unlearning point will be "
            "reached and nothing will be forgotten. Lower `lwf_unlearn_every` or train longer."
        )
