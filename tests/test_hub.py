"""push_to_hub offline: what would be uploaded, the model card, and that loading needs no hf_lwf."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

from conftest import learning_dataset, lm_collator, lwf_args, tiny_llama
from huggingface_hub.utils import filter_repo_objects
from transformers import Trainer, TrainingArguments

from hf_lwf import LWFCallback, LWFTrainer
from hf_lwf.config import config_from_args


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class FakeHubApi:
    """Stands in for transformers' shared HfApi client: records every upload as a copy of the files."""

    def __init__(self, root):
        self.root, self.uploads = root, []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def model_info(self, repo_id, **kwargs):
        return SimpleNamespace(tags=["license:apache-2.0"])

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None, token=None,
                      run_as_future=False, ignore_patterns=None, revision=None, **kwargs):
        files = []
        for base, _, names in os.walk(folder_path):
            files += [os.path.relpath(os.path.join(base, n), folder_path) for n in names]
        selected = list(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        snapshot = self.root / f"upload-{len(self.uploads)}"
        for name in selected:
            os.makedirs((snapshot / name).parent, exist_ok=True)
            shutil.copy(os.path.join(folder_path, name), snapshot / name)
        self.uploads.append({"path_in_repo": path_in_repo or "", "files": sorted(selected), "snapshot": snapshot})
        if run_as_future:
            future = concurrent.futures.Future()
            future.set_result(SimpleNamespace(commit_url="fake"))
            return future
        return SimpleNamespace(commit_url="fake")


def _train(tokenizer, args, cls=LWFTrainer, **kwargs):
    trainer = cls(model=tiny_llama(len(tokenizer)), args=args, train_dataset=learning_dataset(tokenizer),
                  processing_class=tokenizer, data_collator=lm_collator(tokenizer), **kwargs)
    trainer.train()
    return trainer


def _card(upload):
    return (upload["snapshot"] / "README.md").read_text()


def test_push_to_hub_uploads_weights_config_and_card_without_pickles(tokenizer, tmp_path, fake_hub):
    args = lwf_args(tmp_path / "out", push_to_hub=True, hub_model_id="me/tiny-lwf", hub_strategy="end")
    trainer = _train(tokenizer, args)
    trainer.push_to_hub(finetuned_from="HuggingFaceTB/SmolLM2-135M-Instruct")
    final = fake_hub.uploads[-1]
    assert "model.safetensors" in final["files"] and "lwf_config.json" in final["files"]
    assert "README.md" in final["files"] and "training_args.json" in final["files"]
    assert not [f for f in final["files"] if f.endswith(PICKLE_SUFFIXES)], final["files"]
    assert not [f for f in final["files"] if "lwf_self_data" in f]  # D_self stays local
    config = json.loads((final["snapshot"] / "lwf_config.json").read_text())
    assert config["lwf_unlearn_every"] == 2 and config["lwf_forget_prompts"] == args.lwf_forget_prompts

    card = _card(final)
    state = trainer.lwf_callback.lwf_state
    header = card.split("---")[1]
    assert "- lwf" in header and "- hf-lwf" in header
    assert "## Learning With Forgetting" in card and "arxiv.org/abs/2505.19715" in card
    assert f"| forget | {state.self_data_sizes['forget']} | {state.forget_sizes['forget']} |" in card
    assert "every 2 optimizer steps" in card
    assert f"What actually ran: {state.unlearn_points} unlearning point(s), 0 of them without" in card
    assert f"{state.unlearn_steps} ascent step(s) applied" in card and state.unlearn_steps == 6
    assert config["lwf_run"] == state.run_summary()
    assert "Forgetting confidence over D_self (deviation)" in card
    assert card.count("## Learning With Forgetting") == 1 and "Loading this model needs only `transformers`" in card


def test_checkpoint_push_includes_lwf_state(tokenizer, tmp_path, fake_hub):
    args = lwf_args(tmp_path / "out", push_to_hub=True, hub_model_id="me/tiny-lwf", hub_strategy="checkpoint",
                    save_strategy="steps", save_steps=3)
    _train(tokenizer, args)
    checkpoint_uploads = [u for u in fake_hub.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert checkpoint_uploads
    for upload in checkpoint_uploads:
        assert "lwf_state.safetensors" in upload["files"] and "lwf_state.json" in upload["files"]


def test_callback_only_push_gets_tag_section_and_config(tokenizer, tmp_path, fake_hub):
    base = lwf_args(tmp_path / "out")
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", push_to_hub=True,
                             hub_model_id="me/plain-lwf", hub_strategy="end")
    trainer = _train(tokenizer, args, cls=Trainer, callbacks=[LWFCallback(config_from_args(base))])
    trainer.push_to_hub()
    final = fake_hub.uploads[-1]
    assert "lwf_config.json" in final["files"]
    card = _card(final)
    assert "- lwf" in card.split("---")[1] and card.count("## Learning With Forgetting") == 1
    trainer.push_to_hub()
    assert _card(fake_hub.uploads[-1]).count("## Learning With Forgetting") == 1


def test_pushed_model_loads_without_hf_lwf(tokenizer, tmp_path, fake_hub):
    args = lwf_args(tmp_path / "out", push_to_hub=True, hub_model_id="me/tiny-lwf", hub_strategy="end")
    _train(tokenizer, args).push_to_hub()
    snapshot = fake_hub.uploads[-1]["snapshot"]
    code = (
        "import sys; sys.modules['hf_lwf'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(snapshot)!r})\n"
        "print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LlamaForCausalLM"
