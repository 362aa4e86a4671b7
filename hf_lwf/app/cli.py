"""The ``hf-lwf`` command line (also ``python -m hf_lwf``): ``train``, ``inspect`` and ``demo``.

Every command is an ``HfArgumentParser`` over dataclasses, so every :class:`~hf_lwf.LWFTrainingArguments` field
(all of ``TrainingArguments`` plus the ``lwf_*`` fields) is a flag. A YAML or JSON config file may be given as
the first argument; flags given after it override its values::

    hf-lwf train config.yaml --learning_rate 1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import HfArgumentParser

from .. import __version__
from ..config import LWFTrainingArguments


PROG = "hf-lwf"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DTYPES = ("float32", "bfloat16", "float16")

logger = logging.getLogger("hf_lwf")


# --------------------------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str = field(
        metadata={
            "help": "Causal LM to fine-tune: a Hub model id or a local directory (with --gguf_file: the directory or "
            "Hub repository holding that GGUF file)."
        }
    )
    gguf_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "GGUF file inside model_name_or_path. It is dequantised (so the Trainer can fine-tune it) and "
            "cached once as safetensors."
        },
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where the converted GGUF checkpoint is cached (default: $HF_LWF_CACHE or ~/.cache/hf_lwf)."},
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Load the weights in this dtype (default: the checkpoint's).", "choices": DTYPES},
    )


@dataclass
class DataArguments:
    _argument_group_name = "learning data"

    dataset: str = field(
        metadata={
            "help": "Learning-task data: a local .json/.jsonl/.csv/.parquet/.txt file, a save_to_disk folder, or a "
            "Hub dataset id."
        }
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Split of a Hub dataset to train on."})
    eval_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Optional evaluation data (same formats); its loss is reported after training."},
    )
    eval_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "Split for evaluation: of --eval_dataset when it is a Hub id (default 'validation'), or of "
            "--dataset when --eval_dataset is not given."
        },
    )
    prompt_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Column with the prompt (default: the first of prompt, question, instruction, input). The prompt "
            "is a user turn of the chat template when the tokenizer has one, and is not trained on."
        },
    )
    response_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column with the response (default: the first of response, answer, output, completion)."},
    )
    text_column: Optional[str] = field(
        default=None,
        metadata={"help": "Train on plain text in this column, every token (instead of prompt/response pairs)."},
    )
    max_length: int = field(default=512, metadata={"help": "Truncate learning sequences to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N learning rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N evaluation rows."})

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2 (got {self.max_length}).")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer (got {value}).")


@dataclass
class TrainCommandArguments:
    _argument_group_name = "train command"

    lwf: bool = field(
        default=True,
        metadata={
            "help": "Run Learning With Forgetting. --no_lwf fine-tunes without it (the baseline to compare with, "
            "same data and arguments)."
        },
    )
    plots: bool = field(default=True, metadata={"help": "Write the PNG plots next to report.json (needs matplotlib)."})


@dataclass
class InspectArguments:
    _argument_group_name = "inspect command"

    inspect_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Learning steps before scoring (default: lwf_unlearn_every, i.e. where a real run scores first). "
            "The run's learning-rate schedule is kept."
        },
    )
    show: int = field(
        default=20,
        metadata={"help": "Print the top and bottom N samples of the ranking (0: all). Files always hold all."},
    )
    text_width: int = field(default=70, metadata={"help": "Characters of each sample's text in the printed table."})


# ------------------------------------------------------------------------------------------------ parsing
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=32, width=None):
        if width is None:
            import shutil

            width = min(shutil.get_terminal_size((110, 24)).columns, 120) - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action):
        if action.required:
            return f"{action.help} (required)"
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        # "--max_steps, --max-steps N" instead of "--max_steps MAX_STEPS, --max-steps MAX_STEPS"
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, 'VALUE')}"


def build_parser(dataclass_types: Sequence[type], prog: str, description: str, epilog: str | None = None) -> HfArgumentParser:
    """An ``HfArgumentParser`` over ``dataclass_types`` with an optional positional config file."""
    parser = HfArgumentParser(
        list(dataclass_types), prog=prog, usage=f"{prog} [CONFIG.yaml|CONFIG.json] [--flag value ...]",
        description=description, epilog=epilog, formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML or JSON file of {argument: value}; flags given after it override its values.",
    )
    _organize_help(parser)
    return parser


def _organize_help(parser: argparse.ArgumentParser) -> None:
    """Help layout only: the command's own groups first, then the lwf_* flags, then the TrainingArguments flags."""
    optionals = parser._optionals
    lwf_group = parser.add_argument_group(
        "Learning With Forgetting (lwf_*; step numbers refer to the method: 1 self-generation, 2 Fisher and "
        "intended update, 3 confidence, 4 selection, 5 unlearning)"
    )
    moved = [a for a in optionals._group_actions if a.dest.startswith("lwf_")]
    for action in moved:
        optionals._group_actions.remove(action)
        lwf_group._group_actions.append(action)
    for action in optionals._group_actions + parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_") and action.nargs == 0:
            action.help = f"Same as --{action.option_strings[0][len('--no_'):]} false."
    optionals.title = "training (every transformers.TrainingArguments field)"
    groups = [g for g in parser._action_groups if g not in (parser._positionals, optionals, lwf_group)]
    parser._action_groups[:] = [parser._positionals, *groups, lwf_group, optionals]


def read_config_file(path: str) -> dict[str, Any]:
    """The ``{argument: value}`` mapping of a YAML or JSON config file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in CONFIG_SUFFIXES:
        raise ValueError(f"Config file {path!r} must end in .yaml, .yml or .json.")
    with open(path, encoding="utf-8") as handle:
        if extension == ".json":
            data = json.load(handle)
        else:
            import yaml

            data = yaml.safe_load(handle)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"Config file {path!r} must hold a mapping of argument names to values.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """Convert a config-file string (``1e-4`` is a string to YAML) with the flag's own type."""
    convert = action.type
    if convert in (None, str) or not callable(convert):
        return value
    try:
        if isinstance(value, str):
            return convert(value)
        if isinstance(value, list) and action.nargs in ("+", "*"):
            return [convert(v) if isinstance(v, str) else v for v in value]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"config file: invalid value {value!r} for {key!r}: {err}") from None
    return value


def parse_command(
    parser: HfArgumentParser,
    argv: Sequence[str],
    defaults: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
) -> tuple[Any, ...]:
    """Parse ``[config file] [flags]`` into the parser's dataclasses.

    Precedence: flags given on the command line > config file > ``defaults`` (a mapping, or a function of the
    user's values returning one) > the dataclass defaults.
    """
    argv = list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        parser.print_help()
        raise SystemExit(0)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    required = [a for a in actions.values() if a.required]
    saved = [(a, a.default, a.required) for a in actions.values()]
    saved_defaults, parser._defaults = parser._defaults, {}
    for action in actions.values():  # parse only what is given, so the config file can fill the rest
        action.default, action.required = argparse.SUPPRESS, False
    try:
        namespace = parser.parse_args(argv)
    finally:
        parser._defaults = saved_defaults
        for action, default, is_required in saved:
            action.default, action.required = default, is_required
    explicit = vars(namespace)
    config_path = explicit.pop("config", None)
    user: dict[str, Any] = {}
    if config_path is not None:
        try:
            from_file = read_config_file(config_path)
            unknown = sorted(set(from_file) - set(actions))
            if unknown:
                raise ValueError(f"config file {config_path}: unknown argument(s) {', '.join(unknown)}")
            user.update({k: _coerce(actions[k], k, v) for k, v in from_file.items()})
        except (OSError, ValueError) as err:
            parser.error(str(err))
    user.update(explicit)
    values = dict(defaults(user) if callable(defaults) else (defaults or {}))
    values.update(user)
    missing = [a.option_strings[0] for a in required if a.dest not in values]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        return parser.parse_dict(values)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def hardware_defaults(user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``use_cpu=True`` on a machine without an accelerator, so that a config written for a GPU (``bf16: true``)
    runs as written on a CPU instead of stopping in ``TrainingArguments``; a given ``use_cpu`` always wins."""
    import torch

    accelerated = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or (
        torch.backends.mps.is_available())
    return {} if accelerated else {"use_cpu": True}


def _setup_logging(training_args=None) -> None:
    level = logging.INFO
    if training_args is not None and not training_args.should_log:
        level = logging.WARNING
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[hf-lwf] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


# ------------------------------------------------------------------------------------------------- train
TRAIN_EPILOG = """examples:
  hf-lwf train --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset gsm8k/train.jsonl \\
      --prompt_column question --response_column answer \\
      --lwf_forget_prompts dental/validation.jsonl --lwf_forget_prompt_column question \\
      --output_dir runs/smollm2 --max_steps 200 --learning_rate 5e-5
  hf-lwf train examples/llama3.2-1b-gsm8k-forget-dental.yaml --learning_rate 1e-5
  hf-lwf train config.yaml --no_lwf --output_dir runs/baseline      # the same run without LWF
  hf-lwf train config.yaml --resume_from_checkpoint true            # continue from the newest complete checkpoint

Writes to output_dir: the model (safetensors) and tokenizer, lwf_config.json, report.json, and the plots
learning_loss.png, forget_loss.png and confidence_histogram.png.
"""


def train_parser() -> HfArgumentParser:
    return build_parser(
        [ModelArguments, DataArguments, TrainCommandArguments, LWFTrainingArguments],
        prog=f"{PROG} train",
        description="Fine-tune a causal LM on a learning task with Learning With Forgetting: self-generate D_self\n"
        "from the forgetting prompts, score it with the learning task's Fisher and intended update, and\n"
        "periodically unlearn the samples that conflict most with the learning task.",
        epilog=TRAIN_EPILOG,
    )


def load_learning_data(model_args, data_args, tokenizer):
    """The tokenised train (and optional eval) datasets of the train/inspect commands."""
    from .learning_data import load_learning_dataset, prepare_learning_dataset

    columns = dict(
        prompt_column=data_args.prompt_column,
        response_column=data_args.response_column,
        text_column=data_args.text_column,
        max_length=data_args.max_length,
    )
    raw = load_learning_dataset(data_args.dataset, data_args.train_split, data_args.dataset_config)
    train = prepare_learning_dataset(raw, tokenizer, max_samples=data_args.max_train_samples, **columns)
    evaluation = None
    if data_args.eval_dataset is not None or data_args.eval_split is not None:
        source = data_args.eval_dataset or data_args.dataset
        split = data_args.eval_split or "validation"
        raw_eval = load_learning_dataset(source, split, data_args.dataset_config)
        evaluation = prepare_learning_dataset(raw_eval, tokenizer, max_samples=data_args.max_eval_samples, **columns)
    return train, evaluation


def _load_model(model_args):
    from .models import load_model_and_tokenizer

    return load_model_and_tokenizer(
        model_args.model_name_or_path, gguf_file=model_args.gguf_file, cache_dir=model_args.cache_dir,
        torch_dtype=model_args.torch_dtype,
    )


def run_train(argv: Sequence[str]) -> int:
    parser = train_parser()
    model_args, data_args, command_args, training_args = parse_command(parser, argv, defaults=hardware_defaults)
    if command_args.lwf and training_args.lwf_forget_prompts is None:
        parser.error("--lwf_forget_prompts is required (or --no_lwf for plain fine-tuning).")
    _setup_logging(training_args)

    from transformers import Trainer, set_seed

    from .learning_data import LearningCollator
    from .report import REPORT_JSON, final_loss, loss_curve, lwf_summary, write_plots, write_report
    from ..checkpoint import resolve_resume
    from ..trainer import LWFTrainer

    timings: dict[str, float] = {}
    start = time.perf_counter()
    set_seed(training_args.seed)
    model, tokenizer = _load_model(model_args)
    timings["load_seconds"] = time.perf_counter() - start
    train_dataset, eval_dataset = load_learning_data(model_args, data_args, tokenizer)
    logger.info(f"Learning data: {len(train_dataset)} training examples"
                + (f", {len(eval_dataset)} evaluation examples." if eval_dataset is not None else "."))
    trainer_class = LWFTrainer if command_args.lwf else Trainer
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=LearningCollator(tokenizer.pad_token_id), processing_class=tokenizer,
    )
    resume = training_args.resume_from_checkpoint
    resume = True if isinstance(resume, str) and resume.lower() in ("true", "last") else resume
    if not command_args.lwf:  # LWFTrainer resolves it itself: the newest complete checkpoint
        resume = resolve_resume(training_args, resume)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    timings["train_seconds"] = time.perf_counter() - start
    trainer.save_model()
    trainer.save_state()
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("train", metrics)
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        report = {
            "command": "train",
            "version": __version__,
            "lwf": command_args.lwf,
            "model": dataclasses.asdict(model_args),
            "data": {**dataclasses.asdict(data_args), "train_examples": len(train_dataset),
                     "eval_examples": len(eval_dataset) if eval_dataset is not None else None},
            "training_args": training_args.to_dict(),
            "metrics": metrics,
            "final_train_loss": final_loss(history),
            "timings": timings,
            "log_history": history,
        }
        callback = getattr(trainer, "lwf_callback", None)
        if callback is not None:
            report["lwf_summary"] = lwf_summary(callback)
        path = write_report(os.path.join(training_args.output_dir, REPORT_JSON), report)
        plots = []
        if command_args.plots:
            label = "LWF" if command_args.lwf else "fine-tuning"
            plots = write_plots(
                training_args.output_dir, {label: loss_curve(history)},
                lwf_state=callback.lwf_state if callback is not None else None,
                cap=training_args.lwf_forget_loss_cap,
            )
        print(f"Model saved to {training_args.output_dir}; report: {path}" + (f"; plots: {', '.join(plots)}" if plots else ""))
    return 0


# ----------------------------------------------------------------------------------------------- inspect
INSPECT_EPILOG = """examples:
  hf-lwf inspect config.yaml --output_dir runs/preview
  hf-lwf inspect --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset gsm8k/train.jsonl \\
      --lwf_forget_prompts dental/validation.jsonl --lwf_forget_prompt_column question \\
      --output_dir runs/preview --max_steps 200 --inspect_steps 25 --show 10

Writes inspect.json (summary and every sample) and inspect.jsonl (one ranked sample a line) to output_dir, plus
D_self (_lwf_self_data/), which a later run does not reuse. No model is saved.
"""


def inspect_parser() -> HfArgumentParser:
    return build_parser(
        [ModelArguments, DataArguments, InspectArguments, LWFTrainingArguments],
        prog=f"{PROG} inspect",
        description="Preview what LWF would forget: build D_self, run the first learning window (inspect_steps\n"
        "steps) with the online Fisher, score every self-generated sample and print the ranking with its\n"
        "text, confidence and whether it falls in D_U. No unlearning is applied and no model is saved.",
        epilog=INSPECT_EPILOG,
    )


def run_inspect(argv: Sequence[str]) -> int:
    parser = inspect_parser()
    model_args, data_args, inspect_args, training_args = parse_command(parser, argv, defaults=hardware_defaults)
    if training_args.lwf_forget_prompts is None:
        parser.error("--lwf_forget_prompts is required.")
    if inspect_args.show < 0 or inspect_args.text_width < 10:
        parser.error("--show must be >= 0 and --text_width >= 10.")
    _setup_logging(training_args)

    from transformers import set_seed

    from .learning_data import LearningCollator
    from .inspect import format_table, run_inspection, save_inspection

    set_seed(training_args.seed)
    model, tokenizer = _load_model(model_args)
    train_dataset, _ = load_learning_data(model_args, data_args, tokenizer)
    try:
        result = run_inspection(
            model, tokenizer, train_dataset, training_args, data_collator=LearningCollator(tokenizer.pad_token_id),
            inspect_steps=inspect_args.inspect_steps,
        )
    except ValueError as err:
        parser.error(str(err))
    if training_args.should_save:
        json_path, jsonl_path = save_inspection(result, training_args.output_dir)
        samples = result["samples"]
        print(
            f"\nForgetting confidence of {len(samples)} self-generated samples after {result['inspect_steps']} "
            f"learning steps (lr {result['learning_rate']:.3g}); {result['num_selected']} selected for D_U "
            f"(lwf_selection={training_args.lwf_selection}).\n"
        )
        print(format_table(samples, limit=inspect_args.show or None, width=inspect_args.text_width))
        print(f"\nSaved {json_path} and {jsonl_path}.")
    return 0


# -------------------------------------------------------------------------------------------------- demo
def demo_parser() -> HfArgumentParser:
    from .demo import DEMO_DESCRIPTION, DEMO_EPILOG, DemoArguments, demo_defaults

    parser = build_parser(
        [DemoArguments, LWFTrainingArguments], prog=f"{PROG} demo", description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG
    )
    parser.set_defaults(**demo_defaults(quick=False))  # so --help shows the demo's own defaults
    return parser


def run_demo_command(argv: Sequence[str]) -> int:
    from .demo import demo_defaults, run_demo

    parser = demo_parser()
    demo_args, training_args = parse_command(
        parser, argv, defaults=lambda user: {**hardware_defaults(), **demo_defaults(bool(user.get("quick")))}
    )
    if training_args.lwf_forget_prompts is not None:
        parser.error("the demo uses its built-in forgetting prompts; use `hf-lwf train` for your own.")
    _setup_logging(training_args)
    try:
        run_demo(demo_args, training_args)
    except ImportError as err:  # the SmolLM2 package or gguf is missing: say how to install it
        print(f"{PROG} demo: {err}", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------------------------------------- main
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (run_train, "fine-tune a model on a learning task with LWF; save the model, report.json and plots"),
    "inspect": (run_inspect, "score the self-generated data after a short learning window and show what would be forgotten"),
    "demo": (run_demo_command, "offline demo: SmolLM2-135M on arithmetic, base vs fine-tuning vs LWF"),
}

TOP_HELP = f"""usage: {PROG} {{train,inspect,demo}} [CONFIG.yaml|CONFIG.json] [--flag value ...]

Learning With Forgetting (graceful forgetting, arXiv 2505.19715) for the Hugging Face Trainer.

commands:
{chr(10).join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())}

Every TrainingArguments field and every lwf_* field is a flag. A YAML or JSON file of {{argument: value}}
may come first; flags after it override its values. `{PROG} COMMAND --help` lists all flags.

examples:
  {PROG} demo --quick --output_dir demo_quick
  {PROG} inspect config.yaml --output_dir runs/preview
  {PROG} train config.yaml --learning_rate 1e-4 --output_dir runs/lwf
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(TOP_HELP, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(TOP_HELP)
        return 0
    if argv[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"{PROG}: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} (see {PROG} --help).",
              file=sys.stderr)
        return 2
    return command[0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
