"""Built-in demo tasks: arithmetic problems, forgetting prompts, answer extraction and chat formatting."""

import re

import pytest

from hf_lwf.app.tasks import FORGET_PROMPTS, extract_number, forget_prompts, format_chat, make_arithmetic_task


def _solve(prompt: str) -> tuple[str, tuple[int, ...], int]:
    """Recompute a problem's answer from its wording, independently of the generator."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", prompt))
    if "and then gives away" in prompt:
        a, b, c = numbers
        return "two_step", numbers, a + b - c
    if "boxes with" in prompt:
        a, b = numbers
        return "multiplication", numbers, a * b
    if "of them to a friend" in prompt:
        a, b = numbers
        return "subtraction", numbers, a - b
    if "more. How many" in prompt:
        a, b = numbers
        return "addition", numbers, a + b
    raise AssertionError(f"unknown template: {prompt}")


def test_arithmetic_task_is_deterministic_per_seed():
    first, second = make_arithmetic_task(40, 10, seed=3), make_arithmetic_task(40, 10, seed=3)
    assert first["train"].to_dict() == second["train"].to_dict()
    assert first["eval"].to_dict() == second["eval"].to_dict()
    assert make_arithmetic_task(40, 10, seed=4)["train"]["prompt"] != first["train"]["prompt"]


def test_arithmetic_task_shape_and_answers():
    task = make_arithmetic_task(200, 50, seed=0)
    assert set(task) == {"train", "eval"}
    assert (task["train"].num_rows, task["eval"].num_rows) == (200, 50)
    operations = set()
    for split in task.values():
        assert split.column_names == ["prompt", "response", "answer"]
        for row in split:
            operation, _, answer = _solve(row["prompt"])
            operations.add(operation)
            assert answer > 0
            assert row["answer"] == str(answer)
            assert row["response"] == f"The answer is {answer}."
            assert extract_number(row["response"]) == row["answer"]
    assert operations == {"addition", "subtraction", "multiplication", "two_step"}


def test_arithmetic_train_and_eval_do_not_overlap():
    task = make_arithmetic_task(600, 200, seed=1)
    train = {_solve(p)[:2] for p in task["train"]["prompt"]}
    evaluation = {_solve(p)[:2] for p in task["eval"]["prompt"]}
    assert len(train) == 600 and len(evaluation) == 200
    assert not train & evaluation
    assert not set(task["train"]["prompt"]) & set(task["eval"]["prompt"])


@pytest.mark.parametrize("n_train, n_eval", [(-1, 5), (5, -1), (10**6, 0)])
def test_arithmetic_task_bad_sizes(n_train, n_eval):
    with pytest.raises(ValueError, match="n_train"):
        make_arithmetic_task(n_train, n_eval, seed=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 12.", "12"),
        ("Tom has 7 apples and buys 5 more, so 12", "12"),
        ("The answer is 12. Tom had 7 and bought 5.", "12"),
        ("Answer is: $1,250", "1250"),
        ("It costs 12.50 dollars", "12.5"),
        ("3.0", "3"),
        ("The answer is -4.", "-4"),
        ("5-3", "3"),
        ("-0.0", "0"),
        ("There are 100 of them.", "100"),
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_forget_prompts_train_and_eval_are_disjoint_and_complete():
    train, evaluation = forget_prompts(), forget_prompts(split="eval")
    assert set(train) == set(evaluation) == set(FORGET_PROMPTS) == {"geography", "cooking"}
    for task, prompts in FORGET_PROMPTS.items():
        assert len(set(prompts)) == len(prompts) >= 15
        assert not set(train[task]) & set(evaluation[task])
        assert sorted(train[task] + evaluation[task]) == sorted(prompts)
        assert evaluation[task]
    assert sum(len(p) for p in FORGET_PROMPTS.values()) >= 40


def test_forget_prompts_n_and_bad_arguments():
    assert forget_prompts(3) == {task: prompts[:3] for task, prompts in forget_prompts().items()}
    with pytest.raises(ValueError, match="`split`"):
        forget_prompts(split="test")
    with pytest.raises(ValueError, match="`n` must be between 1 and"):
        forget_prompts(0)
    with pytest.raises(ValueError, match="`n` must be between 1 and"):
        forget_prompts(1000, split="eval")


def test_format_chat_with_template(chat_tokenizer):
    prompt_text = format_chat(chat_tokenizer, "What is 2+2?")
    assert prompt_text == "<|user|>What is 2+2?<eos><|assistant|>"
    prompt_only, full = format_chat(chat_tokenizer, "What is 2+2?", "The answer is 4.")
    assert prompt_only == prompt_text
    assert full == prompt_text + "The answer is 4.<eos>"


def test_format_chat_without_template(tokenizer):
    assert format_chat(tokenizer, "What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    prompt_text, full = format_chat(tokenizer, "What is 2+2?", "The answer is 4.")
    assert prompt_text == "Question: What is 2+2?\nAnswer:"
    assert full == "Question: What is 2+2?\nAnswer: The answer is 4.<eos>"
