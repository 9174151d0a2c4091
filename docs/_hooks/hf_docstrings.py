"""griffe extension for the API pages: docstrings written as transformers writes them, read as Google style.

transformers documents arguments as ``name (`type`, *optional*, defaults to X): meaning`` and links classes as
``[`Name`]``. Google style, which mkdocstrings reads, wants ``name (type): meaning``. Before a docstring is parsed,
each such entry of an `Args:`/`Attributes:` section becomes ``name (type): meaning Defaults to X.``, and the
transformers links plain code (`Name`). The source is not changed; only what the site shows.
"""

from __future__ import annotations

import re

from griffe import Extension, Object

SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes):\s*$")
TRANSFORMERS_LINK = re.compile(r"\[(`[^`\]]+`)\](?![\[(])")


def _split_entry(line: str) -> tuple[str, str, str] | None:
    """`(head, inside, rest)` of `head (inside):rest`, the parentheses balanced (outside backticks); None if the
    line is not an entry with a type in backticks."""
    match = re.match(r"^(\s*[\w*]+(?:, [\w*]+)*) \(`", line)
    if match is None:
        return None
    start = match.end(1) + 2
    depth, quoted = 1, False
    for index in range(start, len(line)):
        char = line[index]
        if char == "`":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
            if depth == 0:
                if line[index + 1 : index + 2] != ":":
                    return None
                return match.group(1), line[start:index], line[index + 2 :]
    return None


def _top_level_parts(text: str) -> list[str]:
    """`text` split at the commas outside backticks and brackets."""
    parts, depth, quoted, current = [], 0, False, ""
    for char in text:
        if char == "`":
            quoted = not quoted
        elif not quoted and char in "([{":
            depth += 1
        elif not quoted and char in ")]}":
            depth -= 1
        if char == "," and not quoted and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()] if current.strip() else parts


def google_entry(line: str) -> tuple[str, str | None]:
    """One transformers-style argument line as Google style, and the default it named (other lines unchanged)."""
    split = _split_entry(line)
    if split is None:
        return line, None
    head, inside, rest = split
    kinds, default = [], None
    for part in _top_level_parts(inside):
        if part.startswith("defaults to "):
            default = part.removeprefix("defaults to ")
        elif part != "*optional*":
            kinds.append(part)
    annotation = ", ".join(kinds).replace("`", "")
    return (f"{head} ({annotation}):{rest}" if annotation else f"{head}:{rest}"), default


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def google_style(docstring: str) -> str:
    """`docstring` with its argument sections in Google style; a default goes after the entry's description."""
    lines = TRANSFORMERS_LINK.sub(r"\1", docstring).splitlines()
    section_indent = None
    entry = None  # (index of the entry's last line, its indent, its default)
    for index, line in enumerate(lines):
        if entry is not None and line.strip() and _indent(line) <= entry[1]:
            _close(lines, entry)
            entry = None
        if match := SECTION.match(line):
            section_indent = len(match.group(1))
            continue
        if line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None  # the section ended
        if section_indent is None:
            continue
        if entry is not None and line.strip():
            entry = (index, entry[1], entry[2])  # a continuation line
            continue
        lines[index], default = google_entry(line)
        if line.strip():
            entry = (index, _indent(line), default)
    if entry is not None:
        _close(lines, entry)
    return "\n".join(lines)


def _close(lines: list[str], entry: tuple[int, int, str | None]) -> None:
    last, _, default = entry
    if default is not None:
        lines[last] = lines[last].rstrip() + (" " if lines[last].rstrip().endswith(".") else ". ")
        lines[last] += f"Defaults to {default}."


class TransformersDocstrings(Extension):
    """Rewrites each object's docstring before mkdocstrings parses it."""

    def on_object(self, *, obj: Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = google_style(obj.docstring.value)
