"""Write mstm.conf(5)'s markdown: the prose of a template, with every setting generated
from the schema in mstm/config/schema.py, so the manual can never disagree with the code.

Usage: PYTHONPATH=cmds python3 man/gen_conf_page.py man/mstm.conf.5.md.in > out.md

The template's line ``@SETTINGS@`` is replaced by one subsection per configuration
section and one definition-list entry per key (type, default and meaning).
"""

from __future__ import annotations

import re
import string
import sys
from pathlib import Path

from mstm.config import GLOBAL_SECTIONS, SCHEMA, Key

PLACEHOLDER = "@SETTINGS@"
_SAYS_DEFAULT = re.compile(r"\(default\b|\bdefault:")

SECTION_INTRO = {
    "global": "The streams and where their files are.",
    "data_stream": "What a stream sends, and when an item is ready.",
    "outgoing": "Where a stream sends to, and how.",
    "incoming": "The receiving side of a stream (mstm-receive(1)).",
    "rsync_ssh": "The programs and the ssh identity of the rsync_ssh transfer protocol.",
    "disk_space_monitor": "Levels of free space for mstm-diskwatch(1).",
    "email": "Where mstm-alert(1) sends alerts.",
    "logging": "Logging and alert batching.",
}


def md(text: str) -> str:
    """Plain text made literal in pandoc markdown (every ASCII punctuation escaped)."""
    return "".join("\\" + c if c in string.punctuation else c for c in text)


def code(text: str) -> str:
    """A code span that may itself contain backticks."""
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if text.strip() else "(empty)"


def entry(name: str, key: Key) -> str:
    doc = md(key.doc)
    if key.refused:
        return f"{code(name)}\n:   Not accepted: {md(key.refused)}.\n"
    if key.ignored:
        return f"{code(name)}\n:   {doc}: accepted and ignored.\n" if "ignored" not in key.doc \
            else f"{code(name)}\n:   {doc}.\n"
    kind = md(key.kind.describe())
    said = key.doc.lower()
    if key.required:
        default = " (required)" if "required" not in said else ""
    elif _SAYS_DEFAULT.search(said) or "required" in said:
        default = ""  # the meaning already says it, in words rather than $(...)
    elif key.default is None:
        default = " (default: none)"
    else:
        default = f" (default: {code(key.default)})"
    return f"{code(name)} = *{kind}*\n:   {doc}.{default}\n"


def settings() -> str:
    out: list[str] = []
    for section, keys in SCHEMA.items():
        where = ("the global file only" if section in GLOBAL_SECTIONS
                 else "the stream file, or the global file for every stream")
        out.append(f"## [{section}]\n")
        intro = SECTION_INTRO.get(section, "")
        out.append(f"{md(intro)}  In {where}.\n" if intro else f"In {where}.\n")
        out.extend(entry(name, key) for name, key in keys.items())
    return "\n".join(out)


def render(template: str) -> str:
    if template.count(PLACEHOLDER) != 1:
        raise SystemExit(f"gen_conf_page: the template must hold {PLACEHOLDER} exactly once")
    return template.replace(PLACEHOLDER, settings().rstrip("\n"))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gen_conf_page.py TEMPLATE", file=sys.stderr)
        return 2
    sys.stdout.write(render(Path(argv[1]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
