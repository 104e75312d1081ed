"""The option tables of docs/reference.md (called "the reference" below) agree with the scripts' argparse parsers.

Convention (what the reference must follow for this test to find its tables):
- An option table is a markdown table whose header row starts with `| option |`; its first column
  names one or more options, each in backticks (`--lr`, `--save-every K`, `--conditional`,
  `--label-dropout`), and a column headed `default` gives their defaults, separated by commas when
  the row names several options.
- A table belongs to the script named (as `training.py`, `sampling.py`, ...) in the nearest heading
  above it that encloses it: the heading just above the table or, if that names no script, its
  parent heading, and so on. Headings inside fenced code blocks are ignored.

Checked for each script (training, sampling, evaluate, visualize, benchmark), against `build_parser()`:
- the reference has an option table for it (the handful of options most runs need: the reference points to
  `--help` for the rest);
- every option in the script's tables is an option of its parser, named once;
- every choice of an option with `choices` is named, in backticks, somewhere in its row, unless the
  row refers to another script's table ("as for sampling.py", "as training.py");
- a default cell that is a plain literal (a number such as 1e-3, or one word in backticks such as
  `linear` or `5,10,20,50`) equals the parser's default, when that default is not None. Cells that
  describe a rule ("by image size", "50 for `ddim`, 20 for ...", "off", "the checkpoint's") are not
  compared. training.py's parser has no defaults of its own (argument_default=None, so that --resume
  can tell which options were given); for it, and any script like it, the default is read from the
  module's DEFAULTS dict, keyed by the option's dest.
"""
import argparse
import importlib
import math
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFERENCE = os.path.join(ROOT, "docs", "reference.md")
SCRIPTS = ("training", "sampling", "distill", "evaluate", "visualize", "benchmark", "export")
SCRIPT_NAME = re.compile(r"\b(" + "|".join(SCRIPTS) + r")\.py\b")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
OPTION = re.compile(r"`(--?[A-Za-z0-9][A-Za-z0-9-]*)")      # the option at the start of a backtick span
NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
WORD = re.compile(r"^`([^`\s]+)`$")
CODE = re.compile(r"`([^`]+)`")
REFERS = re.compile(r"\bas (for )?(" + "|".join(SCRIPTS) + r")\.py\b")


def split_cells(line):
    """The cells of a markdown table row; '|' inside backticks or escaped as '\\|' does not split."""
    cells, current, in_code, i = [], "", False, 0
    text = line.strip()
    if text.startswith("|"):
        text = text[1:]
    if text.endswith("|") and not text.endswith("\\|"):
        text = text[:-1]
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] == "|":
            current += "|"
            i += 2
            continue
        if c == "`":
            in_code = not in_code
        if c == "|" and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += c
        i += 1
    cells.append(current.strip())
    return cells


def split_outside_backticks(text, sep=","):
    parts, current, in_code = [], "", False
    for c in text:
        if c == "`":
            in_code = not in_code
        if c == sep and not in_code:
            parts.append(current.strip())
            current = ""
        else:
            current += c
    parts.append(current.strip())
    return parts


def reference_tables(path=REFERENCE):
    """[(script or None, heading chain, line number, header cells, rows)] for every option table."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    tables, headings, in_fence, i = [], [], False, 0     # headings: the stack of enclosing (level, text)
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            i += 1
            continue
        if in_fence:
            i += 1
            continue
        m = HEADING.match(line)
        if m:
            level = len(m.group(1))
            while headings and headings[-1][0] >= level:
                headings.pop()
            headings.append((level, m.group(2)))
            i += 1
            continue
        if line.lstrip().startswith("|") and split_cells(line)[0].lower() == "option":
            header = [c.lower() for c in split_cells(line)]
            start, rows = i + 1, []
            i += 2                                                  # the header and the --- row
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append((i + 1, split_cells(lines[i])))
                i += 1
            script = None
            for _, text in reversed(headings):                     # the nearest enclosing heading naming a script
                named = set(SCRIPT_NAME.findall(text))
                if named:
                    script = named.pop() if len(named) == 1 else tuple(sorted(named))
                    break
            tables.append((script, [t for _, t in headings], start, header, rows))
            continue
        i += 1
    return tables


def parse_literal(cell):
    """A number (float), a backticked word (str), or None for a cell that describes a rule."""
    cell = cell.strip()
    if NUMBER.match(cell):
        return float(cell)
    m = WORD.match(cell)
    return m.group(1) if m else None


def as_number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def same_default(literal, default):
    """Whether a literal of the reference (float or str) states the parser's default (int, float, str or list)."""
    if isinstance(default, (list, tuple)):
        if isinstance(literal, float) and len(default) == 1:
            return as_number(default[0]) == literal
        return str(literal).replace(" ", "") == ",".join(str(v) for v in default)
    if isinstance(default, (int, float)):
        number = literal if isinstance(literal, float) else as_number(literal)
        return number is not None and math.isclose(number, float(default), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(literal, float):
        number = as_number(default)
        return number is not None and math.isclose(number, literal, rel_tol=1e-12, abs_tol=0.0)
    return os.path.normpath(literal) == os.path.normpath(str(default)) if "/" in literal else literal == str(default)


def show(value):
    return f"{value:g}" if isinstance(value, float) else repr(value)


def parser_options(module):
    """{option string: argparse action} of the module's parser, without -h/--help."""
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser), f"{module.__name__}.build_parser() returned {parser!r}"
    return {s: a for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings}


def effective_default(module, action):
    """The parser's default, or, where it is None, the module's DEFAULTS entry for the option's dest."""
    default = action.default
    if default is None or default is argparse.SUPPRESS:
        defaults = getattr(module, "DEFAULTS", None)
        default = defaults.get(action.dest) if isinstance(defaults, dict) else None
    return None if default is argparse.SUPPRESS else default


def check_script(script, tables):
    """Every disagreement between the script's tables in the reference and its parser, one sentence each."""
    module = importlib.import_module(script)
    options = parser_options(module)
    problems, seen = [], {}
    mine = [t for t in tables if t[0] == f"{script}"]
    if not mine:
        return [f"{script}.py: the reference has no option table under a heading that names {script}.py"]
    for _, _, start, header, rows in mine:
        if "default" not in header:
            problems.append(f"{script}.py: the option table at docs/reference.md line {start} has no 'default' column")
            continue
        col = header.index("default")
        for lineno, cells in rows:
            named = OPTION.findall(cells[0])
            if not named:
                problems.append(f"{script}.py: docs/reference.md line {lineno} names no option in backticks: "
                                f"{cells[0]!r}")
                continue
            for name in named:
                if name in seen:
                    problems.append(f"{script}.py: {name} is in the reference twice (lines {seen[name]} and {lineno})")
                seen.setdefault(name, lineno)
                if name not in options:
                    problems.append(f"{script}.py: docs/reference.md (line {lineno}) lists {name}, which the parser "
                                    f"does not have")
            described = " ".join(cells[1:])
            if not REFERS.search(described):
                mentioned = set(CODE.findall(described))
                for name in named:
                    choices = getattr(options.get(name), "choices", None) or ()
                    missing = [str(c) for c in choices if str(c) not in mentioned]
                    if missing:
                        problems.append(f"{script}.py {name}: the parser accepts {', '.join(missing)}, which the "
                                        f"reference (line {lineno}) does not name in backticks; the parser's choices: "
                                        f"{', '.join(map(str, choices))}")
            cell = cells[col] if col < len(cells) else ""
            parts = split_outside_backticks(cell) if len(named) > 1 else [cell]
            if len(parts) != len(named):
                if len(parts) == 1:
                    parts = parts * len(named)           # one default shared by all the options of the row
                else:
                    if all(parse_literal(p) is not None for p in parts):
                        problems.append(f"{script}.py: docs/reference.md line {lineno} lists {len(named)} options "
                                        f"({', '.join(named)}) but {len(parts)} defaults ({cell!r})")
                    continue
            for name, part in zip(named, parts):
                literal = parse_literal(part)
                if literal is None or name not in options:
                    continue
                default = effective_default(module, options[name])
                if default is None or isinstance(default, bool):
                    continue
                if not same_default(literal, default):
                    problems.append(f"{script}.py {name}: docs/reference.md (line {lineno}) gives the default "
                                    f"{show(literal)}, the parser {show(default)}")
    return problems


def test_every_option_table_belongs_to_one_script():
    tables = reference_tables()
    assert tables, "the reference has no option tables (markdown tables whose header starts with '| option |')"
    bad = [f"docs/reference.md line {start}: under {' > '.join(chain) or 'no heading'}, the nearest enclosing heading "
           f"that names "
           f"a script names {script!r}" for script, chain, start, _, _ in tables if not isinstance(script, str)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_options_match_the_parser(script):
    problems = check_script(script, reference_tables())
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_renamed_option_a_wrong_default_and_a_missing_choice(tmp_path):
    """The checker itself: a reference with an option renamed, a wrong default, or a choice left out, fails."""
    text = open(REFERENCE, encoding="utf-8").read()
    row = "| `--channels` | 32 |"
    choice = "`mnist`, `fashion-mnist`, `cifar10` or `folder`"
    assert row in text and choice in text, "training.py's table changed; update this test's example rows"
    cases = {
        "renamed": (text.replace(row, "| `--width` | 32 |"), "lists --width, which the parser does not have"),
        "default": (text.replace(row, "| `--channels` | 48 |"), "the parser 32"),
        "choice": (text.replace(choice, "`mnist`, `fashion-mnist` or `folder`"), "the parser accepts cifar10"),
    }
    for case, (changed, expected) in cases.items():
        path = tmp_path / f"{case}.md"
        path.write_text(changed, encoding="utf-8")
        problems = "\n".join(check_script("training", reference_tables(str(path))))
        assert expected in problems, f"{case}: {problems or 'no problem found'}"


def test_each_script_section_points_to_its_help_for_every_option():
    text = " ".join(open(REFERENCE, encoding="utf-8").read().split())
    missing = [s for s in ("training", "sampling", "evaluate") if f"All options: `python {s}.py --help`" not in text]
    assert not missing, f"docs/reference.md does not say where all options of {missing} are"


@pytest.mark.parametrize("cell, default, same", [
    ("1e-3", 0.001, True), ("0.9995", 0.9995, True), ("5", 5.0, True), ("20", 20, True), ("0", 0.0, True),
    ("2", 2.5, False), ("`linear`", "linear", True), ("`linear`", "cosine", False),
    ("`default/samples`", os.path.join("default", "samples"), True), ("50", [50], True),
    ("`5,10,20,50`", [5, 10, 20, 50], True), ("`5,10`", [5, 10, 20], False), ("`1e-3`", 0.001, True),
])
def test_default_comparison(cell, default, same):
    assert same_default(parse_literal(cell), default) is same


@pytest.mark.parametrize("cell", ["by image size", "off", "the checkpoint's", "50 for `ddim`, 20 for `dpm++`",
                                  "CPU count (at most 8)", "`sweep.json` beside the checkpoint", ""])
def test_rules_are_not_literals(cell):
    assert parse_literal(cell) is None
