"""The names the docs cite exist: every dotted ``hpckfac.`` name in README.md, docs/ and
jobs/README.md resolves, every repository path they cite is there, every benchmark and
command-line option of their ``hpckfac train`` and ``hpckfac.bench`` commands exists (and
docs/training.md's options table lists every option of ``hpckfac train``), and the module maps of
docs/design.md ("Layout") and README.md ("Layers of the library") list every module of the
package and none that is not, and the layout every source in kernels/."""
import ast
import contextlib
import importlib
import importlib.util
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hpckfac"
DOCS = [ROOT / "README.md", ROOT / "jobs" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {doc.relative_to(ROOT).as_posix(): doc.read_text(encoding="utf-8") for doc in DOCS}


def _dotted_names():
    names = set()
    for doc, text in TEXTS.items():
        for match in re.finditer(r"\bhpckfac(?:\.[A-Za-z_]\w*)+", text):
            name = match.group(0)
            if not name.endswith((".py", ".md")):  # hpckfac/... paths are checked below
                names.add((doc, name))
    return sorted(names)


def _top_level_names(path: pathlib.Path) -> set[str]:
    """What a module defines at its top level, read from its source (for a module whose import
    needs an optional dependency such as CuPy)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _resolve(name: str) -> str | None:
    """None when ``name`` is a module of the package or an attribute of one, else the problem."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "hpckfac":
                raise
            # An optional dependency is missing (CuPy): look for the first attribute in the source.
            rest = parts[i:]
            if rest and rest[0] not in _top_level_names(pathlib.Path(spec.origin)):
                return f"{module} defines no {rest[0]}"
            return None
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{module} has no attribute {attr}"
            obj = getattr(obj, attr)
        return None
    return "no such module"


@pytest.mark.parametrize("doc,name", _dotted_names())
def test_dotted_names_resolve(doc, name):
    problem = _resolve(name)
    assert problem is None, f"{doc} cites {name}: {problem}"


def test_the_docs_cite_dotted_names():
    assert len(_dotted_names()) > 50


def test_cited_paths_exist():
    path = re.compile(r"(?<![\w/.~-])((?:hpckfac|docs|jobs|tests|examples|kernels)/[\w./*{},-]*[\w*}])")
    missing = []
    for doc, text in TEXTS.items():
        for match in path.finditer(text):
            cited = match.group(1)
            # docs/results/cpu/scaling_{strong,weak}.json names several files
            alternatives = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", cited)
            paths = ([alternatives.group(1) + a + alternatives.group(3) for a in alternatives.group(2).split(",")]
                     if alternatives else [cited])
            for p in paths:
                candidates = [ROOT / p, (ROOT / doc).parent / p]  # from the root, or beside the doc
                if not any(list(ROOT.glob(p)) if "*" in p else c.exists() for c in candidates):
                    missing.append(f"{doc}: {p}")
    assert not missing, missing


def _package_modules() -> dict[str, set[str]]:
    """Module files of each folder of the package, "" for the package itself."""
    folders = {}
    for path in PACKAGE.rglob("*.py"):
        folder = path.parent.relative_to(PACKAGE).as_posix()
        folders.setdefault("" if folder == "." else folder, set()).add(path.name)
    return folders


def _design_layout() -> dict[str, str]:
    """The text of docs/design.md's layout block under each folder of the package."""
    block = re.search(r"## Layout\n\n```\n(.*?)```", TEXTS["docs/design.md"], re.S).group(1)
    sections, current = {}, None
    for line in block.splitlines():
        if line.startswith("hpckfac/"):
            current = ""
        elif line and not line[0].isspace():
            current = None  # kernels/, tests/, ...: outside the package
        elif current is not None and re.match(r"  (\w+)/", line):
            current = re.match(r"  (\w+)/", line).group(1)
        if current is not None:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


def test_design_layout_lists_every_module_and_no_other():
    sections, modules = _design_layout(), _package_modules()
    assert set(sections) == set(modules), "docs/design.md's layout folders differ from the package's"
    benchmarks = importlib.import_module("hpckfac.bench.__main__").BENCHMARKS
    problems = []
    for folder, files in modules.items():
        text = sections[folder]
        named = set(re.findall(r"(?<![\w/.])(\w+\.py)\b", text))
        for name in sorted(files):
            stem = name[:-3]
            if folder and stem in ("__init__", "__main__"):
                continue  # a subpackage's own, named by its folder
            if name not in named and not (folder == "bench" and stem in benchmarks and re.search(rf"\b{stem}\b", text)):
                problems.append(f"hpckfac/{folder + '/' if folder else ''}{name} is not in the layout")
        for name in sorted(named - files):
            problems.append(f"the layout names hpckfac/{folder + '/' if folder else ''}{name}, which does not exist")
    assert not problems, problems


def test_readme_module_table_lists_every_module():
    table = re.search(r"## Layers of the library\n\n(.*?)\n\n", TEXTS["README.md"], re.S).group(1)
    named = set(re.findall(r"`hpckfac\.(\w+)", table))
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    modules -= {"__init__", "__main__"}
    assert named == modules, (sorted(modules - named), sorted(named - modules))


def test_design_layout_lists_every_kernel_source_and_no_other():
    block = re.search(r"## Layout\n\n```\n(.*?)```", TEXTS["docs/design.md"], re.S).group(1)
    entry = re.search(r"^kernels/(.*?)(?=^\S)", block, re.M | re.S).group(1)
    named = set(re.findall(r"(?<![\w/.])(\w+\.(?:cu|cuh|py))\b", entry))
    files = {p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh", ".py")}
    assert named == files, (sorted(files - named), sorted(named - files))


def _long_options(command: str) -> set[str]:
    """The long options that ``hpckfac train`` or ``python -m hpckfac.bench COMMAND`` accept,
    read from its parser's help (each benchmark builds its parser inside its ``main``)."""
    if command == "train":
        from hpckfac.train.cli import build_parser

        text = build_parser().format_help()
    else:
        module = importlib.import_module(f"hpckfac.bench.{command}")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.main(["--help"], prog=f"python -m hpckfac.bench {command}")
        text = out.getvalue()
    return set(re.findall(r"--[a-z][\w-]*", text))


def _commands():
    """(doc, line, command, options) of every ``hpckfac train``, ``hpckfac bench NAME`` and
    ``python -m hpckfac.bench NAME`` the docs give, options up to the end of the line (a
    ``\\``-continued line included), the code span or the table cell."""
    pattern = re.compile(r"\bhpckfac(?: (train)\b|(?:\.| )bench (\w+))((?:[^`|\n\\]|\\\n)*)")
    found = []
    for doc, text in TEXTS.items():
        for match in pattern.finditer(text):
            command = match.group(1) or match.group(2)
            if command in ("NAME", "X"):  # the placeholder of "python -m hpckfac.bench NAME"
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append((doc, line, command, re.findall(r"(?<![\w-])--[a-z][\w-]*", match.group(3))))
    return found


def test_the_docs_commands_name_benchmarks_and_options_that_exist():
    benchmarks = importlib.import_module("hpckfac.bench.__main__").BENCHMARKS
    commands = _commands()
    assert len(commands) > 30
    options, problems = {}, []
    for doc, line, command, flags in commands:
        if command != "train" and command not in benchmarks:
            problems.append(f"{doc}:{line}: no benchmark {command!r}")
            continue
        if command not in options:
            options[command] = _long_options(command)
        problems += [f"{doc}:{line}: {command} has no {flag}" for flag in flags if flag not in options[command]]
    assert not problems, problems


def test_training_options_table_lists_every_option_of_the_parser():
    table = re.search(r"## Options\n\n(.*?)\n\n", TEXTS["docs/training.md"], re.S).group(1)
    named = set(re.findall(r"--[a-z][\w-]*", table))
    assert named == _long_options("train") - {"--help"}


def test_result_files_name_no_path_outside_the_repository():
    """The recorded results stand alone: no file under docs/results cites a path of the machine
    that measured them (a benchmark records where it wrote its JSON; in the repository that is the
    file's own path)."""
    outside = re.compile(r'"(?:/tmp/|/home/|/root/|/work/|/Users/)[^"]*"')
    found = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in sorted((ROOT / "docs" / "results").rglob("*"))
             if path.is_file() and path.suffix in (".json", ".txt", ".log", ".md")
             for match in outside.finditer(path.read_text(encoding="utf-8", errors="replace"))]
    assert not found, found
