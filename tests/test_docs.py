"""The README stays true: generated field table, the two newcomer commands, and documented metrics."""

import os
import re

from hf_lwf.config import fields_markdown_table, lwf_fields


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as handle:
        return handle.read()


def test_readme_field_table_is_generated_from_the_dataclass():
    assert fields_markdown_table() in _read("README.md")


def test_every_field_has_help_text():
    for field in lwf_fields():
        assert field.metadata.get("help"), field.name


def test_readme_shows_demo_and_test_commands_and_ci_runs_the_test_command():
    readme, ci = _read("README.md"), _read(".ci", "run")
    assert "hf-lwf demo --output_dir" in readme
    test_command = re.search(r"```bash\n(pip install torch==2\.13\.0 .*python -m pytest)\n```", readme).group(1)
    assert test_command in ci


def test_method_doc_lists_every_logged_metric():
    import inspect

    import hf_lwf.run as run

    metrics = set(re.findall(r'"(lwf/[a-z_]+)"', inspect.getsource(run)))
    doc = _read("docs", "method.md")
    for metric in metrics:
        family = metric.rsplit("_", 1)[0] if metric.startswith("lwf/confidence_") else metric
        assert family in doc, metric
