"""The documentation holds together: every relative link of README.md, BENCHMARKS.md, TESTING.md and docs/*.md
points to a file that exists, every #anchor to a heading of its page (by the slug rule mkdocs uses), and the site
builds with `mkdocs build --strict` (a broken nav entry, link or anchor there is an error).

    pytest -q tests/test_docs.py      # a few seconds
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import markdown

from evertrain import cli

ROOT = Path(__file__).resolve().parent.parent
# The extensions of mkdocs.yml that change what is a heading or a link (superfences: a fence inside a list).
EXTENSIONS = ["toc", "tables", "attr_list", "admonition", "pymdownx.superfences"]


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "TESTING.md", *sorted((ROOT / "docs").glob("*.md"))]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.found.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.found.append(attrs["src"])


def render(path: Path) -> tuple[set[str], list[str]]:
    """The page's heading ids (as mkdocs makes them: Python-Markdown's toc slugify) and the links it renders
    (a link inside code is text, not a link)."""
    md = markdown.Markdown(extensions=EXTENSIONS)
    html = md.convert(path.read_text(encoding="utf-8"))

    def ids(tokens):
        for t in tokens:
            yield t["id"]
            yield from ids(t["children"])

    parser = Links()
    parser.feed(html)
    return set(ids(md.toc_tokens)), parser.found


def broken_links(files: list[Path]) -> list[str]:
    """Every relative link among `files` that points nowhere: a missing file, or an anchor its page lacks."""
    anchors: dict[Path, set[str]] = {}

    def anchors_of(page: Path) -> set[str]:
        if page not in anchors:
            anchors[page] = render(page)[0]
        return anchors[page]

    problems = []
    for page in files:
        for link in render(page)[1]:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                continue  # a web address: not this repository's to check
            where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name}: {link}"
            if parts.path.startswith("/"):
                problems.append(f"{where}: an absolute path (use a relative link)")
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.exists():
                problems.append(f"{where}: no such file {target}")
            elif parts.fragment and (target.suffix != ".md" or parts.fragment not in anchors_of(target)):
                problems.append(f"{where}: no heading #{parts.fragment} in {target.name}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    assert (ROOT / "docs" / "dashboard.png").stat().st_size > 20_000  # the README's picture of the page
    assert broken_links(pages()) == []


def test_a_missing_file_or_heading_is_reported(tmp_path):
    """The check above can fail: a link to a missing page, a missing heading, and a heading of another page."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## The gate: rollback, retry\n\n"
                                            "[ok](#the-gate-rollback-retry) [ok](b.md#b) [gone](c.md) "
                                            "[bad](#the-gate) [bad](b.md#nothing) `[in code](c.md)`\n\n"
                                            "```\n[in a fence](c.md)\n```\n")
    (tmp_path / "docs" / "b.md").write_text("# B\n")
    problems = broken_links([tmp_path / "docs" / "a.md"])
    assert [p.split(": ", 1)[1] for p in problems] == [f"c.md: no such file {tmp_path / 'docs' / 'c.md'}",
                                                      "#the-gate: no heading #the-gate in a.md",
                                                      "b.md#nothing: no heading #nothing in b.md"]


def test_the_site_builds_with_no_warning(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists() and (site / "search" / "search_index.json").exists()
    assert (site / "root" / "BENCHMARKS" / "index.html").exists() and (site / "dashboard.png").exists()


def test_every_setting_is_on_the_options_page():
    """Each field of TrainConfig (an option of `train` and `init`, a key of [train]) has its row in
    docs/options.md: a setting added without its documentation fails here."""
    import dataclasses

    from evertrain.config import TrainConfig

    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name.replace('_', '-')}`" not in page]
    assert not missing, f"settings without a row in docs/options.md: {missing}"


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main([*argv, "--help"])
    return out.getvalue()


def test_every_option_of_every_command_is_on_the_options_page():
    """Each option `evertrain CMD --help` lists is on docs/options.md: as `--name` (with or without its value), as
    its settings key `name_with_underscores` (the daemon's table), or, for `--no-name`, as `--name`."""
    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")

    def documented(option: str) -> bool:
        name = option.removeprefix("--")
        if re.search(rf"`--{re.escape(name)}[` ]", page) or f"`{name.replace('-', '_')}`" in page:
            return True
        return name.startswith("no-") and documented("--" + name[3:])

    commands = re.search(r"\{([a-z,-]+)\}", _help()).group(1).split(",")
    assert {"train", "init", "run", "serve", "export"} <= set(commands)
    missing = {}
    for command in commands:
        options = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]+)", _help(command), re.M)) - {"--help"}
        assert command != "train" or "--learning-rate" in options, "the help's option lines were not parsed"
        if undocumented := sorted(o for o in options if not documented(o)):
            missing[command] = undocumented
    assert not missing, f"options without a mention in docs/options.md: {missing}"
