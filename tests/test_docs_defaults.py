"""The defaults and signatures the docs quote are the code's: docs/training.md's options table
gives ``hpckfac train``'s defaults, ``KFACPreconditioner`` and ``KFACEngine`` take theirs from
``hpckfac.torch.options.DEFAULTS`` (whose values docs/preconditioner.md's table gives, checked in
test_preconditioner.py), and docs/curvature.md's table of blocks gives each block's constructor."""
import ast
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _value(text: str):
    """A default as the docs write it: a number or a name (``none`` for None)."""
    text = re.sub(r"\s*\(.*\)$", "", text.strip().strip("`"))  # "0 (never)"
    if text == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def test_training_options_table_gives_the_parsers_defaults():
    from hpckfac.train.cli import build_parser
    from hpckfac.train.config import DEFAULT_LR

    defaults = {flag: action.default for action in build_parser()._actions for flag in action.option_strings}
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    table = re.search(r"## Options\n\n(.*?)\n\n", text, re.S).group(1)
    # Defaults the table says in words, as the parser has them.
    words = {"--lr": (", ".join(f"{name} {rate}" for name, rate in DEFAULT_LR.items()), None),
             "--data": ("embedded digits", None)}
    problems, compared = [], 0
    for row in table.splitlines()[2:]:
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
        flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", cells[0])
        documented = cells[1]
        if flags[0] in words:
            said, value = words[flags[0]]
            if documented != said or defaults[flags[0]] != value:
                problems.append(f"{flags[0]}: the table says {documented!r}, the parser {defaults[flags[0]]!r}")
            compared += 1
            continue
        if flags == ["--epochs", "--steps"]:  # "10 epochs": --steps unset
            values = [_value(documented.removesuffix(" epochs")), None]
        else:
            values = [_value(part) for part in documented.split(", ")] if len(flags) > 1 else [_value(documented)]
        if len(values) != len(flags):
            problems.append(f"{cells[0]}: {documented!r} is not one default per option")
            continue
        for flag, value in zip(flags, values):
            if defaults[flag] != value:
                problems.append(f"{flag}: the table says {value!r}, the parser {defaults[flag]!r}")
            compared += 1
    assert not problems, problems
    assert compared >= 25


@pytest.mark.parametrize("cls", ["hpckfac.torch.KFACPreconditioner", "hpckfac.stages.engine.KFACEngine"])
def test_constructors_take_the_shared_defaults(cls):
    import importlib

    from hpckfac.torch.options import DEFAULTS

    module, name = cls.rsplit(".", 1)
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    differ = {p: (parameters[p].default, DEFAULTS[p]) for p in parameters
              if p in DEFAULTS and parameters[p].default != DEFAULTS[p]}
    assert not differ, differ
    if name == "KFACPreconditioner":
        assert set(DEFAULTS) <= set(parameters), sorted(set(DEFAULTS) - set(parameters))


def test_curvature_block_table_gives_each_constructor():
    import hpckfac.layers

    text = (ROOT / "docs" / "curvature.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+Block)` \| [^|]* \| `\((.*?)\)` \|", text, re.M)
    assert {name for name, _ in rows} == {name for name in hpckfac.layers.__all__
                                          if name.endswith("Block") and name not in ("CurvatureBlock", "KronBlock",
                                                                                    "UnitWiseBlock", "SpatialKronBlock")}
    problems = []
    for name, documented in rows:
        parameters = list(inspect.signature(getattr(hpckfac.layers, name)).parameters.values())
        actual = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                           for p in parameters)
        if actual != documented:
            problems.append(f"{name}: docs/curvature.md says ({documented}), the code takes ({actual})")
    assert not problems, problems


def test_the_shared_defaults_pass_their_own_checks():
    """``check_options(**DEFAULTS)`` accepts every default as it is (``bucket_bytes=None`` was refused)."""
    from hpckfac.torch.options import DEFAULTS, check_options

    assert check_options(**DEFAULTS) == DEFAULTS
