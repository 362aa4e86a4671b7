"""The per-sample rules, one module per layer family. Importing a family's module registers its rule; the registry's
order, which :func:`rule_for` follows, is pinned by tests/method/test_persample_rules.py."""

from . import conv1d, embedding, linear, norms, output  # noqa: F401 - each registers its rule
from .base import RULES, Rule, named, register, rule_for


__all__ = ["RULES", "Rule", "named", "register", "rule_for"]
