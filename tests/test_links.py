"""Every relative link and image of the README and of docs/*.md points to something that exists.

For each markdown file checked, every inline link `[text](target)` and image `![alt](target)`, and every
reference definition `[label]: target`, whose target has no URL scheme (http:, https:, mailto:, ...) must
name an existing file or folder, relative to the markdown file's folder (or to the repository's root when
it starts with `/`). A `#anchor`, alone or after a `.md` file, must be the anchor of a heading of that file
under GitHub's rules (`slug`). Links inside fenced code blocks and inside code spans are not links and are
skipped. Only ATX headings (`## Heading`) are read; the files checked use no other kind.

Pure Python and fast: no torch, nothing run.
"""
import glob
import os
import re
import urllib.parse

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")
INLINE_LINK = re.compile(r"\]\(\s*(<[^>\n]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
LINK_TEXT = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
HTML_TAG = re.compile(r"<[^>]+>")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def slug(heading):
    """The anchor GitHub gives a heading's text, before duplicates are numbered: code spans keep their
    content without the backticks, links and images their text, HTML tags go; then lowercase, every
    character other than a letter, a digit, a space, a hyphen or an underscore removed, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), heading)
    text = LINK_TEXT.sub(lambda m: m.group(1), text)
    text = HTML_TAG.sub("", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def outside_fences(text):
    """(line number, line) of every line that is not inside a fenced code block (nor a fence itself)."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                continue
            yield number, line
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip().strip(fence[0]):
            fence = None


def anchors(text):
    """The anchors of a markdown text's headings, in GitHub's way: the second heading with the same slug
    gets -1, the third -2, ..."""
    seen, result = {}, set()
    for _, line in outside_fences(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2) or "")
        anchor = base
        if base in seen:
            seen[base] += 1
            anchor = f"{base}-{seen[base]}"
        else:
            seen[base] = 0
        while anchor in result:                   # "a-1" written as a heading of its own, then "a" twice
            seen[base] += 1
            anchor = f"{base}-{seen[base]}"
        result.add(anchor)
    return result


def links(text):
    """(line number, target) of every inline link, image and reference definition outside code."""
    for number, line in outside_fences(text):
        plain = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(plain)]
        definition = REFERENCE_DEFINITION.match(plain)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            yield number, target


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def broken_links(path, root=ROOT):
    """One line for each link of the markdown file at `path` that points nowhere: 'file:line: target: why'."""
    text = read(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.relpath(path, root)
    problems = []
    for number, target in links(text):
        if not target or SCHEME.match(target):
            continue
        where, _, anchor = target.partition("#")
        where = urllib.parse.unquote(where)
        if where:
            resolved = os.path.normpath(os.path.join(root, where.lstrip("/")) if where.startswith("/")
                                        else os.path.join(folder, where))
            if not os.path.exists(resolved):
                problems.append(f"{name}:{number}: {target}: no such file or folder")
                continue
        else:
            resolved = os.path.abspath(path)
        if anchor and resolved.endswith(".md") and os.path.isfile(resolved):
            if urllib.parse.unquote(anchor) not in anchors(read(resolved)):
                problems.append(f"{name}:{number}: {target}: no heading of {os.path.relpath(resolved, root)} "
                                f"has the anchor #{anchor}")
    return problems


# ---- the functions themselves ---------------------------------------------------------------------------
@pytest.mark.parametrize("heading, expected", [
    ("5. Faster samplers and guidance", "5-faster-samplers-and-guidance"),
    ("The fitted sampler (`python sampling.py --steps N`)", "the-fitted-sampler-python-samplingpy---steps-n"),
    ("FID during training (--fid-every)", "fid-during-training---fid-every"),
    ("Timestep spacing of DPM-Solver++", "timestep-spacing-of-dpm-solver"),
    ("The test suite's running time", "the-test-suites-running-time"),
    ("Min-SNR-20: the training objective", "min-snr-20-the-training-objective"),
    ("Use it from Python", "use-it-from-python"),
    ("snake_case and [a link](x.md)", "snake_case-and-a-link"),
    ("Fréchet distance", "fréchet-distance"),
])
def test_slug_follows_githubs_rules(heading, expected):
    assert slug(heading) == expected


def test_repeated_headings_are_numbered_and_fenced_ones_ignored():
    text = "# Title\n## Results\n```\n## Results\n```\n## Results\n### Results\n## Other #\n"
    assert anchors(text) == {"title", "results", "results-1", "results-2", "other"}


def test_a_broken_link_and_a_broken_anchor_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "pic.png").write_bytes(b"")
    (tmp_path / "docs" / "other.md").write_text("# Other\n## A section (`--flag`)\n", encoding="utf-8")
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n"
        "[fine](other.md#a-section---flag) ![fine](../pic.png) [here](#page) [web](https://example.com/x#y)\n"
        "[missing](nothere.md) and ![gone](../gone.png)\n"
        "[bad anchor](other.md#a-section) and [bad here](#no-such-heading)\n"
        "`[in code](nothere.md)`\n"
        "```\n[in a fence](nothere.md)\n```\n"
        "[ref]: missing-too.md\n",
        encoding="utf-8")
    problems = broken_links(str(tmp_path / "docs" / "page.md"), root=str(tmp_path))
    reported = [p.split(": ")[1] for p in problems]
    assert reported == ["nothere.md", "../gone.png", "other.md#a-section", "#no-such-heading", "missing-too.md"]
    assert problems[0].endswith(":3: nothere.md: no such file or folder")


# ---- the repository's markdown ---------------------------------------------------------------------------
MARKDOWN = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


@pytest.mark.parametrize("name", MARKDOWN)
def test_every_relative_link_points_to_a_file_and_every_anchor_to_a_heading(name):
    problems = broken_links(os.path.join(ROOT, name))
    assert not problems, f"{len(problems)} broken link(s) in {name}:\n" + "\n".join(problems)
