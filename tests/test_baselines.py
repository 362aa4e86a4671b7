"""hf_lwf.baselines: L2-SP and BSS penalties against hand-computed values, and their Trainer wiring."""

import pytest
import torch
from transformers import TrainingArguments

from hf_lwf.baselines import BSS, L2SP, BSSConfig, L2SPConfig, RegularizedTrainer, bss_penalty, l2sp_penalty
from conftest import learning_dataset, lm_collator, tiny_llama


def test_l2sp_penalty_hand_computed():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    reference = [torch.tensor([0.0, 0.0]), torch.tensor([[1.5]])]
    # 0.1 / 2 * (1 + 4 + 1) = 0.3
    assert l2sp_penalty(params, reference, alpha=0.1).item() == pytest.approx(0.3)


def test_l2sp_gradient_is_alpha_times_distance():
    p = torch.tensor([3.0, -1.0], requires_grad=True)
    l2sp_penalty([p], [torch.tensor([1.0, 1.0])], alpha=0.5).backward()
    assert torch.allclose(p.grad, torch.tensor([1.0, -1.0]))  # 0.5 * (p - r)


def test_bss_penalty_hand_computed():
    features = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])  # singular values 4 and 3
    assert bss_penalty(features, k=1, eta=0.01).item() == pytest.approx(0.09)
    assert bss_penalty(features, k=2, eta=0.01).item() == pytest.approx(0.25)
    assert bss_penalty(features, k=5, eta=0.01).item() == pytest.approx(0.25)  # k capped at the rank bound
    with pytest.raises(ValueError, match="2-D"):
        bss_penalty(torch.zeros(2, 2, 2), 1, 0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"l2sp_alpha": 0}, "l2sp_alpha"), ({"l2sp_alpha": -1.0}, "l2sp_alpha"),
])
def test_l2sp_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L2SPConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"bss_eta": 0.0}, "bss_eta"), ({"bss_k": 0}, "bss_k"), ({"bss_k": 1.5}, "bss_k"),
])
def test_bss_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BSSConfig(**kwargs)


def _trainer(tmp_path, tokenizer, regularizers, **overrides):
    model = tiny_llama(len(tokenizer))
    values = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    values.update(overrides)
    args = TrainingArguments(str(tmp_path), **values)
    return RegularizedTrainer(model=model, args=args, train_dataset=learning_dataset(tokenizer, 16),
                              data_collator=lm_collator(tokenizer), regularizers=regularizers)


def _batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_l2sp_added_to_trainer_loss(tmp_path, tokenizer):
    reg = L2SP(l2sp_alpha=0.2)
    trainer = _trainer(tmp_path, tokenizer, [reg])
    model = trainer.model
    with torch.no_grad():
        first = next(p for p in model.parameters() if p.requires_grad)
        first.add_(0.5)  # moved by 0.5 in every entry from the snapshot
    batch = _batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, batch)
    plain = model(**batch).loss
    expected = 0.5 * 0.2 * 0.25 * first.numel()
    assert (loss - plain).item() == pytest.approx(expected, rel=1e-4)


def test_bss_added_to_trainer_loss(tmp_path, tokenizer):
    reg = BSS(bss_eta=0.5, bss_k=2)
    trainer = _trainer(tmp_path, tokenizer, [reg])
    model = trainer.model
    batch = _batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, batch)
    out = model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    rows = [hidden[i, t] for i in range(hidden.size(0)) for t in range(hidden.size(1) - 1)
            if batch["labels"][i, t + 1] != -100]
    singular = torch.linalg.svdvals(torch.stack(rows))
    expected = 0.5 * (singular[-2:] ** 2).sum()
    assert (loss - out.loss).item() == pytest.approx(expected.item(), rel=1e-4)


def test_penalty_counted_once_per_step_under_gradient_accumulation(tmp_path, tokenizer):
    """Batch 4 in one step and batch 2 x 2 accumulation give the same weights with L2-SP on."""
    weights = []
    for bs, ga in ((4, 1), (2, 2)):
        trainer = _trainer(tmp_path / f"{bs}", tokenizer, [L2SP(l2sp_alpha=5.0)], max_steps=3,
                           per_device_train_batch_size=bs, gradient_accumulation_steps=ga, optim="sgd",
                           lr_scheduler_type="constant", max_grad_norm=0.0)
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_l2sp_keeps_weights_closer_and_logs(tmp_path, tokenizer):
    distances = {}
    for alpha in (None, 50.0):
        regs = [] if alpha is None else [L2SP(l2sp_alpha=alpha)]
        trainer = _trainer(tmp_path / str(alpha), tokenizer, regs, max_steps=4, optim="sgd", learning_rate=0.01)
        start = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        distances[alpha] = sum(((p.detach() - s) ** 2).sum().item() for p, s in zip(trainer.model.parameters(), start))
        if alpha is not None:
            assert any("baseline/l2sp" in entry for entry in trainer.state.log_history)
    assert distances[50.0] < distances[None]


def test_rejects_non_regularizer(tmp_path, tokenizer):
    with pytest.raises(TypeError, match="Regularizer"):
        _trainer(tmp_path, tokenizer, [object()])
