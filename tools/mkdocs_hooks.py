"""mkdocs hooks (mkdocs.yml `hooks:`): the repository's root pages that docs/ links to, inside the built site.

BENCHMARKS.md and TESTING.md live at the repository's root, where the project's rules name them, and docs/*.md
link to them as ../BENCHMARKS.md, a path that resolves on disk and on a forge. A site holds only what is under
docs/, so these hooks add the two files to it as root/NAME.md and point those links there; mkdocs then checks
them like any other link.

    make docs      # = mkdocs build --strict, into site/
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT_PAGES = ("BENCHMARKS.md", "TESTING.md")
LINK = re.compile(r"\]\(\.\./(" + "|".join(re.escape(name) for name in ROOT_PAGES) + r")([#)])")


def on_files(files, config):
    from mkdocs.structure.files import File

    root = Path(config["config_file_path"]).parent
    for name in ROOT_PAGES:
        files.append(File.generated(config, f"root/{name}", abs_src_path=str(root / name)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """A page of docs/ (none is in a sub-folder) links ../NAME.md: in the site, root/NAME.md."""
    return LINK.sub(r"](root/\1\2", markdown)
