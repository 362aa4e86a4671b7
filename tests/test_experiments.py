"""experiments/: the lm-eval task YAMLs, answer extraction, splits and the runner end to end on a tiny model."""

import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from conftest import build_tokenizer, tiny_llama, write_jsonl


REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("lm_eval", reason="the experiments need the [experiments] extra (lm-eval)")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments" / "tasks"))

import utils as task_utils  # noqa: E402
from experiments import evaluation, run  # noqa: E402


def make_data(root: Path, n: int = 8, tag: str = "") -> Path:
    """Hand-made files for every task, in the schema of the local JSON Lines copies (`--data_dir`)."""
    mcq = [{"id": f"{tag}q{i}", "question": f"Which tooth {tag}{i}?", "options": ["molar", "canine", "incisor", "premolar"],
            "answer": i % 4, "answer_letter": "ABCD"[i % 4], "subject": "Dental", "source": "test"} for i in range(n)]
    write_jsonl(root / "dental" / "validation.jsonl", mcq)
    write_jsonl(root / "psychol" / "test.jsonl", [dict(r, id=f"{tag}p{i}", question=f"Why do we dream {tag}{i}?")
                                            for i, r in enumerate(mcq)])
    write_jsonl(root / "sst5" / "train.jsonl", [{"id": f"{tag}s{i}", "text": f"A fine film {tag}{i} .", "label": i % 5,
                                             "label_text": task_utils.SST5_LABELS[i % 5]} for i in range(n)])
    write_jsonl(root / "sst5" / "test.jsonl", [{"id": f"{tag}t{i}", "text": f"Dull {tag}{i} .", "label": i % 5,
                                            "label_text": task_utils.SST5_LABELS[i % 5]} for i in range(n)])
    write_jsonl(root / "sst5" / "dev.jsonl", [{"id": f"{tag}d{i}", "text": f"Sharp {tag}{i} .", "label": i % 5,
                                          "label_text": task_utils.SST5_LABELS[i % 5]} for i in range(n)])
    write_jsonl(root / "qasc" / "dev.jsonl", [{"id": f"{tag}c{i}", "question": f"What boils {tag}{i}?",
                                          "choices": list("abcdefgh"), "choice_labels": list("ABCDEFGH"),
                                          "answerKey": "ABCDEFGH"[i % 8], "answer_index": i % 8} for i in range(n)])
    gsm = [{"id": f"{tag}g{i}", "question": f"Tom{tag} has {i} apples and buys 2. How many?",
            "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}", "final_answer": str(i + 2)} for i in range(n)]
    write_jsonl(root / "gsm8k" / "train.jsonl", gsm)
    write_jsonl(root / "gsm8k" / "test.jsonl", gsm)
    return root


# ------------------------------------------------------------------------------------------ answer extraction
@pytest.mark.parametrize("text, expected", [
    ("5 + 3 = 8\n#### 8", "8"),
    ("so she pays $1,200.", "1200"),
    ("first 3.50, then 7.0 in total", "7"),
    ("#### -4 apples, not 9", "-4"),
    ("2 + 2 = 4. The answer is 4.\n\nQuestion: 5 more", "5"),  # the last number wins without ####
    ("no number here", None),
])
def test_extract_final_number(text, expected):
    assert task_utils.extract_final_number(text) == expected


def test_gsm8k_process_results():
    doc = {"final_answer": "1,200"}
    assert task_utils.gsm8k_process_results(doc, ["... so $1200"]) == {"exact_match": 1.0}
    assert task_utils.gsm8k_process_results(doc, ["... so 120"]) == {"exact_match": 0.0}
    assert task_utils.gsm8k_process_results(doc, [""]) == {"exact_match": 0.0}


def test_hash_split_is_disjoint_deterministic_and_order_free():
    from datasets import Dataset

    rows = [{"id": f"x{i}", "question": f"q {i}", "answer": 0} for i in range(700)]
    ds = Dataset.from_list(rows)
    test = task_utils.split_docs(ds, "dental", "test")
    dev = task_utils.split_docs(ds, "dental", "dev")
    train = task_utils.split_docs(ds, "dental", "train")
    assert (len(test), len(dev), len(train)) == (300, 150, 250)
    assert not set(test["id"]) & set(train["id"]) and not set(dev["id"]) & set(train["id"])
    assert not set(test["id"]) & set(dev["id"])
    shuffled = task_utils.split_docs(ds.shuffle(seed=1), "dental", "test")
    assert shuffled["id"] == test["id"]


def test_qasc_split_by_normalised_stem():
    from datasets import Dataset

    # 100 stems, each asked 3 times with different options and spelling ("What boils?" / "what  BOILS")
    rows = [{"id": f"c{i}-{k}", "question": [f"What boils {i}?", f"what  BOILS {i}", f"What boils {i} ?"][k],
             "choices": list("abcdefgh"), "answer_index": k} for i in range(100) for k in range(3)]
    ds = Dataset.from_list(rows)
    stems = {s: {task_utils.normalised_stem(d) for d in task_utils.split_docs(ds, "qasc", s)}
             for s in ("train", "dev", "test")}
    assert stems["train"] and stems["dev"] and stems["test"]
    assert not stems["train"] & stems["test"] and not stems["train"] & stems["dev"] and not stems["dev"] & stems["test"]
    assert sum(len(task_utils.split_docs(ds, "qasc", s)) for s in ("train", "dev", "test")) == 300


def test_exact_duplicates_never_cross_splits(tmp_path):
    data = make_data(tmp_path / "data", n=8)
    # psychol: a duplicate of every question under another id; sst5: a dev sentence copied into train
    rows = [json.loads(x) for x in (data / "psychol" / "test.jsonl").read_text().splitlines()]
    write_jsonl(data / "psychol" / "test.jsonl", rows + [dict(r, id=r["id"] + "dup") for r in rows])
    train = [json.loads(x) for x in (data / "sst5" / "train.jsonl").read_text().splitlines()]
    write_jsonl(data / "sst5" / "train.jsonl", train + [{"id": "copy", "text": "sharp 3", "label": 3, "label_text": "x"}])
    for task in ("psychol", "sst5"):
        train_stems = {task_utils.normalised_stem(d) for d in run.load_split(task, str(data), "train")}
        for split in ("dev", "test"):
            assert not train_stems & {task_utils.normalised_stem(d) for d in run.load_split(task, str(data), split)}
    assert "copy" not in set(run.load_split("sst5", str(data), "train")["id"])
    assert len(run.load_split("sst5", str(data), "train")) == 8
    # a separate evaluation directory (--eval_data_dir) with the same file names: its items are never trained on
    other = make_data(tmp_path / "other", n=3, tag="o")
    before = run.load_split("dental", str(data), "train")
    question = before[0]["question"]
    write_jsonl(other / "dental" / "validation.jsonl", [{"id": "o1", "question": question.upper() + " ", "options": list("abcd"),
                                                    "answer": 1}])
    trained = run.load_split("dental", str(data), "train", str(other))
    assert question not in trained["question"] and len(trained) == len(before) - 1


def test_split_does_not_depend_on_which_rows_have_answers():
    from datasets import Dataset

    rows = [{"id": f"x{i}", "question": f"q {i}", "answer": i % 4} for i in range(900)]
    full = {s: task_utils.split_docs(Dataset.from_list(rows), "dental", s)["id"] for s in ("train", "dev", "test")}
    unlabelled = {f"x{i}" for i in range(0, 900, 7)}
    partial = Dataset.from_list([dict(r, answer=None) if r["id"] in unlabelled else r for r in rows])
    for split, ids in full.items():
        assert task_utils.split_docs(partial, "dental", split)["id"] == [i for i in ids if i not in unlabelled]


# ------------------------------------------------------------------------------------------ task YAMLs
def _build(task, data_dir, whole=False):
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_defaults=False).load([evaluation.task_config(task, str(data_dir), whole)])
    return loaded["tasks"][f"lwf_{task}"]


def test_yaml_multiple_choice_tasks_on_hand_made_files(tmp_path):
    data = make_data(tmp_path / "data", n=8)
    dental = _build("dental", data)
    docs = list(dental.test_docs())
    assert len(docs) == 2  # a quarter of 8 items in a tiny file (300 test, 150 dev on real data)
    doc = docs[0]
    options = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(doc["options"]))
    assert dental.doc_to_text(doc) == f"Question: {doc['question']}\n{options}\nAnswer:"
    assert dental.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert dental.doc_to_target(doc) == doc["answer"]
    assert dental.OUTPUT_TYPE == "multiple_choice"
    sst5 = _build("sst5", data)
    sdoc = list(sst5.test_docs())[0]
    assert sst5.doc_to_choice(sdoc)[sst5.doc_to_target(sdoc)] == sdoc["label_text"]
    assert sdoc["id"].startswith("t")  # the test file, not train
    qasc = _build("qasc", data)
    qdoc = list(qasc.test_docs())[0]
    assert qasc.doc_to_choice(qdoc)[qasc.doc_to_target(qdoc)] == qdoc["answerKey"]
    train_ids = set(run.load_split("qasc", str(data), "train")["id"])
    assert not train_ids & {d["id"] for d in qasc.test_docs()}
    # a separate evaluation directory: every item of its file is evaluated
    assert len(list(_build("dental", data, whole=True).test_docs())) == 8
    # the dev split: sst5's own dev file; dental's dev cut, disjoint from its test and training splits
    from lm_eval.tasks import TaskManager

    def build_dev(task, style="legacy"):
        config = evaluation.task_config(task, str(data), split="dev", prompt_style=style)
        return TaskManager(include_defaults=False).load([config])["tasks"][f"lwf_{task}"]
    dev_ids = {d["id"] for d in build_dev("dental").test_docs()}
    assert len(dev_ids) == 2 and not dev_ids & {d["id"] for d in docs}
    assert not dev_ids & set(run.load_split("dental", str(data), "train")["id"])
    sst5_dev = build_dev("sst5", "plain")
    sdoc = list(sst5_dev.test_docs())[0]
    assert sdoc["id"].startswith("d") and sst5_dev.doc_to_text(sdoc) == f"Review: {sdoc['text']}\nSentiment:"


def test_yaml_gsm8k_is_generate_until_with_final_number_scoring(tmp_path):
    data = make_data(tmp_path / "data", n=4)
    gsm = _build("gsm8k", data)
    assert gsm.OUTPUT_TYPE == "generate_until"
    doc = list(gsm.test_docs())[0]
    assert gsm.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    assert gsm.process_results(doc, [f"so {doc['final_answer']}"]) == {"exact_match": 1.0}
    assert gsm.process_results(doc, ["so 99999"]) == {"exact_match": 0.0}


def test_training_example_matches_what_lm_eval_scores(tmp_path):
    tok = build_tokenizer()
    data = make_data(tmp_path / "data", n=8)
    doc = run.load_split("sst5", str(data), "train")[0]
    context = task_utils.sst5_doc_to_text(doc)
    target = " " + task_utils.target_text("sst5", doc)
    ex = run.encode_example(tok, context, target, max_length=512, eos=False)
    trained = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
    assert tok.decode(trained) == target
    assert tok.decode(ex["input_ids"]) == context + target


def test_choice_stats_hand_computed():
    import math

    samples = [{"filtered_resps": [(math.log(0.5), True), (math.log(0.25), False), (math.log(0.25), False)],
                "target": 1},
               {"filtered_resps": [(-3.0, False), (-1.0, True)], "target": 1}]
    stats = evaluation.choice_stats(samples)
    assert stats["preds"] == [0, 1]
    assert stats["gold_probs"][0] == pytest.approx(0.25)
    assert stats["gold_probs"][1] == pytest.approx(1 / (1 + math.exp(-2)))
    assert stats["pred_counts"] == {"0": 1, "1": 1}
    # the primary endpoint: log p(gold | choices); the margin: ll(gold) - best other
    assert stats["gold_logprobs"][0] == pytest.approx(math.log(0.25))
    assert stats["gold_logprobs"][1] == pytest.approx(-math.log1p(math.exp(-2)))
    assert stats["mean_gold_logprob"] == pytest.approx((math.log(0.25) - math.log1p(math.exp(-2))) / 2)
    assert stats["margins"] == pytest.approx([math.log(0.25) - math.log(0.5), 2.0])
    assert stats["max_pred_share"] == 0.5


# ------------------------------------------------------------------------------------------ runner
TINY = {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "max_length": 64,
        "n_eval_learn": 3, "n_eval_forget": 2, "forget_eval": ["dental", "psychol"], "eval_batch_size": 4,
        "gsm8k_max_gen_toks": 4, "n_forget_prompts": 4, "lwf_unlearn_every": 1, "lwf_max_new_tokens": 4,
        "lwf_generation_batch_size": 4, "lwf_forget_loss_cap": 50.0}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    tok = build_tokenizer(chat_template=True)
    model = tiny_llama(len(tok))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return root, make_data(root / "data"), str(model_dir)


@pytest.mark.parametrize("method, forget", [
    ("base", "none"), ("vanilla", "none"), ("lwf", "dental"), ("lwf_alignment", "mixed"), ("lwf_random", "dental"),
    ("lwf_bottom", "dental"), ("lwf_early", "dental"), ("lwf_sgd", "dental"), ("ga_all", "mixed"),
    ("l2sp", "none"), ("bss", "none"),
])
def test_runner_one_run_per_method(tiny_setup, method, forget):
    root, data, model_dir = tiny_setup
    settings = run.merged_settings(TINY, [])
    spec = run.make_spec("sst5", forget, method, 1)
    results = root / "results"
    record = run.run_one(spec, settings, str(data), None, str(results), model_name=model_dir,
                         work_dir=str(root / "work"))
    saved = json.loads((results / f"{spec.run_id}.json").read_text())
    assert saved["run_id"] == spec.run_id == record["run_id"]
    assert set(saved["eval"]) == {"sst5", "dental", "psychol"}
    assert len(saved["eval"]["sst5"]["items"]) == 3 and len(saved["eval"]["dental"]["items"]) == 2
    for task in saved["eval"].values():
        assert task["score"] == pytest.approx(sum(task["items"]) / len(task["items"]))
        assert task["items"] == [float(p == int(t)) for p, t in zip(task["preds"], task["targets"])]
        assert all(0 < g < 1 for g in task["gold_probs"])
    if method == "base":
        assert "train" not in saved and spec.seed == 0
        return
    losses = [e["loss"] for e in saved["train"]["log_history"] if "loss" in e]
    assert len(losses) == 2
    if method.startswith("lwf") or method == "ga_all":
        lwf = saved["train"]["lwf"]
        assert sum(lwf["self_data_sizes"].values()) > 0
        assert lwf["unlearn_steps"] + lwf["skipped_steps"] >= 1
        if forget == "mixed":
            assert set(lwf["self_data_sizes"]) == {"dental", "psychol"}
        if method == "ga_all":
            assert len(lwf["forget_indices"]) == sum(lwf["self_data_sizes"].values())
    if method in ("l2sp", "bss"):
        assert any(f"baseline/{method}" in e for e in saved["train"]["log_history"])


def test_runner_cli_resumes_and_swaps_eval_files(tiny_setup, capsys):
    root, data, model_dir = tiny_setup
    other = make_data(root / "eval_data", n=5, tag="e")
    results = root / "cli_results"
    config = root / "grid.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"model": model_dir, "settings": TINY, "grid": [
        {"learn": ["qasc"], "forget": ["dental"], "methods": ["vanilla", "lwf"], "seeds": [0]}]}))
    argv = ["--config", str(config), "--data_dir", str(data), "--results_dir", str(results),
            "--eval_data_dir", str(other), "--set", "n_eval_learn=10"]
    assert run.main(argv) == 0
    files = sorted(os.listdir(results))
    assert files == ["qasc__dental__lwf__s0.json", "qasc__none__vanilla__s0.json"]
    record = json.loads((results / files[0]).read_text())
    assert record["settings"]["n_eval_learn"] == 10
    assert record["eval"]["qasc"]["doc_ids"] and all(d.startswith("e") for d in record["eval"]["qasc"]["doc_ids"])
    assert len(record["eval"]["qasc"]["items"]) == 5  # the whole separate evaluation file
    mtime = os.path.getmtime(results / files[0])
    capsys.readouterr()
    assert run.main(argv) == 0
    assert "2 finished, 0 pending" in capsys.readouterr().out
    assert os.path.getmtime(results / files[0]) == mtime


def test_defaults_sweep_changes_one_lwf_setting_per_variant(tmp_path):
    config = run.load_config(str(run.REPO / "experiments" / "configs" / "defaults.yaml"))
    specs = run.grid_specs(config["grid"])
    assert len(specs) == 18 and [s.seed for s in specs[:6]] == [0] * 6  # seed by seed
    settings = run.merged_settings(config["settings"], [])
    base = run._training_args(run.make_spec("sst5", "dental", "lwf", 0), settings, str(tmp_path), ["q?"])
    fields = {"lwf_unlearn_every", "lwf_forget_ratio", "lwf_unlearn_coef", "lwf_unlearn_steps"}
    for spec in specs[:6]:
        args = run._training_args(spec, settings, str(tmp_path), ["q?"])
        changed = {f for f in fields if getattr(args, f) != getattr(base, f)}
        assert changed == set(run.METHODS[spec.method]), spec.method
        for field, value in run.METHODS[spec.method].items():
            assert getattr(args, field) == value


def test_make_spec_validation():
    with pytest.raises(ValueError, match="method"):
        run.make_spec("sst5", "dental", "nope", 0)
    with pytest.raises(ValueError, match="forgetting task"):
        run.make_spec("sst5", "none", "lwf", 0)
    with pytest.raises(ValueError, match="cannot also be"):
        run.make_spec("dental", "mixed", "lwf", 0)
    assert run.make_spec("sst5", "dental", "vanilla", 2).run_id == "sst5__none__vanilla__s2"
    with pytest.raises(ValueError, match="Unknown setting"):
        run.merged_settings({"nope": 1}, [])


# ------------------------------------------------------------------------------------------ summary statistics
def test_sign_test_hand_computed():
    from experiments.summarize import sign_test

    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # 2 * 0.5**5
    assert sign_test(3, 1) == pytest.approx(2 * 5 / 16)  # 2 * (C(4,0)+C(4,1)) / 2**4
    assert sign_test(2, 2) == 1.0


def test_paired_stats_hand_computed():
    import numpy as np

    from experiments.summarize import paired_stats

    method = np.array([[1, 1, 0, 1], [1, 0, 0, 1]])
    vanilla = np.array([[0, 1, 0, 1], [0, 0, 1, 1]])
    stats = paired_stats(method, vanilla, n_boot=2000)
    # per item, seed-averaged differences: [1, 0, -0.5, 0] -> mean 0.125; 1 item better, 1 worse
    assert stats["delta"] == pytest.approx(0.125)
    assert (stats["items_better"], stats["items_worse"]) == (1, 1)
    assert stats["p_sign"] == 1.0
    assert stats["ci_low"] <= 0.125 <= stats["ci_high"]
    same = paired_stats(vanilla, vanilla, n_boot=100)
    assert same["delta"] == 0 and same["p_bootstrap"] == 1.0


def test_summarize_writes_tables_and_docs(tiny_setup, tmp_path):
    from experiments import summarize

    root, data, model_dir = tiny_setup
    settings = run.merged_settings(dict(TINY, eval_split="dev", prompt_style="plain", lr_scheduler_type="constant",
                                        n_selfgen_eval=2, selfgen_eval=["dental"], selfgen_max_new_tokens=3), [])
    results = tmp_path / "res"
    for method, forget, seed in (("vanilla", "none", 0), ("vanilla", "none", 1), ("lwf", "dental", 0),
                                 ("lwf", "dental", 1), ("base", "none", 0)):
        run.run_one(run.make_spec("sst5", forget, method, seed), settings, str(data), None, str(results / "pilot"),
                    model_name=model_dir, work_dir=str(root / "work"))
    record = json.loads((results / "pilot" / "sst5__none__vanilla__s0.json").read_text())
    assert all(d.startswith("d") for d in record["eval"]["sst5"]["doc_ids"])  # the dev file, never test
    assert len(record["eval"]["sst5"]["gold_logprobs"]) == 3 and "acc_norm" in record["eval"]["sst5"]
    assert len(record["selfgen_eval"]["dental"]["items"]) == 2 and record["cpu_seconds"] > 0
    assert {e["learning_rate"] for e in record["train"]["log_history"] if "learning_rate" in e} == {1e-3}
    cached = list((results / "pilot" / "selfgen_eval").iterdir())
    assert len(cached) == 1  # generated once from the untrained model, reused by every run
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nhand-written text stays\n")
    second = results / summarize.PILOT_BUDGETS[0][0]  # a second pilot budget gets its own gate and tables
    second.mkdir()
    for name in ("sst5__none__base__s0.json", "sst5__none__vanilla__s0.json", "sst5__none__vanilla__s1.json"):
        shutil.copy(results / "pilot" / name, second / name)
    half = results / summarize.MECHANISM_BUDGETS[0][0]  # a second mechanism budget gets its own section
    half.mkdir()
    for name in ("sst5__none__base__s0.json", "sst5__none__vanilla__s0.json", "sst5__dental__lwf__s0.json"):
        shutil.copy(results / "pilot" / name, half / name)
    variant = json.loads((results / "pilot" / "sst5__dental__lwf__s1.json").read_text())
    variant["spec"].update(method="lwf_coef01", seed=0)  # any variant run in that folder is compared too
    variant["run_id"] = "sst5__dental__lwf_coef01__s0"
    (half / "sst5__dental__lwf_coef01__s0.json").write_text(json.dumps(variant))
    confirm = results / "confirm"  # the confirmatory folder gets its own section, first, with one comparison
    confirm.mkdir()
    for name in ("sst5__none__base__s0.json", "sst5__none__vanilla__s0.json", "sst5__none__vanilla__s1.json",
                 "sst5__dental__lwf__s0.json", "sst5__dental__lwf__s1.json"):
        shutil.copy(results / "pilot" / name, confirm / name)
    assert summarize.main(["--results_dir", str(results), "--docs", str(docs)]) == 0
    confirm_rows = (results / "confirm.csv").read_text().splitlines()
    assert len(confirm_rows) == 1 + 3 and any(r.startswith("sst5,dental,lwf,vanilla,2,gold_logprob")
                                              for r in confirm_rows)
    assert (tmp_path / "results_confirm.png").exists()
    assert len((results / f"{second.name}.csv").read_text().splitlines()) == 1 + 1  # vanilla against base
    rows = (results / "pilot.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 + 1  # vanilla and lwf against base, lwf against vanilla
    assert any(r.startswith("sst5,dental,lwf,vanilla,2,gold_logprob") for r in rows)
    text = docs.read_text()
    assert "hand-written text stays" in text and summarize.BEGIN in text and "sst5__dental__lwf__s1" in text
    assert "**base** (untrained)" in text and "Gate" in text
    assert f"configs/{summarize.PILOT_BUDGETS[0][1]}" in text and text.count("#### Gate") == 2
    assert text.index(f"configs/{summarize.CONFIRM_CONFIG}") < text.index("configs/pilot.yaml")
    assert "Interim: 2 of the 5 planned seed pairs" in text  # two pairs only: the confirmatory test waits for five
    assert f"configs/{summarize.MECHANISM_BUDGETS[0][1]}" in text
    half_rows = (results / f"{half.name}.csv").read_text().splitlines()
    assert len(half_rows) == 1 + 5 and any(r.startswith("sst5,dental,lwf_coef01,vanilla,1,") for r in half_rows)
    assert (tmp_path / "results_pilot.png").exists()
    for seed in (2, 3, 4):  # five pairs: the confirmatory test is read, with what it could have detected
        for method, forget in (("vanilla", "none"), ("lwf", "dental")):
            record = json.loads((confirm / f"sst5__{forget}__{method}__s{seed % 2}.json").read_text())
            record["spec"]["seed"], record["run_id"] = seed, f"sst5__{forget}__{method}__s{seed}"
            if method == "lwf":
                ev = record["eval"]["sst5"]
                ev["gold_logprobs"] = [v + 0.01 * seed for v in ev["gold_logprobs"]]
            (confirm / f"{record['run_id']}.json").write_text(json.dumps(record))
    assert summarize.main(["--results_dir", str(results), "--docs", str(docs)]) == 0
    text = docs.read_text()
    confirm_text = text[text.index(f"configs/{summarize.CONFIRM_CONFIG}"):text.index("configs/pilot.yaml")]
    assert "Interim" not in confirm_text and "Sensitivity (after the fact" in confirm_text
    assert "nan" not in confirm_text.split("Sensitivity", 1)[1].split("\n", 1)[0]
    assert "| sst5 | dental | lwf vs vanilla | 5 | gold_logprob (primary)" in confirm_text


def test_summarize_writes_its_report_under_the_results_folder_by_default(tmp_path, monkeypatch):
    """With no --docs, the generated block goes to <results>/REPORT.md, never into docs/."""
    from experiments import summarize

    findings = summarize.REPO / "docs" / "results.md"
    before = findings.read_text(encoding="utf-8") if findings.exists() else None
    monkeypatch.setattr(summarize, "RESULTS", tmp_path)
    assert summarize.main([]) == 0
    report = (tmp_path / "REPORT.md").read_text(encoding="utf-8")
    assert summarize.BEGIN in report and summarize.END in report
    assert (findings.read_text(encoding="utf-8") if findings.exists() else None) == before


def test_optimizer_probe_on_tiny_model(tiny_setup, tmp_path):
    from experiments import optimizer_probe

    root, data, model_dir = tiny_setup
    out = tmp_path / "probe.json"
    assert optimizer_probe.main(["--model", model_dir, "--data_dir", str(data), "--seeds", "0", "--learn_steps", "2",
                                 "--batch_size", "2", "--n_prompts", "8", "--sgd_lrs", "0.1", "--cap", "50",
                                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    options = report["seeds"][0]["options"]
    assert [o["optimizer"] for o in options] == ["shared", "preconditioned", "preconditioned", "sgd"]
    assert [o["coef"] for o in options[1:3]] == [1.0, 0.1]
    assert all(o["optimizer_state_unchanged"] is True for o in options[1:3])  # read-only preconditioner
    for o in options:
        step = o["steps"][0]
        assert step["update_norm"] > 0 and -1 <= step["cos_ascent_direction"] <= 1
    # plain SGD moves exactly along the (clipped) ascent direction
    assert options[3]["steps"][0]["cos_ascent_direction"] == pytest.approx(1.0, abs=1e-2)


# ------------------------------------------------------------------------------------------ seed-level statistics
def test_seed_tests_match_scipy_paired_and_exact_wilcoxon():
    import math

    import numpy as np
    from scipy import stats

    method = np.array([0.52, 0.47, 0.50, 0.55, 0.49])
    vanilla = np.array([0.48, 0.46, 0.47, 0.50, 0.48])
    from experiments.summarize import seed_tests

    out = seed_tests(method - vanilla)
    d = [0.04, 0.01, 0.03, 0.05, 0.01]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    assert out["mean"] == pytest.approx(mean) and out["sd"] == pytest.approx(sd)
    assert out["p_t"] == pytest.approx(stats.ttest_rel(method, vanilla).pvalue)  # the paired test on the two arms
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, df 4) from a table
    assert (out["t_low"], out["t_high"]) == pytest.approx((mean - half, mean + half))
    # five positive differences: exact two-sided signed-rank p = 2 / 2**5; three: 2 / 2**3
    assert out["p_wilcoxon"] == pytest.approx(2 / 32)
    assert seed_tests([0.01, 0.02, 0.03])["p_wilcoxon"] == pytest.approx(0.25)
    assert math.isnan(seed_tests([0.1])["p_t"])


def test_holm_textbook_example():
    from experiments.summarize import holm

    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan")])[0] == 0.5


def _slow_hierarchical_bootstrap(diff, n_boot, seed):
    import random

    rng = random.Random(seed)
    n_seeds, n_items = len(diff), len(diff[0])
    means = []
    for _ in range(n_boot):
        total = 0.0
        for _ in range(n_seeds):
            row = diff[rng.randrange(n_seeds)]
            total += sum(row[rng.randrange(n_items)] for _ in range(n_items)) / n_items
        means.append(total / n_seeds)
    means.sort()
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def test_hierarchical_bootstrap_against_a_slow_reference():
    import numpy as np

    from experiments.summarize import hierarchical_bootstrap, paired_stats

    rng = np.random.default_rng(1)
    # three seeds whose whole item set shifts together (+6, -2, +1 points) plus item noise
    shift = np.array([0.06, -0.02, 0.01])[:, None]
    b = rng.integers(0, 2, size=(3, 40)).astype(float)
    a = np.clip(b + shift + rng.normal(0, 0.05, size=(3, 40)), -1, 2)
    fast = hierarchical_bootstrap(a, b, n_boot=4000, seed=0)
    low, high = _slow_hierarchical_bootstrap((a - b).tolist(), 4000, 0)
    assert fast["mean"] == pytest.approx((a - b).mean())
    assert fast["low"] == pytest.approx(low, abs=0.006) and fast["high"] == pytest.approx(high, abs=0.006)
    # the item bootstrap with seeds held fixed ignores the seed variance: its interval is much narrower
    item = paired_stats(a, b, n_boot=4000)
    assert (fast["high"] - fast["low"]) > 2 * (item["ci_high"] - item["ci_low"])
    const = hierarchical_bootstrap(b + 0.1, b, n_boot=200)
    assert const["low"] == pytest.approx(0.1) and const["high"] == pytest.approx(0.1) and const["p"] == 0.0


def test_gate_with_one_vanilla_seed_says_the_sd_is_not_measured():
    from experiments.summarize import gate, gate_markdown

    def run(method, acc, share):
        return {"run_id": method, "spec": {"learn": "sst5", "forget": "none", "method": method, "seed": 0},
                "eval": {"sst5": {"score": acc, "max_pred_share": share}}}

    g = gate([run("base", 0.41, 0.52), run("vanilla", 0.473, 0.57)])
    assert g["gain"] == pytest.approx(0.063) and not g["pass_share"] and not g["pass_sd"]
    text = gate_markdown(g)
    assert "seed SD not measured (one seed)" in text and "The strict gate not passed" in text and "57.0 %" in text


def test_power_table_uses_the_measured_lwf_delta_sd():
    from experiments.summarize import lwf_delta_sd, power_markdown, seeds_needed

    rows = [{"method": "lwf", "reference": "base", "learn_stats": {"acc": {"deltas": [0.1, 0.2]}}},
            {"method": "lwf", "reference": "vanilla", "learn_stats": {"acc": {"deltas": [0.0, 0.003, 0.012]}}}]
    sd, n = lwf_delta_sd(rows)
    assert n == 3 and sd == pytest.approx(0.0062450, rel=1e-4)  # stdev of 0, 0.3, 1.2 points
    table = power_markdown({"ready": False}, None, (sd, n))
    assert "| 0.6 | the pilot's LWF − vanilla Δ of accuracy, 3 seeds" in table
    assert table.splitlines()[2].endswith(f"| {seeds_needed(0.03, sd)} |") and "5 seeds" in table
    assert lwf_delta_sd(rows[:1]) is None


def test_power_and_seeds_needed_match_published_values():
    from experiments.summarize import paired_t_power, seeds_needed

    # G*Power, one-sample/paired t, two-sided alpha 0.05, power 0.8: d = 1 -> n = 10 (0.803), d = 0.5 -> n = 34 (0.808)
    assert seeds_needed(1.0, 1.0) == 10
    assert paired_t_power(10, 1.0, 1.0) == pytest.approx(0.803, abs=0.002)
    assert seeds_needed(0.5, 1.0) == 34
    assert paired_t_power(34, 0.5, 1.0) == pytest.approx(0.808, abs=0.002)
    with pytest.raises(ValueError, match="positive"):
        seeds_needed(0.03, 0.0)


def test_detectable_effect_against_simulated_paired_t_tests():
    import numpy as np
    from scipy import stats

    from experiments.summarize import detectable_effect

    # Reference: draw 20,000 five-seed designs with per-seed Δ ~ N(effect, sd); count the two-sided t-test's rejections.
    n, sd = 5, 0.7
    effect = detectable_effect(n, sd)
    rng = np.random.default_rng(0)
    draws = rng.normal(effect, sd, size=(20000, n))
    rejected = stats.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.8, abs=0.01)
    assert detectable_effect(10, 1.0) == pytest.approx(0.99, abs=0.01)  # G*Power: d = 1 at n = 10 gives 0.803
    assert detectable_effect(10, 2.0) == pytest.approx(2 * detectable_effect(10, 1.0))  # scales with the SD
    assert math.isnan(detectable_effect(1, 1.0)) and math.isnan(detectable_effect(5, 0.0))


def test_sensitivity_line_reads_the_lwf_against_vanilla_spread():
    from experiments.summarize import detectable_effect, sensitivity_markdown

    rows = [{"method": "lwf", "reference": "vanilla",
             "learn_stats": {"acc": {"deltas": [0.0, 0.01, -0.01, 0.02, -0.005]},
                             "gold_logprob": {"deltas": [0.001, -0.002, 0.0, 0.003, 0.001]}}}]
    text = sensitivity_markdown(rows)
    acc_sd = statistics.stdev([0.0, 1.0, -1.0, 2.0, -0.5])
    assert f"{detectable_effect(5, acc_sd):.1f} points of accuracy (SD of the per-seed Δ {acc_sd:.1f}, 5 seeds)" in text
    assert "nats of gold log-probability" in text and text.index("nats") < text.index("points")
    assert sensitivity_markdown([{"method": "vanilla", "reference": "base", "learn_stats": {}}]) == ""
    alike = [{"method": "lwf", "reference": "vanilla", "learn_stats": {"acc": {"deltas": [0.01] * 5}}}]
    assert sensitivity_markdown(alike) == ""  # no spread: nothing to size, and no "nan" in the docs


def test_tost_against_two_scipy_one_sided_tests():
    import numpy as np
    from scipy import stats

    from experiments.summarize import tost

    d = np.array([0.01, -0.01, 0.0, 0.02, -0.02])
    out = tost(d, 0.03)
    lower = stats.ttest_1samp(d, -0.03, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, 0.03, alternative="less").pvalue
    assert out["p"] == pytest.approx(max(lower, upper)) and out["p"] < 0.05  # equivalent within ±3 points
    assert tost(d + 0.05, 0.03)["p"] > 0.5  # a shifted effect is not equivalent


def test_stale_runs_are_detected_by_their_self_generated_texts():
    from experiments.summarize import stale_runs

    def rec(run_id, method, texts):
        return {"run_id": run_id, "spec": {"learn": "sst5", "forget": "dental", "method": method, "seed": 0},
                "train": {"lwf": {"forgotten": [{"index": i, "text": t} for i, t in texts.items()]}}}
    runs = [rec("all", "ga_all", {0: "A", 1: "B", 2: "C"}), rec("same", "lwf", {1: "B"}),
            rec("old", "lwf", {1: "X"})]
    assert stale_runs(runs) == ["old"]


def test_mechanism_task_swaps_labels_in_the_chat_format(tiny_setup):
    _, data, model_dir = tiny_setup
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    task_utils.set_chat_tokenizer(tok)
    positive = {"id": "p", "text": "Great fun .", "label": 4}
    negative = {"id": "n", "text": "Awful .", "label": 0}
    assert task_utils.target_text("sst2swap", positive) == "negative"
    assert task_utils.target_text("sst2swap", negative) == "positive"
    text = task_utils.sst2_doc_to_text(positive)
    assert text == tok.apply_chat_template([{"role": "user", "content": task_utils.sst2_user_message(positive)}],
                                           tokenize=False, add_generation_prompt=True)
    learn, forget = run.sst2_pools(str(data))
    assert not set(learn["id"]) & set(forget["id"]) and 2 not in set(learn["label"]) | set(forget["label"])
    prompts = run.forget_prompts("sst2orig", str(data), 2)["sst2orig"]
    assert prompts == [task_utils.sst2_user_message(forget[i]) for i in range(len(prompts))]


def test_answer_logliks_against_plain_autograd(tiny_setup):
    import torch
    from transformers import AutoModelForCausalLM

    _, _, model_dir = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts, responses = [[1, 5, 7], [2, 9]], [[4, 6], [8]]
    got = run.answer_logliks(model, prompts, responses + [])
    for p, r, value in zip(prompts, responses, got):
        logits = model(input_ids=torch.tensor([p + r])).logits[0]
        ref = sum(torch.log_softmax(logits[len(p) - 1 + k], -1)[tok].item() for k, tok in enumerate(r)) / len(r)
        assert value == pytest.approx(ref, abs=1e-5)
    assert run.answer_logliks(model, [[1]], [[]]) == [None]


def test_mechanism_runs_score_the_swapped_label(tiny_setup, tmp_path):
    root, data, model_dir = tiny_setup
    config = run.load_config(str(run.REPO / "experiments" / "configs" / "mechanism.yaml"))
    settings = run.merged_settings({**config["settings"], **{k: TINY[k] for k in ("max_steps", "batch_size",
                                    "learning_rate", "max_length", "eval_batch_size")},
                                    "n_eval_learn": 4, "n_selfgen_eval": 2, "n_forget_prompts": 2}, [])
    for method in ("base", "vanilla"):
        record = run.run_one(run.make_spec("sst2swap", "none", method, 0), settings, str(data), None,
                             str(tmp_path), model_name=model_dir, work_dir=str(root / "work"))
        e = record["eval"]["sst2swap"]
        docs = {d["id"]: d for d in (json.loads(x) for x in (data / "sst5" / "dev.jsonl").read_text().splitlines())}
        assert e["doc_ids"] and all(docs[i]["label"] != 2 for i in e["doc_ids"])  # dev file, no neutral
        assert e["targets"] == [task_utils.sst2swap_target(docs[i]) for i in e["doc_ids"]]
        assert set(record["selfgen_eval"]) == {"sst2orig"} and len(record["selfgen_eval"]["sst2orig"]["items"]) == 2
    # the lwf cells name the preconditioned ascent, which this branch does not have yet: refused, by name
    from hf_lwf import config as lwf_config

    if "preconditioned" not in str(lwf_config.LWFConfig.__dataclass_fields__["lwf_unlearn_optimizer"].type):
        with pytest.raises(ValueError, match="lwf_unlearn_optimizer"):
            run._training_args(run.make_spec("sst2swap", "sst2orig", "lwf", 0), settings, str(tmp_path), {"x": ["q"]})


def test_pilot_gate_on_hand_made_records():
    from experiments.summarize import gate

    def rec(method, seed, acc, share):
        return {"run_id": f"{method}{seed}", "spec": {"learn": "sst5", "forget": "none", "method": method, "seed": seed},
                "eval": {"sst5": {"score": acc, "max_pred_share": share, "items": []}}}
    base = rec("base", 0, 0.40, 0.52)  # the base model's own collapse does not count
    passing = gate([base, rec("vanilla", 0, 0.51, 0.45), rec("vanilla", 1, 0.52, 0.40), rec("vanilla", 2, 0.53, 0.30)])
    assert passing["gain"] == pytest.approx(0.12) and passing["sd"] == pytest.approx(0.01)
    assert passing["pass_gain"] and passing["pass_share"] and passing["pass_sd"] and passing["pass_weak"]
    collapsed = gate([base, rec("vanilla", 0, 0.51, 0.45), rec("vanilla", 1, 0.58, 0.55)])
    assert not collapsed["pass_share"] and not collapsed["pass_sd"]  # SD 4.9 points
    assert not gate([base])["ready"]
    weak_sd_but_one_label = gate([base, rec("vanilla", 0, 0.47, 0.51), rec("vanilla", 1, 0.48, 0.40)])
    assert weak_sd_but_one_label["gain"] == pytest.approx(0.075) and not weak_sd_but_one_label["pass_weak"]
    weak = gate([base, rec("vanilla", 0, 0.47, 0.49), rec("vanilla", 1, 0.48, 0.40)])
    assert weak["pass_weak"] and not weak["pass_gain"]


def test_mechanism_table_counts_per_gold_label_by_hand():
    from experiments.summarize import answer_word, mechanism_markdown

    assert answer_word("Positive.") == "positive" and answer_word("The review is negative, not positive") == "negative"
    assert answer_word("The sentiment of this movie review is generally") == "other"
    run = {"run_id": "sst2swap__sst2orig__lwf__s0", "spec": {"seed": 0, "method": "lwf"},
           "eval": {"sst2swap": {"score": 0.6, "targets": [0, 0, 1, 1, 1], "preds": [0, 1, 1, 1, 0]}},
           "train": {"lwf": {"unlearn_steps": 2, "unlearn_points": 4,
                             "forgotten": [{"text": "positive"}, {"text": "Positive!"}, {"text": "hm"}]}}}
    line = mechanism_markdown([run]).splitlines()[2]
    # gold 0: 1 of 2 right; gold 1: 2 of 3 right; predicted 0: 2 of 5, predicted 1: 3 of 5
    assert line == "| sst2swap__sst2orig__lwf__s0 | 60.0 | 50.0 | 66.7 | 40.0 | 60.0 | 2 / 4 | positive 2, other 1 |"
