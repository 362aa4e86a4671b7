"""LWFRun inside real Trainer runs: what "forgotten" counts, the record next to saved weights, loss-scaler skips,
per-group rates, a trainable set that changes, and what ``hf-lwf inspect`` previews."""

import json

import pytest
import torch
from safetensors.torch import load_file
from conftest import learning_dataset, lm_collator, lwf_args, tiny_llama
from transformers import TrainerCallback

import hf_lwf.backends.base as backend_module
from hf_lwf import LWFRun, LWFTrainer, LWFUnlearningError
from hf_lwf.method.selfgen import collate_self_data
from hf_lwf.modelcard import card_data


def _trainer(tokenizer, args, model=None, **kwargs):
    model = model if model is not None else tiny_llama(len(tokenizer))
    return LWFTrainer(model=model, args=args, train_dataset=learning_dataset(tokenizer), processing_class=tokenizer,
                      data_collator=lm_collator(tokenizer), **kwargs)


def _watch_ascent(monkeypatch) -> list:
    """Every ascent step's batch (its rows' token ids, unpadded) and its result, as the ascent itself saw them."""
    steps = []
    original = backend_module.ascent_step

    def watch(model, batch, optimizer, **kwargs):
        result = original(model, batch, optimizer, **kwargs)
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        steps.append((rows, result))
        return result

    monkeypatch.setattr(backend_module, "ascent_step", watch)
    return steps


def _unlearned_by_watching(run, steps) -> set[int]:
    """The D_self indices whose rows were under the cap in a step that moved the weights."""
    index = {}
    for i, row in enumerate(run.self_data):
        batch = collate_self_data([row], 0)
        index[tuple(batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist())] = i
    return {index[rows[r]] for rows, result in steps if result["applied"] for r in result["kept_rows"]}


@pytest.mark.parametrize("rescore", [0, 1])
def test_forgotten_samples_are_the_ones_an_applied_ascent_step_used(tokenizer, tmp_path, monkeypatch, rescore):
    steps = _watch_ascent(monkeypatch)
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=6, lwf_unlearn_every=2, lwf_unlearn_steps=1,
                                           lwf_unlearn_batch_size=1, lwf_forget_ratio=0.75, lwf_rescore_every=rescore))
    trainer.train()
    run = trainer.lwf_run
    expected = _unlearned_by_watching(run, steps)
    assert expected and {int(i) for i in run.state.unlearned} == expected
    summary = run.summary()
    assert summary["forgotten_samples"] == len(expected) <= 3  # one sample per applied step, three steps
    assert summary["selected_samples"] == len(run.state.forget_indices) > len(expected)
    trainer.save_model()
    card = card_data(run)
    assert sum(card["unlearned_sizes"].values()) == len(expected)
    assert card["never_drawn"] == len([i for i in run.state.forget_indices if str(i) not in run.state.drawn])


def test_a_run_whose_samples_are_all_over_the_cap_forgets_nothing_and_says_so(tokenizer, tmp_path, monkeypatch):
    steps = _watch_ascent(monkeypatch)
    trainer = _trainer(tokenizer, lwf_args(tmp_path, lwf_forget_loss_cap=1e-3))
    trainer.train()
    run = trainer.lwf_run
    assert steps and not any(result["applied"] for _, result in steps)
    summary = run.summary()
    assert summary["forgotten_samples"] == 0 and summary["unlearn_steps"] == 0 and summary["selected_samples"] > 0
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "| 0 |\n" in card and "always above the loss cap" in card
    assert f"{summary['selected_samples']} were always above the loss cap" in card


def test_load_best_model_at_end_records_what_the_best_checkpoints_weights_went_through(tokenizer, tmp_path):
    args = lwf_args(tmp_path, max_steps=6, lwf_unlearn_every=2, eval_strategy="steps", eval_steps=2,
                    save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = _trainer(tokenizer, args, eval_dataset=learning_dataset(tokenizer, n=8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")  # the highest eval loss: the first evaluation
    saved = json.loads((tmp_path / "checkpoint-2" / "lwf_config.json").read_text())["lwf_run"]
    assert saved["unlearn_points"] == 1 and trainer.lwf_run.state.unlearn_points == 3
    best_weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    for name, p in trainer.model.named_parameters():  # the weights are the best checkpoint's
        if name in best_weights:
            assert torch.equal(p.detach(), best_weights[name]), name
    out = tmp_path / "final"
    trainer.save_model(str(out))
    record = json.loads((out / "lwf_config.json").read_text())["lwf_run"]
    assert {k: v for k, v in record.items() if k != "from_checkpoint_step"} == saved
    assert record["from_checkpoint_step"] == 2
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "best checkpoint's, of step 2" in card and "What actually ran: 1 unlearning point(s)" in card


class _Overflow(TrainerCallback):
    """Make the loss infinite at one step, so the fp16 loss scaler skips that optimizer step."""

    def __init__(self, model, at_step: int):
        self.at_step, self.armed = at_step, False
        model.lm_head.register_forward_hook(lambda module, args, out: out * float("inf") if self.armed else None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 == self.at_step


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_a_step_the_loss_scaler_skipped_never_enters_the_fisher(tokenizer, tmp_path, optim):
    """accelerate's ``step_was_skipped`` stays False for a fused optimizer whose step the scaler skipped; the run
    sees the skip in the scaler's own scale instead."""
    model = tiny_llama(len(tokenizer))
    overflow = _Overflow(model, at_step=3)
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=6, lwf_unlearn_every=4, optim=optim),
                       model=model, callbacks=[overflow])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()
    state = trainer.lwf_run.state
    assert trainer.accelerator.scaler.get_scale() < 2.0**10  # the scaler did skip a step
    assert state.fisher_updates == 5 and state.unlearn_points == 1
    assert all(torch.isfinite(f).all() for f in state.fisher.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_scores_take_each_param_groups_rate_of_the_step_just_taken(tokenizer, tmp_path, monkeypatch):
    model = tiny_llama(len(tokenizer), tie_word_embeddings=False)
    head = [p for n, p in model.named_parameters() if n.startswith("lm_head")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("lm_head")]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": head, "lr": 1e-2}])
    seen = []
    original = backend_module.Backend.scoring_terms

    def spy(self, fisher, **kwargs):
        seen.append(kwargs["rates"])
        return original(self, fisher, **kwargs)

    monkeypatch.setattr(backend_module.Backend, "scoring_terms", spy)
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=2, lr_scheduler_type="constant"), model=model,
                       optimizers=(optimizer, None))
    trainer.train()
    (rates,) = seen
    assert {rates[n] for n in rates if n.startswith("lm_head")} == {1e-2}
    assert {rates[n] for n in rates if not n.startswith("lm_head")} == {1e-3}
    assert trainer.lwf_run.scoring_rates == [1e-3, 1e-2]


class _Freeze(TrainerCallback):
    def __init__(self, model, name: str, at_step: int, trainable: bool):
        self.param, self.at_step, self.trainable = dict(model.named_parameters())[name], at_step, trainable

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            self.param.requires_grad_(self.trainable)


def test_a_parameter_frozen_mid_run_leaves_the_fisher_and_theta_ref(tokenizer, tmp_path, caplog):
    model = tiny_llama(len(tokenizer))
    name = "model.layers.1.mlp.up_proj.weight"
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=6, lwf_mask_ratio=0.5, lwf_rescore_every=1),
                       model=model, callbacks=[_Freeze(model, name, at_step=3, trainable=False)])
    with caplog.at_level("WARNING"):
        trainer.train()
    state = trainer.lwf_run.state
    assert state.unlearn_points == 3 and name not in state.fisher and name not in state.reference
    assert name in caplog.text


def test_a_parameter_unfrozen_mid_run_stops_the_run_naming_it(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    name = "model.layers.1.mlp.up_proj.weight"
    dict(model.named_parameters())[name].requires_grad_(False)
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=6, lwf_mask_ratio=0.5),
                       model=model, callbacks=[_Freeze(model, name, at_step=3, trainable=True)])
    with pytest.raises((ValueError, LWFUnlearningError), match=name.replace(".", r"\.")):
        trainer.train()


def test_inspect_previews_the_early_schedule_as_the_run_scores_it(tokenizer, tmp_path):
    from hf_lwf.app.inspect import run_inspection

    args = dict(lwf_schedule="early", lwf_fisher_samples=4, warmup_steps=2)
    preview = run_inspection(tiny_llama(len(tokenizer)), tokenizer, learning_dataset(tokenizer),
                             lwf_args(tmp_path / "preview", **args), data_collator=lm_collator(tokenizer))
    real = _trainer(tokenizer, lwf_args(tmp_path / "real", **args))
    real.train()
    assert preview["schedule"] == "early" and preview["inspect_steps"] == 0
    by_index = {s["index"]: s["confidence"] for s in preview["samples"]}
    assert [by_index[i] for i in range(len(by_index))] == real.lwf_run.state.scores
    with pytest.raises(ValueError, match="inspect_steps"):
        run_inspection(tiny_llama(len(tokenizer)), tokenizer, learning_dataset(tokenizer),
                       lwf_args(tmp_path / "x", **args), data_collator=lm_collator(tokenizer), inspect_steps=2)


def test_the_run_is_a_plain_object_the_trainer_adapters_share(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, lwf_args(tmp_path, max_steps=2))
    assert isinstance(trainer.lwf_run, LWFRun) and trainer.lwf_run is trainer.lwf_callback.run
    assert trainer.lwf_callback.lwf_state is trainer.lwf_run.state
