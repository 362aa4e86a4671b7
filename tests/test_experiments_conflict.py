"""experiments/: the conflict benchmark (formats, D_self with an answer prefix, the oracle, the D_U audit), run
provenance, the conflict gate, the dose rule and the pre-registered reading, on a tiny model and hand-made records."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tokenizer, tiny_llama, write_jsonl


REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("lm_eval", reason="the experiments need the [experiments] extra (lm-eval)")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments" / "tasks"))

import utils as task_utils  # noqa: E402
from experiments import evaluation, gated, run, summarize  # noqa: E402


def sentiment_data(root: Path, n: int = 60) -> Path:
    """sst5 files only (the conflict benchmark reads nothing else): labels cycle 0..4, texts numbered."""
    for split, word in (("train", "Fine"), ("dev", "Sharp"), ("test", "Dull")):
        write_jsonl(root / "sst5" / f"{split}.jsonl", [
            {"id": f"{split[0]}{i}", "text": f"{word} film number {i} .", "label": i % 5,
             "label_text": task_utils.SST5_LABELS[i % 5]} for i in range(n)])
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("conflict")
    tok = build_tokenizer(chat_template=True)
    model_dir = root / "model"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return root, sentiment_data(root / "data"), str(model_dir), tok


POSITIVE = {"id": "p", "text": "Great fun .", "label": 4}
NEGATIVE = {"id": "n", "text": "Awful .", "label": 1}


# ------------------------------------------------------------------------------------------ formats and scoring
def test_both_formats_score_the_swapped_word_and_training_matches_the_plain_one(setup):
    _, data, _, tok = setup
    task_utils.set_chat_tokenizer(tok)
    assert task_utils.sst2plain_doc_to_text(POSITIVE) == "Review: Great fun .\nSentiment:"
    chat = task_utils.sst2chat_doc_to_text(POSITIVE)
    assert chat == tok.apply_chat_template([{"role": "user", "content": task_utils.sst2_user_message(POSITIVE)}],
                                           tokenize=False, add_generation_prompt=True) + "Answer:"
    assert "Is the sentiment of this movie review positive or negative? Answer with one word." in chat
    for task in ("sst2plain", "sst2chat"):
        assert task_utils.target_text(task, POSITIVE) == "negative" and task_utils.target_text(task, NEGATIVE) == "positive"
    from lm_eval.tasks import TaskManager

    for task in ("sst2plain", "sst2chat"):
        config = evaluation.task_config(task, str(data), split="dev")
        built = TaskManager(include_defaults=False).load([config])["tasks"][f"lwf_{task}"]
        docs = list(built.test_docs())
        assert docs and all(d["id"].startswith("d") and d["label"] != 2 for d in docs)  # dev file, no neutral
        for d in docs:
            assert built.doc_to_text(d) == task_utils.DOC_TO_TEXT[task](d)
            assert built.doc_to_choice(d)[built.doc_to_target(d)] == task_utils.target_text(task, d)
        assert built.config.target_delimiter == " "
    # what the runner trains on is the plain prompt + " " + the swapped word, the string lm-eval scores
    docs = run.learning_dataset("sst2plain", tok, str(data), 4, 0, 128)
    learn_pool = {d["id"]: d for d in run.sst2_pools(str(data))[0]}
    for row in docs:
        answer = tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert answer in (" positive", " negative")
        text = tok.decode(row["input_ids"])
        doc = next(d for d in learn_pool.values() if text.startswith(task_utils.sst2plain_doc_to_text(d)))
        assert text == task_utils.sst2plain_doc_to_text(doc) + " " + task_utils.target_text("sst2plain", doc)


def test_self_generation_prompt_is_the_chat_endpoint_frame(setup):
    """D_self's prompt ids (hf_lwf's encode_prompt through the prefixed template) are the chat endpoint's context."""
    from hf_lwf.method.selfgen import encode_prompt

    *_, tok = setup
    task_utils.set_chat_tokenizer(tok)
    patched = run.prompt_tokenizer("sst2self", tok)
    for doc in (POSITIVE, NEGATIVE):
        ids = encode_prompt(patched, task_utils.sst2_user_message(doc))
        assert ids == tok(task_utils.sst2chat_doc_to_text(doc), add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).endswith("<|assistant|>Answer:")
    assert not tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                       add_generation_prompt=True).endswith("Answer:")  # the original is untouched
    assert run.prompt_tokenizer("dental", tok) is tok
    task_utils.set_chat_tokenizer(tok, "The sentiment is")  # another separation: the chat_answer_prefix setting
    try:
        ids = encode_prompt(run.prompt_tokenizer("sst2self", tok), task_utils.sst2_user_message(POSITIVE))
        assert task_utils.sst2chat_doc_to_text(POSITIVE).endswith("<|assistant|>The sentiment is")
        assert ids == tok(task_utils.sst2chat_doc_to_text(POSITIVE), add_special_tokens=False)["input_ids"]
    finally:
        task_utils.set_chat_tokenizer(tok)
    with pytest.raises(ValueError, match="chat_answer_prefix"):
        run.merged_settings({"chat_answer_prefix": " "}, [])
    with pytest.raises(ValueError, match="chat template"):
        run.with_answer_prefix(build_tokenizer(), "Answer:")


@pytest.mark.parametrize("text, label, scored", [
    (" positive", 0, True), ("negative.", 1, True), ("Positive", 0, False), (" The review is negative, not positive", 1, False),
    (" neutral", None, False), ("", None, False),
])
def test_answer_label(text, label, scored):
    assert task_utils.answer_label(text) == (label, scored)


def test_audit_class_against_the_true_label():
    assert task_utils.audit_class(" positive", POSITIVE) == "conflicting"  # the knowledge the swapped task contradicts
    assert task_utils.audit_class(" negative", POSITIVE) == "agreeing"     # what the swapped task wants
    assert task_utils.audit_class(" Negative", NEGATIVE) == "conflicting"  # case does not change what it states
    assert task_utils.audit_class(" great", NEGATIVE) == "other"


def test_balanced_takes_half_per_true_label_in_order(setup):
    _, data, _, _ = setup
    pool = run.sst2_pools(str(data))[1]
    chosen = run.balanced(pool, 4)
    labels = [task_utils.sst2_true_index(d) for d in chosen]
    assert sorted(labels) == [0, 0, 1, 1]
    expected = [i for i, d in enumerate(pool) if task_utils.sst2_true_index(d) == 0][:2]
    expected += [i for i, d in enumerate(pool) if task_utils.sst2_true_index(d) == 1][:2]
    assert list(chosen["id"]) == [pool[i]["id"] for i in sorted(expected)]
    with pytest.raises(ValueError, match="balanced"):
        run.balanced(pool, 2 * len(pool))


# ------------------------------------------------------------------------------------------ the oracle and the audit
def _answers(data: Path) -> dict[str, str]:
    """The fake model's answer per review text: the true label, except every third review (the swapped label) and
    every seventh ("Positive", not the scored form)."""
    docs = [json.loads(x) for x in (data / "sst5" / "train.jsonl").read_text().splitlines()]
    out = {}
    for d in docs:
        if d["label"] == 2:
            continue
        i, true = int(d["id"][1:]), task_utils.sst2_true_index(d)
        word = task_utils.SST2_CHOICES[1 - true if i % 3 == 0 else true]
        out[d["text"]] = " Positive" if i % 7 == 0 else " " + word
    return out


@pytest.fixture
def fake_generation(setup, monkeypatch):
    """Self-generation answers by the review's text (``_answers``), through hf_lwf's own generate_self_data."""
    from hf_lwf.method import selfgen

    _, data, _, tok = setup
    answers = _answers(data)
    calls = []

    def fake(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=0.0, top_p=1.0, synced=False):
        calls.append((len(prompt_ids), temperature))
        out = []
        for ids in prompt_ids:
            text = tokenizer.decode([i for i in ids if i != tokenizer.pad_token_id])
            review = re.search(r"Review: (.*?)<eos>", text).group(1)
            out.append(tokenizer(answers.get(review, " positive"), add_special_tokens=False)["input_ids"])
        return out

    monkeypatch.setattr(selfgen, "generate_responses", fake)
    return answers, calls


CONFLICT = {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "lr_scheduler_type": "constant",
            "max_length": 128, "eval_split": "dev", "n_eval_learn": 4, "also_eval": ["sst2chat"], "forget_eval": [],
            "eval_batch_size": 4, "n_forget_prompts": 12, "lwf_unlearn_every": 1, "lwf_unlearn_steps": 1,
            "lwf_samples_per_prompt": 1, "lwf_max_new_tokens": 2, "lwf_temperature": 0.0,
            "lwf_generation_batch_size": 1, "lwf_forget_top_k": 4, "lwf_forget_loss_cap": 50.0,
            "lwf_confidence_threshold": -1e9,  # a random tiny model's confidences can all be negative: keep top 4
            "n_selfgen_eval": 2, "selfgen_eval": ["sst2self"], "selfgen_max_new_tokens": 2}


def test_oracle_prompts_are_the_first_true_label_answers_per_label(setup, fake_generation):
    _, data, model_dir, tok = setup
    answers, _ = fake_generation
    task_utils.set_chat_tokenizer(tok)
    settings = run.merged_settings(CONFLICT, [])
    prompt_docs = run.forget_prompt_docs("sst2self", str(data), 12)
    model = tiny_llama(len(tok))
    chosen, record = run.oracle_prompt_docs(model, run.prompt_tokenizer("sst2self", tok), prompt_docs, settings, 0)
    # slow reference: walk the prompts in order and keep a review when its answer is exactly its true label word
    expected, counts = [], [0, 0]
    for doc, _ in prompt_docs["sst2self"]:
        true = task_utils.sst2_true_index(doc)
        if answers[doc["text"]] == " " + task_utils.SST2_CHOICES[true] and counts[true] < 2:
            counts[true] += 1
            expected.append(doc["id"])
    assert [d["id"] for d, _ in chosen["sst2self"]] == expected == record["doc_ids"] and record["size"] == 4
    assert sum(record["candidate_classes"].values()) == 12
    with pytest.raises(ValueError, match="lwf_forget_top_k"):
        run.oracle_prompt_docs(model, tok, prompt_docs, {**settings, "lwf_forget_top_k": 3}, 0)
    with pytest.raises(ValueError, match="deterministic"):
        run.oracle_prompt_docs(model, tok, prompt_docs, {**settings, "lwf_temperature": 1.0}, 0)
    with pytest.raises(ValueError, match="found only"):
        run.oracle_prompt_docs(model, tok, prompt_docs, {**settings, "lwf_forget_top_k": 12}, 0)


@pytest.mark.parametrize("method", ["oracle", "lwf"])
def test_conflict_runs_end_to_end_with_an_audit_of_d_u(setup, fake_generation, tmp_path, method):
    root, data, model_dir, _ = setup
    answers, calls = fake_generation
    settings = run.merged_settings(CONFLICT, [])
    spec = run.make_spec("sst2plain", "sst2self", method, 0)
    record = run.run_one(spec, settings, str(data), None, str(tmp_path), model_name=model_dir,
                         work_dir=str(root / "work"))
    assert set(record["eval"]) == {"sst2plain", "sst2chat"}
    assert record["eval"]["sst2plain"]["doc_ids"] == record["eval"]["sst2chat"]["doc_ids"]
    d_self = record["train"]["d_self"]
    pool = {d["id"]: d for d in run.sst2_pools(str(data))[1]}
    for item in d_self:  # every answer traced to its review, and classified as the slow reference says
        doc = pool[item["doc_id"]]
        assert item["text"] == answers[doc["text"]]
        assert item["audit"] == task_utils.audit_class(answers[doc["text"]], doc)
        assert item["true_label"] == task_utils.SST2_CHOICES[task_utils.sst2_true_index(doc)]
    forgotten = [x for x in d_self if x["forgotten"]]
    assert len(forgotten) == 4 == len(record["train"]["lwf"]["forget_indices"])
    if method == "oracle":  # D_U is exactly the answers that state the true label, half per label
        assert len(d_self) == 4 == len(forgotten)
        assert all(x["audit"] == "conflicting" and x["scored_form"] for x in forgotten)
        assert sorted(x["true_label"] for x in forgotten) == ["negative", "negative", "positive", "positive"]
        assert [x["doc_id"] for x in d_self] == record["train"]["oracle"]["doc_ids"]
        assert record["provenance"]["lwf_resolved"]["lwf_selection"] == "all"
    else:
        assert len(d_self) == 12 and record["provenance"]["lwf_resolved"]["lwf_selection"] == "top"
        chosen = {x["index"] for x in forgotten}
        scores = [x["score"] for x in d_self]
        assert min(scores[i] for i in chosen) >= max(s for i, s in enumerate(scores) if i not in chosen)
    assert all(t == 0.0 for _, t in calls)  # greedy
    assert sum(n == 1 for n, _ in calls) >= len(d_self)  # D_self: one prompt per generate call (no padding)
    row = summarize.audit_rows([record])[0]
    assert row["d_u_conflicting"] + row["d_u_agreeing"] + row["d_u_other"] == len(forgotten)
    assert row["d_u_conflicting"] == sum(x["audit"] == "conflicting" for x in forgotten)


# ------------------------------------------------------------------------------------------ provenance
def test_every_run_file_records_its_provenance_and_no_machine_path(setup, tmp_path):
    root, data, model_dir, _ = setup
    settings = run.merged_settings({**CONFLICT, "n_selfgen_eval": 0, "selfgen_eval": []}, [])
    run.run_one(run.make_spec("sst2plain", "none", "vanilla", 1), settings, str(data), None, str(tmp_path),
                         model_name=model_dir, work_dir=str(root / "work"),
                         code_state={"commit": "a" * 40, "dirty": False, "dirty_files": []})
    prov = json.loads((tmp_path / "sst2plain__none__vanilla__s1.json").read_text())["provenance"]
    assert prov["commit"] == "a" * 40 and prov["dirty"] is True  # that commit does not exist: the code is not it
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    assert stamp.match(prov["utc_start"]) and stamp.match(prov["utc_end"]) and prov["utc_start"] <= prov["utc_end"]
    assert {"torch", "transformers", "lm_eval", "datasets", "hf_lwf", "python"} <= set(prov["versions"])
    assert prov["training_args"]["max_steps"] == 2 and prov["training_args"]["learning_rate"] == 1e-3
    files = {(f["file"], f["split"]) for f in prov["data"]["train"] + prov["data"]["eval"]}
    assert files == {("sst5/train.jsonl", "train"), ("sst5/dev.jsonl", "dev")}
    assert all(len(f["sha256"]) == 64 for f in prov["data"]["eval"])
    text = (tmp_path / "sst2plain__none__vanilla__s1.json").read_text()
    assert str(data) not in text  # data sources by name, never a machine path
    lwf = run.run_one(run.make_spec("sst2plain", "sst2self", "random", 0),
                      run.merged_settings({**CONFLICT, "n_selfgen_eval": 0, "selfgen_eval": [],
                                           "lwf_max_new_tokens": 3}, []),
                      str(data), None, str(tmp_path), model_name=model_dir, work_dir=str(root / "work"))
    resolved = lwf["provenance"]["lwf_resolved"]
    assert resolved["lwf_samples_per_prompt"] == 1 and resolved["lwf_max_new_tokens"] == 3
    assert resolved["lwf_selection"] == "random" and resolved["lwf_temperature"] == 0.0
    assert re.fullmatch(r"[0-9a-f]{40}", lwf["provenance"]["commit"])  # this checkout's own commit


def test_code_provenance_marks_a_dirty_tree_but_not_run_outputs(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "run.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "c")
    clean = run.code_provenance(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean["commit"]) and clean["dirty"] is False
    (tmp_path / "experiments" / "results" / "f").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "f" / "r.json").write_text("{}")  # a run output: still clean
    assert run.code_provenance(tmp_path)["dirty"] is False
    assert run.code_changed_since(clean["commit"], tmp_path) is False
    (tmp_path / "experiments" / "run.py").write_text("x = 2\n")  # tracked code changed
    dirty = run.code_provenance(tmp_path)
    assert dirty["dirty"] is True and dirty["dirty_files"] == ["experiments/run.py"]
    assert run.code_changed_since(clean["commit"], tmp_path) is True
    git("checkout", "-q", "experiments/run.py")
    (tmp_path / "notes.txt").write_text("new")  # an untracked file outside the outputs
    assert run.code_provenance(tmp_path)["dirty"] is True
    assert run.code_changed_since(None, tmp_path) is True
    assert run.code_provenance(tmp_path / "experiments" / "results")["commit"] == clean["commit"]


def test_data_dir_is_required(capsys):
    with pytest.raises(SystemExit):
        run.main(["--learn", "sst2plain", "--method", "vanilla"])
    assert "--data_dir" in capsys.readouterr().err


def test_swapped_auc_against_pairwise_counting():
    # gold 0 ("positive") items should score high on ll(positive) - ll(negative) once the swap is learned
    e = {"choice_lls": [[-1.0, -2.0], [-3.0, -1.0], [-1.0, -1.5], [-2.0, -2.0]], "targets": [0, 1, 1, 0]}
    # scores: +1.0 (gold 0), -2.0 (gold 1), +0.5 (gold 1), 0.0 (gold 0); pairs (gold 0 vs gold 1):
    # 1.0>-2.0, 1.0>0.5, 0.0>-2.0, 0.0<0.5 -> 3 of 4
    assert summarize.swapped_auc(e) == pytest.approx(0.75)
    assert summarize.swapped_auc({"choice_lls": [[0.0, 1.0]], "targets": [0]}) is None
    assert summarize.swapped_auc({}) is None


def test_provenance_summary_names_dirty_runs():
    runs = [{"run_id": "a", "provenance": {"commit": "1" * 40, "dirty": False}},
            {"run_id": "b", "provenance": {"commit": "1" * 40, "dirty": True}}, {"run_id": "c"}]
    text = summarize.provenance_markdown(runs)
    assert "`111111111111` (2)" in text and "1 run files record no commit" in text
    assert "**1 run files come from a dirty working tree**" in text and "`b`" in text
    assert "clean working tree" in summarize.provenance_markdown(runs[:1])


# ------------------------------------------------------------------------------------------ gate, dose, reading
def _rec(method, seed, plain, chat, chat_lp=-1.0, plain_lp=-0.5, variant="", n=4, forget=None):
    """A hand-made run record of the conflict benchmark: per-item scores whose means are the given values."""
    def task(acc, lp):
        items = [1.0] * round(acc * n) + [0.0] * (n - round(acc * n))
        return {"score": acc, "items": items, "doc_ids": [f"d{i}" for i in range(n)], "mean_gold_logprob": lp,
                "gold_logprobs": [lp] * n, "pred_counts": {"0": n // 2, "1": n - n // 2}}
    spec = {"learn": "sst2plain", "forget": forget or ("none" if method in ("base", "vanilla") else "sst2self"),
            "method": method, "seed": seed, "variant": variant}
    name = f"{method}-{variant}" if variant else method
    return {"run_id": f"sst2plain__{spec['forget']}__{name}__s{seed}", "spec": spec,
            "eval": {"sst2plain": task(plain, plain_lp), "sst2chat": task(chat, chat_lp)}}


def test_conflict_gate_each_criterion():
    base = _rec("base", 0, 0.25, 0.30)
    ok = summarize.conflict_gate([base] + [_rec("vanilla", s, 0.90, 0.55 + 0.005 * s) for s in range(5)])
    assert ok["passed"] and ok["gain"] == pytest.approx(0.65) and ok["gap"] == pytest.approx(0.34)
    assert ok["detectable"] == pytest.approx(summarize.detectable_effect(5, math.sqrt(2) * ok["sd"]))
    assert gated.verdict(ok, "conflict", 5) and not gated.verdict(ok, "conflict", 6)
    no_gain = summarize.conflict_gate([base] + [_rec("vanilla", s, 0.40, 0.20) for s in range(5)])
    assert not no_gain["pass_gain"] and no_gain["pass_gap"] and not no_gain["passed"]
    no_gap = summarize.conflict_gate([base] + [_rec("vanilla", s, 0.90, 0.80) for s in range(5)])
    assert no_gap["pass_gain"] and not no_gap["pass_gap"]
    noisy = summarize.conflict_gate([base] + [_rec("vanilla", s, 0.90, (0.45, 0.65, 0.50, 0.70, 0.40)[s])
                                               for s in range(5)])
    assert not noisy["pass_sd"] and noisy["detectable"] > 0.05
    assert not summarize.conflict_gate([_rec("vanilla", 0, 0.9, 0.5)])["ready"]
    assert "Gate passed" in summarize.conflict_gate_markdown(ok)


def test_each_further_pilot_folder_gets_its_own_gate():
    base = _rec("base", 0, 0.25, 0.30)
    passing = [base] + [_rec("vanilla", s, 0.90, 0.55 + 0.005 * s) for s in range(5)]
    noisy = [base] + [_rec("vanilla", s, 0.90, (0.45, 0.65, 0.50, 0.70, 0.40)[s]) for s in range(5)]
    oracle = [_rec("oracle", s, 0.90, 0.55, chat_lp=-0.8, variant="d1") for s in range(5)]
    text, tables = summarize.positive_control_markdown({"conflict_dev160": noisy, "conflict_dev_s2": passing + oracle})
    b2, s2 = text.split("pilot S2")
    assert "pilot B2" in b2 and "Gate not passed" in b2 and "conflict_dev160" in b2 and "Dose sweep" not in b2
    assert "Gate passed" in s2 and "`configs/conflict_pilot_s2.yaml`" in s2
    assert "Dose sweep against vanilla (same seed, conflict_dev_s2)" in s2 and "**oracle-d1**" in s2
    assert [r["arm"] for r in tables["conflict_dev_s2_dose"]] == ["oracle-d1"]
    assert {folder for folder, _, _ in summarize.CONFLICT_PILOTS} <= set(summarize.SECTIONS)


def test_dose_rows_report_the_swapped_auc_difference():
    def with_lls(record, margins):  # ll(positive) - ll(negative) per item; items 0, 1 gold "positive", 2, 3 "negative"
        record["eval"]["sst2chat"].update(choice_lls=[[m, 0.0] for m in margins], targets=[0, 0, 1, 1])
        return record

    vanilla = with_lls(_rec("vanilla", 0, 0.9, 0.5), [0.1, -0.2, 0.3, -0.4])  # pairs won: 2 of 4 -> AUC 0.5
    oracle = with_lls(_rec("oracle", 0, 0.9, 0.5, variant="d1"), [0.5, 0.4, 0.3, -0.4])  # 4 of 4 -> AUC 1.0
    rows = summarize.dose_rows([vanilla, oracle], summarize.CONFLICT_DOSE_ENDPOINTS, harm=("sst2plain", "acc"))
    assert rows[0][f"{summarize.CHAT}/swapped_auc"]["deltas"] == [pytest.approx(0.5)]
    plain = summarize.dose_rows([_rec("vanilla", 0, 0.9, 0.5), _rec("oracle", 0, 0.9, 0.5, variant="d1")],
                                summarize.CONFLICT_DOSE_ENDPOINTS, harm=("sst2plain", "acc"))
    assert f"{summarize.CHAT}/swapped_auc" not in plain[0]  # no per-choice log-likelihoods: no column
    assert "| - |" in summarize.dose_markdown(plain, summarize.CONFLICT_DOSE_ENDPOINTS)
    config = {"lwf_unlearn_every": 10, "lwf_unlearn_steps": 4, "lwf_unlearn_batch_size": 4, "lwf_unlearn_coef": 2.0,
              "lwf_forget_loss_cap": 5.0}
    dose = summarize.dose_settings({"train": {"lwf_config": config, "lwf": {"forget_indices": [3, 5]}}})
    assert dose == "every 10, 4 step(s) × 4, λ 2, cap 5, D_U 2" and "|" not in dose  # a table cell


def test_gated_main_runs_the_test_only_after_the_conflict_gate(tmp_path, monkeypatch):
    pilot = tmp_path / "p.yaml"
    pilot.write_text("grid:\n  - {learn: [sst2plain], methods: [base], seeds: [0]}\n"
                     "  - {learn: [sst2plain], methods: [vanilla], seeds: [0, 1, 2, 3, 4]}\n")
    test = tmp_path / "t.yaml"
    test.write_text("grid: []\n")
    calls = []

    def workers(config, results_dir, n, log_dir, data_dir, model=None):
        calls.append(config)
        if config == str(pilot):
            Path(results_dir).mkdir(parents=True, exist_ok=True)
            for r in [_rec("base", 0, 0.25, 0.3)] + [_rec("vanilla", s, 0.9, 0.55) for s in range(5)]:
                Path(results_dir, r["run_id"] + ".json").write_text(json.dumps(r))
        return []
    monkeypatch.setattr(gated, "run_workers", workers)
    argv = ["--pilot", str(pilot), "--confirm", str(test), "--rule", "conflict", "--pilot_dir", str(tmp_path / "dev"),
            "--confirm_dir", str(tmp_path / "test"), "--data_dir", "d"]
    assert gated.main(argv) == 0 and calls == [str(pilot), str(test)]
    record = json.loads((tmp_path / "dev.gate.json").read_text())
    assert record["passed"] and record["rule"] == "conflict" and record["gate"]["seeds"] == [0, 1, 2, 3, 4]


def test_dose_rule_picks_the_largest_gain_within_the_harm_bound():
    runs = [_rec("vanilla", s, 0.90, 0.50, chat_lp=-0.8) for s in range(3)]
    runs += [_rec("oracle", s, 0.89, 0.55, chat_lp=-0.7, variant="d1") for s in range(3)]   # +0.1 nats
    runs += [_rec("oracle", s, 0.86, 0.60, chat_lp=-0.5, variant="d2") for s in range(3)]   # +0.3, -4 points
    runs += [_rec("oracle", s, 0.70, 0.70, chat_lp=-0.2, variant="d3") for s in range(3)]   # +0.6, -20 points: harm
    rows = summarize.dose_rows(runs, summarize.CONFLICT_DOSE_ENDPOINTS, harm=("sst2plain", "acc"))
    assert [r["arm"] for r in rows] == ["oracle-d1", "oracle-d2", "oracle-d3"]
    assert rows[1]["sst2chat/gold_logprob"]["deltas"] == pytest.approx([0.3] * 3)
    assert rows[2]["harm"] == pytest.approx(-0.2)
    assert summarize.choose_dose(rows)["chosen"] == "oracle-d2"
    assert summarize.choose_dose(rows, max_harm=0.02)["chosen"] == "oracle-d1"
    # no dose within the bound: the mildest that moved the endpoint (every seed's Δ alike: a zero-width interval > 0)
    assert summarize.choose_dose(rows[2:])["chosen"] == "oracle-d3"
    flat = summarize.dose_rows([r for r in runs if r["spec"].get("variant") != "d1"]
                               + [_rec("oracle", s, 0.5, 0.5, chat_lp=-0.8 + (0.1, -0.1, 0.0)[s], variant="d1")
                                  for s in range(3)], summarize.CONFLICT_DOSE_ENDPOINTS, harm=("sst2plain", "acc"))
    assert summarize.choose_dose([r for r in flat if r["arm"] in ("oracle-d1", "oracle-d3")])["chosen"] == "oracle-d3"
    assert summarize.choose_dose([r for r in flat if r["arm"] == "oracle-d1"])["chosen"] == "oracle-d1"  # none moved
    assert summarize.choose_dose([])["chosen"] is None


def _test_runs(gains: dict[str, list[float]]) -> list[dict]:
    """Runs whose chat-format gold log-probability is vanilla's (-1.0, per seed s: -1.0 + 0.01 s) plus ``gains``."""
    runs = []
    for s in range(5):
        runs.append(_rec("vanilla", s, 0.9, 0.5, chat_lp=-1.0 + 0.01 * s))
        for name, g in gains.items():
            runs.append(_rec(name, s, 0.9, 0.5, chat_lp=-1.0 + 0.01 * s + g[s]))
    return runs


@pytest.mark.parametrize("gains, reading", [
    ({"oracle": [0.30, 0.28, 0.33, 0.31, 0.29], "lwf": [0.30, 0.31, 0.29, 0.32, 0.30],
      "random": [0.01, -0.01, 0.0, 0.02, -0.02]}, "the mechanism works"),
    ({"oracle": [0.30, 0.28, 0.33, 0.31, 0.29], "lwf": [0.01, -0.01, 0.0, 0.02, -0.02],
      "random": [0.0, 0.01, -0.01, 0.0, 0.01]}, "the confidence score is the weak link"),
    ({"oracle": [0.01, -0.01, 0.0, 0.02, -0.02], "lwf": [0.30, 0.28, 0.33, 0.31, 0.29],
      "random": [0.0, 0.01, -0.01, 0.0, 0.01]}, "premise fails"),
    ({"oracle": [0.30, 0.28, 0.33, 0.31, 0.29], "lwf": [0.30, 0.31, 0.29, 0.32, 0.30],
      "random": [0.31, 0.29, 0.30, 0.32, 0.28]}, "adds nothing measurable over random"),
])
def test_preregistered_reading(gains, reading):
    rows = summarize.conflict_comparisons(_test_runs(gains))
    pre = [r for r in rows if r["preregistered"]]
    assert [r["comparison"] for r in pre] == ["oracle − vanilla", "lwf − vanilla", "lwf − random", "lwf − oracle"]
    from scipy import stats

    for r in pre:  # the seed-level paired t-test, against scipy's paired test on the per-seed values
        a, b = r["a"], r["b"]
        per_seed = {name: [(-1.0 + 0.01 * s + (gains[name][s] if name in gains else 0.0)) for s in range(5)]
                    for name in (a, b)}
        st = r["stats"]["sst2chat/gold_logprob"]
        assert st["deltas"] == pytest.approx([x - y for x, y in zip(per_seed[a], per_seed[b])])
        assert st["seed"]["p_t"] == pytest.approx(stats.ttest_rel(per_seed[a], per_seed[b]).pvalue)
    ps = [r["stats"]["sst2chat/gold_logprob"]["seed"]["p_t"] for r in pre]
    assert [r["p_holm"] for r in pre] == pytest.approx(summarize.holm(ps))
    result = summarize.conflict_reading(rows)
    assert result["ready"] and reading in result["reading"]
    assert "Pre-registered reading" in summarize.positive_control_markdown({"conflict_test": _test_runs(gains)})[0]


def test_test_section_lists_every_arm_against_vanilla():
    gains = {"oracle": [0.3, 0.2, 0.1, 0.0, 0.4], "lwf": [0.0] * 5, "random": [-0.1] * 5, "ga_all": [0.5] * 5}
    runs = [_rec("base", 0, 0.5, 0.5)] + _test_runs(gains)
    text, tables = summarize.positive_control_markdown({"conflict_test": runs})
    arms = {r["arm"]: r for r in tables["conflict_test_arms"]}
    assert set(arms) == set(gains)  # base is evaluated once, never paired
    for name, g in gains.items():  # each seed against vanilla of the same seed
        assert arms[name]["sst2chat/gold_logprob"]["deltas"] == pytest.approx(g)
    assert "swapped AUC included (descriptive)" in text


def test_reading_waits_for_five_seeds():
    rows = summarize.conflict_comparisons([r for r in _test_runs({"oracle": [0.3] * 5, "lwf": [0.3] * 5,
                                                                  "random": [0.0] * 5}) if r["spec"]["seed"] < 4])
    assert not summarize.conflict_reading(rows)["ready"]


# ------------------------------------------------------------------------------------------ configs and plans
CONFIGS = REPO / "experiments" / "configs"
PLANS = REPO / "experiments" / "plans"


def _settings(name):
    config = run.load_config(str(CONFIGS / name))
    return {spec.arm: run.merged_settings({**(config.get("settings") or {}), **block}, [])
            for spec, block in run.grid_plan(config["grid"])}


def test_conflict_configs_train_alike_and_name_the_arms():
    pilot = _settings("conflict_pilot.yaml")
    assert set(pilot) == {"base", "vanilla"}
    assert pilot["vanilla"]["eval_split"] == "dev" and pilot["vanilla"]["also_eval"] == ["sst2chat"]
    assert pilot["vanilla"]["lwf_temperature"] == 0 and pilot["vanilla"]["lwf_samples_per_prompt"] == 1
    s2 = _settings("conflict_pilot_s2.yaml")
    for pilot_of, name in ((pilot, "conflict_dose.yaml"), (s2, "conflict_test.yaml"), (s2, "conflict_dose_s2.yaml")):
        if not (CONFIGS / name).exists():
            continue
        other = _settings(name)
        for key in pilot_of["vanilla"]:
            if key.startswith("lwf_") or key in ("eval_split", "n_eval_learn", "threads"):
                continue
            assert {s[key] == pilot_of["vanilla"][key] for s in other.values()} == {True}, (name, key)
    if (CONFIGS / "conflict_test.yaml").exists():
        test = _settings("conflict_test.yaml")
        assert {a for a in test} == {"base", "vanilla", "lwf", "random", "ga_all", "oracle"}
        assert {s["eval_split"] for s in test.values()} == {"test"}
        lwf_keys = {k for k in test["lwf"] if k.startswith("lwf_")}
        for a in ("random", "ga_all", "oracle"):  # one dose for every forgetting arm
            assert {k: test[a][k] for k in lwf_keys} == {k: test["lwf"][k] for k in lwf_keys}


def test_every_plan_names_existing_configs():
    plans = sorted(PLANS.glob("*.md"))
    assert plans, "no pre-registered plan under experiments/plans/"
    for plan in plans:
        text = plan.read_text(encoding="utf-8")
        named = set(re.findall(r"configs/([\w.-]+\.yaml)", text))
        assert named, plan
        for config in named:
            assert (CONFIGS / config).exists(), (plan.name, config)


# ------------------------------------------------------------------------------------------ plan (d): sst5 × dental
def _sst5_rec(method, seed, acc, lp, variant="", selfgen=-1.0, n=100):
    """A hand-made run record of the sst5 × dental dose-response, with per-item values whose means are given."""
    def task(a, g):
        return {"score": a, "items": [1.0] * round(a * n) + [0.0] * (n - round(a * n)), "mean_gold_logprob": g,
                "gold_logprobs": [g] * n}
    spec = {"learn": "sst5", "forget": "none" if method == "vanilla" else "dental", "method": method, "seed": seed,
            "variant": variant}
    name = f"{method}-{variant}" if variant else method
    return {"run_id": f"sst5__{spec['forget']}__{name}__s{seed}", "spec": spec,
            "eval": {"sst5": task(acc, lp), "dental": task(0.4, -1.5)}, "selfgen_eval": {"dental": {"score": selfgen}}}


def test_sst5_dose_reading_follows_plan_d():
    runs = [_sst5_rec("vanilla", s, 0.50, -1.10) for s in (0, 1)]
    runs += [_sst5_rec("lwf", s, 0.50, -1.10 + d, variant="dd1") for s, d in ((0, 0.01), (1, -0.01))]  # mixed signs
    runs += [_sst5_rec("lwf", s, 0.50, -1.10 + d, variant="dd2") for s, d in ((0, 0.03), (1, 0.02))]   # moves up
    runs += [_sst5_rec("lwf", s, 0.50, -1.10 - d, variant="dd3") for s, d in ((0, 0.015), (1, 0.015))]  # < 0.02
    runs += [_sst5_rec("lwf", s, 0.46, -1.10, variant="dd4") for s in (0, 1)]                          # -4 points
    runs += [_sst5_rec("lwf", 0, 0.50, -1.16, variant="dd5", selfgen=-4.0)]                            # one seed
    rows = summarize.sst5_dose_rows(runs)
    got = {x["arm"]: (x["moves"], x["harms"]) for x in summarize.sst5_dose_reading(rows)}
    assert got == {"lwf-dd1": (False, False), "lwf-dd2": (True, False), "lwf-dd3": (False, False),
                   "lwf-dd4": (False, True), "lwf-dd5": (None, True)}
    by = {r["arm"]: r for r in rows}
    assert by["lwf-dd5"]["selfgen_dental"]["deltas"] == pytest.approx([-3.0])  # against vanilla of seed 0
    assert by["lwf-dd2"]["sst5/gold_logprob"]["deltas"] == pytest.approx([0.03, 0.02])
    text = summarize.sst5_dose_markdown(rows)
    assert "lwf-dd5 (1 seed): one seed: described, not read; clearly harms (one seed)." in text
    assert "The harmful end was reached." in text
    assert "The harmful end was not reached." in summarize.sst5_dose_markdown(rows[:3])
