"""Every helper of a stage script is a unit you can lift out (STYLE.md, point 11): a module-level function
reads no module-level name that is (re)bound after its definition, such as a variable of the training loop.
Names bound before it (imports, settings, set-up) and other functions are fine: they exist, with their
final meaning, wherever the function is called from. A static check of the source, no run."""

import ast
import os

import pytest

from helpers import ROOT

STAGES = ["grpo_expert.py", "merge.py", "sft_init.py", "opd.py", "evaluate.py"]


def bound_names(node):
    """Names that a module-level statement binds (assignments, loop targets, with-as, imports, defs)."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n is node:
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
    return names


def late_reads(source):
    """(function, name, line) for each module-level name a module-level function reads that is bound at
    module level after the function's definition."""
    tree = ast.parse(source)
    body = tree.body
    found = []
    for k, stmt in enumerate(body):
        if not isinstance(stmt, ast.FunctionDef):
            continue
        local = {a.arg for a in ast.walk(stmt.args) if isinstance(a, ast.arg)}
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                local.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.Lambda)) and n is not stmt:  # a closure: its name, its arguments
                local.update([n.name] if isinstance(n, ast.FunctionDef) else [])
                local.update(a.arg for a in ast.walk(n.args) if isinstance(a, ast.arg))
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                local.difference_update(n.names)
        before = set().union(*(bound_names(s) for s in body[:k])) if k else set()
        later = set().union(*(bound_names(s) for s in body[k + 1:] if not isinstance(s, ast.FunctionDef)))
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in local and n.id in later:
                found.append((stmt.name, n.id, n.lineno, n.id in before))
    return found


@pytest.mark.parametrize("script", STAGES)
def test_no_helper_reads_a_name_bound_after_it(script):
    with open(os.path.join(ROOT, script)) as f:
        found = late_reads(f.read())
    assert not found, f"{script}: helpers read names bound after them (function, name, line, also bound before): {found}"


def test_the_check_catches_a_helper_that_reads_the_loop():
    source = "import torch\nSTEP = 1\n\ndef f(x):\n    return x + latents + STEP\n\nfor e in range(2):\n    latents = e\n"
    assert [(f, n) for f, n, _, _ in late_reads(source)] == [("f", "latents")]
    assert late_reads("A = 1\n\ndef f():\n    return A + g()\n\ndef g():\n    return 2\n") == []
