"""The docs stay true: generated tables, links that resolve, every message explained, numbers from their artifacts."""

import ast
import json
import os
import re
from pathlib import Path

from hf_lwf.config import ON_RESUME, fields_markdown_table, fields_where, lwf_fields


ROOT = Path(__file__).resolve().parent.parent
LINKED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments" / "plans").glob("*.md")),
          ROOT / "experiments" / "results" / "REPORT.md"]
DEMO_REPORT = ROOT / "docs" / "artifacts" / "demo_report.json"


def _read(*parts) -> str:
    return (ROOT.joinpath(*parts)).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ options
def test_options_field_table_is_generated_from_the_dataclass():
    assert fields_markdown_table() in _read("docs", "options.md")


def on_resume_table() -> str:
    rows = ["| on resume | what a changed value does | fields |", "|---|---|---|"]
    for key, text in ON_RESUME.items():
        rows.append(f"| `{key}` | {text} | " + ", ".join(f"`{name}`" for name in fields_where("on_resume", key)) + " |")
    return "\n".join(rows)


def test_options_on_resume_table_follows_the_field_metadata():
    assert on_resume_table() in _read("docs", "options.md")
    assert sorted(n for k in ON_RESUME for n in fields_where("on_resume", k)) == sorted(f.name for f in lwf_fields())


def test_every_field_has_help_text():
    for field in lwf_fields():
        assert field.metadata.get("help"), field.name


def test_help_texts_say_what_a_field_does_not_what_was_measured():
    """Measurements live in docs/options.md ("Why these defaults"), where they can follow the results."""
    for field in lwf_fields():
        text = field.metadata["help"].lower()
        for word in ("provisional", "pilot", "measured", "results.md", "to be confirmed", "sweep"):
            assert word not in text, (field.name, word)


# ------------------------------------------------------------------------------------------- README
def test_readme_shows_demo_and_test_commands_and_ci_runs_the_test_command():
    readme, ci = _read("README.md"), _read(".ci", "run")
    assert "hf-lwf demo --output_dir" in readme
    test_command = re.search(r"```bash\n(pip install torch==2\.13\.0 .*python -m pytest)\n```", readme).group(1)
    assert test_command in ci


def test_readme_first_screen_has_the_commands_the_api_and_the_answer():
    readme = _read("README.md")
    first_screen = "\n".join(readme.splitlines()[:60])
    for needle in ("hf-lwf demo --output_dir", "python -m pytest", "## Does it help?", "LWFTrainer(model="):
        assert needle in first_screen, needle
    section = readme.split("## Does it help?", 1)[1].split("\n## ", 1)[0].strip()
    assert len(section.splitlines()) <= 5 and "docs/results.md" in section


def test_method_doc_lists_every_logged_metric():
    import inspect

    import hf_lwf.run as run

    metrics = set(re.findall(r'"(lwf/[a-z_]+)"', inspect.getsource(run)))
    doc = _read("docs", "method.md")
    for metric in metrics:
        family = metric.rsplit("_", 1)[0] if metric.startswith("lwf/confidence_") else metric
        assert family in doc, metric


# -------------------------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens; emphasis marks
    go, an underscore inside a code span stays."""
    parts = re.split(r"(`[^`]*`)", heading.strip().lower())
    text = "".join(part.strip("`") if part.startswith("`") else re.sub(r"[*_]", "", part) for part in parts)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def test_slug_matches_github_anchors():
    assert _slug("1. sst5 × dental: no effect on the learning task") == "1-sst5--dental-no-effect-on-the-learning-task"
    assert _slug("Why these defaults") == "why-these-defaults"
    assert _slug("`hf-lwf inspect`") == "hf-lwf-inspect"
    assert _slug("Dose, dev (`configs/sst5_dental_dose.yaml`)") == "dose-dev-configssst5_dental_doseyaml"
    assert _slug("A _quiet_ **bold** word") == "a-quiet-bold-word"


def test_every_relative_link_in_readme_and_docs_resolves():
    checked = 0
    for path in LINKED:
        for target in relative_links(path):
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            assert resolved.exists(), f"{path.relative_to(ROOT)}: broken link {target!r}"
            assert ROOT in resolved.parents or resolved == ROOT, f"{path.relative_to(ROOT)}: {target!r} leaves the repository"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved), f"{path.relative_to(ROOT)}: no heading for {target!r}"
            checked += 1
    assert checked > 50


def test_project_text_names_no_outside_material():
    """The docs speak of the project: no notes outside the repository, no work items."""
    pattern = re.compile(r"EVIDENCE\.md|shared/docs|\.\./shared|/work/|\bissue \d+|\bsessions?\b", re.I)
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "hf_lwf").rglob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.md")),
             *sorted((ROOT / "experiments").glob("*.py")), *sorted((ROOT / "experiments").glob("*.md")),
             *sorted((ROOT / "experiments" / "configs").glob("*.yaml")),
             *sorted((ROOT / "experiments" / "plans").glob("*.md"))]
    for path in texts:
        found = pattern.findall(path.read_text(encoding="utf-8"))
        assert not found, f"{path.relative_to(ROOT)}: {found}"


# ---------------------------------------------------------------------------------- troubleshooting
def _literal_parts(node) -> list[str]:
    """The literal text of a message expression, split where a value is formatted into it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        parts, current = [], ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                current += value.value
            else:
                parts.append(current)
                current = ""
        return parts + [current]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_parts(node.left), _literal_parts(node.right)
        if left and right:
            return left[:-1] + [left[-1] + right[0]] + right[1:]
        return left + right
    return []


def _normalise(text: str) -> str:
    """Words only: case, quotes, backticks and punctuation do not matter when a message is quoted."""
    return " ".join(re.sub(r"[^\w]+", " ", text.lower().replace("'", "")).split())


def message_keys() -> dict[str, str]:
    """For every error, warning and validation message in hf_lwf/: the first words of its longest literal part."""
    keys = {}
    for path in sorted((ROOT / "hf_lwf").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        messages = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                messages.append((node.lineno, node.exc.args[0]))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warning"
                  and node.args):
                messages.append((node.lineno, node.args[0]))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "fail" \
                    and len(node.args) == 2:  # LWFConfig's validation helper
                messages.append((node.lineno, node.args[1]))
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("_message"):
                messages += [(n.lineno, n.value) for n in ast.walk(node) if isinstance(n, ast.Return) and n.value]
        for line, expr in messages:
            parts = [_normalise(p) for p in _literal_parts(expr)]
            parts = [p for p in parts if len(p.split()) >= 3]
            if parts:
                keys[f"{path.relative_to(ROOT).as_posix()}:{line}"] = " ".join(max(parts, key=len).split()[:6])
    return keys


def test_message_keys_find_raises_warnings_and_validation():
    keys = message_keys()
    assert len(keys) > 120
    assert any(k.startswith("hf_lwf/config.py") and v == "must be a finite number" for k, v in keys.items())
    assert any(k.startswith("hf_lwf/config.py") and v == "lwf_unlearn_lr only applies to lwf_unlearn_optimizer sgd"
               for k, v in keys.items())
    assert any(k.startswith("hf_lwf/run.py") and "stops here" in v for k, v in keys.items())  # _failure_message


def test_troubleshooting_explains_every_message():
    doc = _normalise(_read("docs", "troubleshooting.md"))
    missing = {where: key for where, key in message_keys().items() if key not in doc}
    assert not missing, f"messages not in docs/troubleshooting.md: {missing}"


# -------------------------------------------------------------------------------------------- demo
def demo_table(report: dict) -> str:
    """The README's demo table, from the demo's report.json."""
    results, lwf = report["results"], report["lwf_summary"]

    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    rows = [
        (f"learning task: exact match, {report['data']['eval_examples']} held-out problems", "exact_match", ".3f"),
        (f"forgetting task: perplexity of {report['data']['heldout_texts']} held-out base-model answers",
         "forget_perplexity", ".2f"),
        ("final training loss", "final_train_loss", ".4f"),
    ]
    lines = ["| | base model | fine-tuning | fine-tuning with LWF |", "|---|---|---|---|"]
    for title, key, fmt in rows:
        lines.append(f"| {title} | " + " | ".join(cell(results[run][key], fmt) for run in ("base", "vanilla", "lwf"))
                     + " |")
    sizes = lwf["self_data_sizes"]
    lines += ["", f"LWF sampled {sum(sizes.values())} of the model's own answers to forgetting prompts ("
              + ", ".join(f"{task} {n}" for task, n in sizes.items())
              + f"), selected {len(lwf['forget_indices'])} of them and\nunlearned {len(lwf['unlearned'])} in "
              f"{lwf['unlearn_steps']} ascent steps at {lwf['unlearn_points']} unlearning points."]
    return "\n".join(lines)


def test_readme_demo_table_matches_its_artifact():
    report = json.loads(DEMO_REPORT.read_text(encoding="utf-8"))
    assert demo_table(report) in _read("README.md")


def test_demo_artifact_is_the_report_of_the_readme_command():
    import dataclasses
    import shlex

    from hf_lwf.app.cli import demo_parser, parse_command
    from hf_lwf.app.demo import demo_defaults

    readme = _read("README.md")
    command = next(c for c in re.findall(r"&& (hf-lwf demo [^\n]*)", readme))
    argv = shlex.split(command)[2:]
    demo_args, training_args = parse_command(demo_parser(), argv, defaults=lambda user: demo_defaults(bool(user.get("quick"))))
    report = json.loads(DEMO_REPORT.read_text(encoding="utf-8"))
    assert report["command"] == "demo" and report["demo"] == dataclasses.asdict(demo_args)
    recorded = report["training_args"]
    assert recorded["output_dir"] == os.path.join(training_args.output_dir, "lwf")
    for name in ("max_steps", "per_device_train_batch_size", "learning_rate", "seed", "lwf_unlearn_every",
                 "lwf_max_new_tokens", "lwf_samples_per_prompt", "lwf_forget_ratio", "lwf_unlearn_optimizer"):
        assert recorded[name] == getattr(training_args, name), name
