"""load_forget_prompts: every supported source, column detection, the mixed setting and every error."""

import json

import pytest
from datasets import Dataset

from hf_lwf.data import DEFAULT_TASK, load_forget_prompts


PROMPTS = ["Why floss?", "What causes cavities?", "How often brush?"]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_list_of_prompts_is_one_default_task():
    assert load_forget_prompts(PROMPTS) == {DEFAULT_TASK: PROMPTS}
    assert load_forget_prompts(tuple(PROMPTS)) == {"forget": PROMPTS}


def test_prompts_are_stripped_and_blank_ones_dropped():
    assert load_forget_prompts(["  a  ", "", "   ", "b\n"]) == {"forget": ["a", "b"]}


def test_txt_file(tmp_path):
    path = _write(tmp_path / "dental.txt", "Why floss?\n\nWhat causes cavities?\n  \nHow often brush?\n")
    assert load_forget_prompts(path) == {"dental": PROMPTS}


def test_json_file(tmp_path):
    path = _write(tmp_path / "qa.json", json.dumps([{"question": p, "answer": "x"} for p in PROMPTS]))
    assert load_forget_prompts(path) == {"qa": PROMPTS}


def test_jsonl_file(tmp_path):
    path = _write(tmp_path / "psych.jsonl", "\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS)))
    assert load_forget_prompts(path) == {"psych": PROMPTS}


def test_csv_file(tmp_path):
    lines = ["id,instruction"] + [f'{i},"{p}"' for i, p in enumerate(PROMPTS)]
    path = _write(tmp_path / "med.csv", "\n".join(lines) + "\n")
    assert load_forget_prompts(path) == {"med": PROMPTS}


def test_column_autodetect_prefers_prompt_over_question_and_text(tmp_path):
    rows = [{"text": f"t{i}", "question": f"q{i}", "prompt": f"p{i}"} for i in range(3)]
    path = _write(tmp_path / "multi.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert load_forget_prompts(path) == {"multi": ["p0", "p1", "p2"]}
    assert load_forget_prompts(path, column="text") == {"multi": ["t0", "t1", "t2"]}


def test_explicit_column(tmp_path):
    path = _write(tmp_path / "custom.jsonl", "\n".join(json.dumps({"query": p, "prompt": "no"}) for p in PROMPTS))
    assert load_forget_prompts(path, column="query") == {"custom": PROMPTS}


def test_missing_column_error_names_the_field_and_file(tmp_path):
    path = _write(tmp_path / "custom.jsonl", "\n".join(json.dumps({"query": p}) for p in PROMPTS))
    with pytest.raises(ValueError, match="lwf_forget_prompt_column") as info:
        load_forget_prompts(path)
    assert path in str(info.value) and "query" in str(info.value)
    with pytest.raises(ValueError, match="`lwf_forget_prompt_column`='nope'") as info:
        load_forget_prompts(path, column="nope")
    assert path in str(info.value)


def test_non_string_column_is_an_error():
    with pytest.raises(ValueError, match="must hold strings"):
        load_forget_prompts(Dataset.from_dict({"prompt": [1, 2]}))


def test_missing_file_error(tmp_path):
    path = str(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="lwf_forget_prompts") as info:
        load_forget_prompts(path)
    assert path in str(info.value)


def test_empty_list_and_empty_dict_errors():
    with pytest.raises(ValueError, match="`lwf_forget_prompts` is an empty list"):
        load_forget_prompts([])
    with pytest.raises(ValueError, match="`lwf_forget_prompts` is an empty dict"):
        load_forget_prompts({})
    with pytest.raises(ValueError, match="`lwf_forget_prompts` is required"):
        load_forget_prompts(None)
    with pytest.raises(ValueError, match="no non-empty prompt"):
        load_forget_prompts(["", "  "])


def test_empty_files_error(tmp_path):
    txt = _write(tmp_path / "blank.txt", "\n   \n\n")
    with pytest.raises(ValueError, match="no non-empty prompt") as info:
        load_forget_prompts(txt)
    assert txt in str(info.value)
    jsonl = _write(tmp_path / "blank.jsonl", "\n".join(json.dumps({"prompt": " "}) for _ in range(2)))
    with pytest.raises(ValueError, match="no non-empty prompt") as info:
        load_forget_prompts(jsonl)
    assert jsonl in str(info.value)


def test_dict_gives_mixed_tasks(tmp_path):
    path = _write(tmp_path / "ignored_name.txt", "a\nb\n")
    tasks = load_forget_prompts({"dental": PROMPTS, "psych": path})
    assert tasks == {"dental": PROMPTS, "psych": ["a", "b"]}
    assert list(tasks) == ["dental", "psych"]


def test_dict_error_names_the_task(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lwf_forget_prompts\['psych'\]"):
        load_forget_prompts({"dental": PROMPTS, "psych": str(tmp_path / "missing.txt")})


def test_list_of_files_is_one_task_per_file(tmp_path):
    a = _write(tmp_path / "dental.txt", "a1\na2\n")
    b = _write(tmp_path / "psych.jsonl", json.dumps({"question": "b1"}))
    assert load_forget_prompts([a, b]) == {"dental": ["a1", "a2"], "psych": ["b1"]}


def test_two_files_with_same_stem_error(tmp_path):
    (tmp_path / "x").mkdir()
    a = _write(tmp_path / "dental.txt", "a\n")
    b = _write(tmp_path / "x" / "dental.txt", "b\n")
    with pytest.raises(ValueError, match="two sources named 'dental'"):
        load_forget_prompts([a, b])


def test_json_strings_from_the_command_line(tmp_path):
    assert load_forget_prompts(json.dumps({"t1": ["p"], "t2": ["q", "r"]})) == {"t1": ["p"], "t2": ["q", "r"]}
    assert load_forget_prompts(json.dumps(PROMPTS)) == {"forget": PROMPTS}
    a = _write(tmp_path / "one.txt", "x\n")
    b = _write(tmp_path / "two.txt", "y\n")
    assert load_forget_prompts(json.dumps([a, b])) == {"one": ["x"], "two": ["y"]}
    with pytest.raises(ValueError, match="`lwf_forget_prompts` looks like JSON but does not parse"):
        load_forget_prompts('{"t1": [')


def test_dataset_input():
    ds = Dataset.from_dict({"question": PROMPTS, "answer": ["x"] * 3})
    assert load_forget_prompts(ds) == {"forget": PROMPTS}
    ds2 = Dataset.from_dict({"body": PROMPTS})
    assert load_forget_prompts(ds2, column="body") == {"forget": PROMPTS}
    assert load_forget_prompts({"a": ds, "b": ["z"]}) == {"a": PROMPTS, "b": ["z"]}


def test_dataset_folder(tmp_path):
    Dataset.from_dict({"prompt": PROMPTS}).save_to_disk(str(tmp_path / "saved"))
    assert load_forget_prompts(str(tmp_path / "saved")) == {"saved": PROMPTS}


def test_mixing_paths_and_prompts_is_an_error(tmp_path):
    a = _write(tmp_path / "dental.txt", "a\n")
    with pytest.raises(ValueError, match="mixes file paths and prompt strings"):
        load_forget_prompts([a, "What is fear?"])


def test_non_string_list_error():
    with pytest.raises(ValueError, match="must be a list of strings"):
        load_forget_prompts(["a", 3])
    with pytest.raises(ValueError, match=r"lwf_forget_prompts\['t'\].*must be a list of strings"):
        load_forget_prompts({"t": ["a", None]})


def test_unsupported_type_error():
    with pytest.raises(ValueError, match="unsupported prompt source of type int"):
        load_forget_prompts(12)


def test_custom_argument_name_in_errors():
    with pytest.raises(ValueError, match="`my_arg` is an empty list"):
        load_forget_prompts([], argument="my_arg")


def test_unreadable_hub_id_offline_is_a_value_error():
    with pytest.raises(ValueError, match="neither a readable file nor a loadable Hub dataset"):
        load_forget_prompts("no-such-owner-xyz/no-such-dataset-xyz")
