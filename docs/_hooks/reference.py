"""mkdocs hook: writes the two reference pages that are made from the code, at every build.

- reference/cli.md, from the parsers of `vitrail COMMAND` (`vitrail.cli.build_parser`): each command's description
  and every flag with its default and help. train, pretrain and evaluate read transformers dataclasses
  (`HfArgumentParser`): their own flags are listed, and the TrainingArguments they accept are named with a link.
- reference/config-fields.md, from `VitrailConfig`: every dataclass field with its type, default and the meaning
  its docstring gives. A field the docstring does not describe, or a description of no field, fails the build.

Neither page exists in docs/: mkdocs.yml names them in the nav and this hook adds them (mkdocs 1.6
`File.generated`), so they cannot go stale. Page text can also be produced without mkdocs: `cli_page()`,
`config_fields_page()` (tests/test_docs.py checks them).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing

TRAINING_ARGUMENTS_URL = (
    "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
)
CLI_PAGE = "reference/cli.md"
CONFIG_FIELDS_PAGE = "reference/config-fields.md"


class DocsError(Exception):
    """The code does not give what a generated page needs (a field without a description, ...)."""


# ---- shared ------------------------------------------------------------------------------------------------------


def type_name(annotation) -> str:
    """`int | None`, `list[str]`, `Literal['a', 'b']`: an annotation as a reader writes it (a string annotation,
    from `from __future__ import annotations`, is already that)."""
    if isinstance(annotation, str):
        return annotation.replace("typing.", "")
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(arg) for arg in args)}]"
    return str(annotation).replace("typing.", "")


def escape_html(text: str) -> str:
    """`<dir>/<class>` outside code spans as text, not as HTML tags."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(
        part if part.startswith("`") else part.replace("<", "&lt;").replace(">", "&gt;") for part in parts
    )


def cell(text: str) -> str:
    """Text for one cell of a Markdown table: one line, pipes escaped, no HTML. Inside a code span an escaped pipe
    would show its backslash, so a union type there reads `int or None`."""
    parts = re.split(r"(`[^`]*`)", escape_html(" ".join(str(text).split())))
    return "".join(
        part.replace(" | ", " or ").replace("|", " or ") if part.startswith("`") else part.replace("|", "\\|")
        for part in parts
    )


def code(value) -> str:
    return f"`{value}`"


# ---- reference/config-fields.md --------------------------------------------------------------------------------

# An entry of the docstring's `Args:` section: `name (`type`, defaults to X): meaning`, continued on deeper lines.
ARG_ENTRY = re.compile(r"^    (\w+) \(([^)]*(?:\([^)]*\)[^)]*)*)\):\s*(.*)$")


def docstring_fields(docstring: str) -> dict[str, str]:
    """The `Args:` section of a Google-style docstring (as transformers writes them): name -> meaning."""
    lines = inspect.cleandoc(docstring).splitlines()
    if "Args:" not in lines:
        raise DocsError("the docstring has no `Args:` section")
    described: dict[str, str] = {}
    name = None
    for line in lines[lines.index("Args:") + 1 :]:
        if line and not line.startswith(" "):  # the next section (`Example:`)
            break
        if match := ARG_ENTRY.match(line):
            name = match.group(1)
            if name in described:
                raise DocsError(f"the docstring describes {name!r} twice")
            described[name] = match.group(3)
        elif line.startswith("        ") and name is not None:
            described[name] += " " + line.strip()
        elif line.strip():
            raise DocsError(f"cannot read this line of the `Args:` section: {line.strip()!r}")
    return described


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def config_fields_page() -> str:
    """Every field of VitrailConfig, its type, default and meaning; fails naming any field without a meaning."""
    from transformers import PreTrainedConfig

    from vitrail import VitrailConfig

    described = docstring_fields(VitrailConfig.__doc__)
    # `_out_features` / `_out_indices` are stored privately and read through the `out_features` property.
    fields = {field.name.lstrip("_"): field for field in dataclasses.fields(VitrailConfig)}
    missing, stale = sorted(fields.keys() - described.keys()), sorted(described.keys() - fields.keys())
    if missing or stale:
        raise DocsError(
            "VitrailConfig's docstring (src/vitrail/configuration_vitrail.py, `Args:`) "
            + "; ".join(
                part
                for part in (
                    f"does not describe the fields {', '.join(missing)}: add a line for each"
                    if missing
                    else "",
                    f"describes {', '.join(stale)}, which are not fields: remove them" if stale else "",
                )
                if part
            )
        )
    common = {field.name for field in dataclasses.fields(PreTrainedConfig)}

    def table(names: list[str]) -> list[str]:
        # Two columns: the name with its type and default on the line below, then the meaning (wide enough to read).
        rows = ["| Field | Meaning |", "|---|---|"]
        for name in names:
            field = fields[name]
            meaning = re.sub(r"^\(`[^`]*`[^)]*\):\s*", "", described[name])
            rows.append(
                f'| <span id="{name}"></span>`{name}`<br>{cell(code(type_name(field.type)))}, '
                f"default {cell(code(repr(_default(field))))} | {cell(meaning)} |"
            )
        return rows

    own = [name for name, field in fields.items() if field.name not in common]
    inherited = [name for name, field in fields.items() if field.name in common]
    lines = [
        "# Config fields",
        "",
        f"Every field of `VitrailConfig`, {len(fields)} in all, as `config.json` stores them. This page is made"
        " from the code at each build of the documentation: the types and defaults are the dataclass's, the"
        " meanings its docstring's. [Configuration](configuration.md) explains the variants and how the options"
        " fit together.",
        "",
        "Every field can be passed to `VitrailConfig(...)`, to `VitrailConfig.from_variant(name, ...)`, and to"
        " `from_pretrained(..., name=value)`; `vitrail train --config_overrides name=value,...` sets them from the"
        " command line. Wrong types and values are refused when the config is built, naming the field.",
        "",
        f"## vitrail's fields ({len(own)})",
        "",
        *table(own),
        "",
        f"## Fields of every transformers config ({len(inherited)})",
        "",
        "These come from transformers' `PreTrainedConfig`; vitrail reads them as every transformers model does.",
        "",
        *table(inherited),
        "",
    ]
    return "\n".join(lines)


# ---- reference/cli.md ----------------------------------------------------------------------------------------


def description_markdown(text: str) -> str:
    """A command's description (its job's docstring) as Markdown: command lines (indented, or starting with
    `vitrail `; a trailing backslash continues one) become shell blocks, the rest stays as written."""
    out: list[str] = []
    in_block = False
    for line in text.splitlines():
        continued = in_block and out[-1].rstrip().endswith("\\")
        is_command = line.startswith("    ") or line.startswith("vitrail ") or continued
        if is_command and line.strip():
            if not in_block:
                if out and out[-1].strip():
                    out.append("")
                out.append("```bash")
                in_block = True
            out.append(line[4:] if line.startswith("    ") else line)
            continue
        if in_block and not line.strip():
            continue  # a blank line inside a group of commands
        if in_block:
            out += ["```", ""]
            in_block = False
        out.append(escape_html(line))
    if in_block:
        out.append("```")
    return "\n".join(out).strip()


def _flag_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0:
        return ""
    return code(action.default)


def _argument_rows(arguments: list[argparse.Action]) -> list[str]:
    rows = ["| Argument | Default | Meaning |", "|---|---|---|"]
    for action in arguments:
        if action.dest == "help":
            continue
        if action.option_strings:
            value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            name = ", ".join(code(option + value) for option in action.option_strings)
        else:
            name = code(action.metavar or action.dest)
        if not action.help:
            raise DocsError(f"{name} has no help text: give its add_argument a help= in src/vitrail/cli.py")
        meaning = action.help
        if action.choices:
            meaning += f" One of: {', '.join(code(choice) for choice in action.choices)}."
        if action.nargs in ("+", "*"):
            meaning += " (one or more)" if action.nargs == "+" else " (any number)"
        rows.append(f"| {cell(name)} | {cell(_flag_default(action))} | {cell(meaning)} |")
    return rows


def _field_rows(fields: list[dataclasses.Field]) -> list[str]:
    rows = ["| Flag | Type | Default | Meaning |", "|---|---|---|---|"]
    for field in fields:
        if not field.metadata.get("help"):
            raise DocsError(f"--{field.name} has no help text: give its field a metadata={{'help': ...}}")
        default = _default(field)
        shown = (
            "required" if default is dataclasses.MISSING else ("" if default is None else code(repr(default)))
        )
        rows.append(
            f"| {code('--' + field.name)} | {cell(code(type_name(field.type)))} | {cell(shown)} "
            f"| {cell(field.metadata['help'])} |"
        )
    return rows


def _dataclass_sections(parser) -> list[str]:
    from transformers import TrainingArguments

    transformers_fields = {field.name for field in dataclasses.fields(TrainingArguments) if field.init}
    lines: list[str] = []
    for kind in parser.dataclass_types:
        fields = [field for field in dataclasses.fields(kind) if field.init]
        if issubclass(kind, TrainingArguments):
            # The subclass's own annotations: flags it adds, and TrainingArguments flags it gives another default.
            own = [field for field in fields if field.name in kind.__dict__.get("__annotations__", {})]
            accepted = sorted(
                field.name for field in fields if field in own or field.name in transformers_fields
            )
            accepted = [name for name in accepted if name not in {field.name for field in own}]
            lines += [
                "",
                f"**Training ({kind.__name__})**: the flags vitrail adds to transformers' TrainingArguments, or"
                " gives another default:",
                "",
                *_field_rows(own),
                "",
                f"Every flag of transformers' [`TrainingArguments`]({TRAINING_ARGUMENTS_URL}) is accepted too, "
                "with its transformers default and meaning (booleans take `true`/`false` or no value): "
                + ", ".join(code("--" + name) for name in accepted)
                + ".",
                "{: .flag-list }",  # attr_list: the flags in this paragraph are not broken at their hyphens
            ]
        else:
            lines += ["", f"**{kind.__name__}**:", "", *_field_rows(fields)]
    return lines


def cli_page() -> str:
    """Every `vitrail` command, its description, arguments and defaults, from the parsers the commands use."""
    from vitrail.cli import COMMANDS, build_parser

    lines = [
        "# Command-line reference",
        "",
        "`vitrail COMMAND [flags]` (also `python -m vitrail COMMAND`) runs one job; `vitrail COMMAND --help` prints"
        " what this page shows for COMMAND, and `vitrail --version` the version. This page is made from the"
        " commands' own parsers at each build of the documentation; the [command-line guide](../guides/"
        "command-line.md) shows them at work.",
        "",
        "| Command | What it does |",
        "|---|---|",
        *(
            f"| [`{name}`](#vitrail-{name}) | {cell(inspect.getdoc(job).splitlines()[0])} |"
            for name, job in COMMANDS.items()
        ),
        "",
        "Exit status: 0 when the job succeeded, 1 when it failed (or an extra it needs is not installed: the"
        " message gives the `pip install` line), 2 for flags the command does not take.",
    ]
    for name, job in COMMANDS.items():
        parser = build_parser(name)
        summary, _, rest = inspect.getdoc(job).partition("\n")
        lines += ["", f"## vitrail {name}", "", summary.strip(), "", description_markdown(rest)]
        if hasattr(parser, "dataclass_types"):
            lines += _dataclass_sections(parser)
        else:
            lines += ["", *_argument_rows(parser.arguments)]
    return "\n".join(lines) + "\n"


# ---- mkdocs hook -------------------------------------------------------------------------------------------------


def on_files(files, config):
    """Adds the generated pages to the build; an error in the code they come from stops it, naming it."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    for path, make in ((CLI_PAGE, cli_page), (CONFIG_FIELDS_PAGE, config_fields_page)):
        try:
            content = make()
        except DocsError as error:
            raise PluginError(f"{path}: {error}") from error
        existing = files.get_file_from_path(path)
        if existing is not None:
            raise PluginError(f"docs/{path} is generated at build time: delete the file in docs/")
        files.append(File.generated(config, path, content=content))
    return files
