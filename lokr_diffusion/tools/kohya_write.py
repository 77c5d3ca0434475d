"""Writing an import: this project's TOML, the report, and the option tables of the docs.

`write_import` checks the config with the trainer's own `load_config` before anything is written
(see `_check_with_loader`); `mapping_markdown` renders the tables of docs/coming-from-kohya.md from
the same RULES the importer runs, so the page cannot drift from the code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import ConfigError, OutputError
from .kohya_options import ARGS, CHANGED, DATASET, DROPPED, KOHYA_DEFAULTS, MAPPED, NETWORK, RULES, target_exists

if TYPE_CHECKING:
    from .kohya import KohyaImport


# -- writing --------------------------------------------------------------------------------------

def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def to_toml(doc: Mapping[str, Any], header: str = "") -> str:
    """The config as TOML text: sections in the README's order, then `[data]` and its datasets."""
    lines = [f"# {row}" if row else "#" for row in header.splitlines()]
    for name, table in doc.items():
        if name == "data":
            continue
        lines += ["", f"[{name}]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    data = doc.get("data")
    if data:
        simple = {k: v for k, v in data.items() if k != "datasets"}
        lines += ["", "[data]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in simple.items()]
        for entry in data.get("datasets", []):
            lines += ["", "[[data.datasets]]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else toml_value(value) if value is not None else ""
    return text.replace("|", "\\|").replace("\n", " ")


def format_report(result: KohyaImport) -> str:
    """The report as Markdown: what was read, the family, then one row per option."""
    counts = result.counts()
    rows = ["# kohya import report", "",
            f"Read: {', '.join(result.sources)}.", "",
            f"Family: `{result.family}` ({result.family_reason}).", "",
            f"{counts[MAPPED]} mapped, {counts[CHANGED]} mapped with a changed meaning, {counts[DROPPED]} dropped.",
            "", "| option | from | value | status | written | note |", "|---|---|---|---|---|---|"]
    for line in result.lines:
        written = "<br>".join(f"`{k} = {_cell(v)}`" for k, v in line.targets.items())
        rows.append(f"| `{line.option}` | {_cell(line.origin)} | {_cell(line.value)} | {line.status} | {written} | "
                    f"{_cell(line.note)} |")
    pending = sorted({t for line in result.lines for t in line.pending})
    if pending:
        rows += ["", "Not in this version yet (the options that need them are reported as dropped): "
                 + ", ".join(f"`{t}`" for t in pending) + "."]
    return "\n".join(rows) + "\n"


def _switched_off(value: Any) -> bool:
    """false, empty or 0: how kohya options say "off"."""
    if isinstance(value, str):
        return value.strip().lower() in ("", "false", "0", "0.0")
    return value is False or value == [] or (isinstance(value, (int, float)) and value == 0)


def format_summary(result: KohyaImport, out: Path, report: Path) -> str:
    """What the terminal shows: the changed and dropped options; a dropped option that was set to
    false, 0 or left empty asked for nothing, so it is counted but listed in the report only."""
    counts = result.counts()
    text = [f"wrote {out} (family {result.family}: {result.family_reason})",
            f"report: {report}: {counts[MAPPED]} mapped, {counts[CHANGED]} changed, {counts[DROPPED]} dropped"]
    quiet = 0
    for line in result.lines:
        if line.status == DROPPED and _switched_off(line.value):
            quiet += 1
        elif line.status != MAPPED:
            text.append(f"  {line.status:8} {line.option}: {line.note}")
    if quiet:
        text.append(f"  ({quiet} dropped options were false, 0 or empty, asking for nothing: see the report)")
    for hint in missing_packages(result):
        text.append(f"before training: {hint}")
    return "\n".join(text)


def missing_packages(result: KohyaImport) -> list[str]:
    """What the config needs installed that is not (an optimizer's package), as install hints."""
    import importlib.util

    from ..training.config import OPTIONAL_OPTIMIZERS

    optimizer = result.config.get("train", {}).get("optimizer")
    if optimizer in OPTIONAL_OPTIMIZERS and importlib.util.find_spec(OPTIONAL_OPTIMIZERS[optimizer][0]) is None:
        return [OPTIONAL_OPTIMIZERS[optimizer][1]]
    return []


def _checkable(result: KohyaImport) -> dict[str, Any]:
    """The config as `load_config` can check it on this machine: an optimizer whose package is
    missing here is checked as AdamW (it is installed where the training runs; the summary says so)."""
    doc = {name: dict(table) if isinstance(table, dict) else table for name, table in result.config.items()}
    if missing_packages(result):
        doc["train"]["optimizer"] = "adamw"
    return doc


_REFUSED_KEY = re.compile(r"(?:^|: )(model|network|train|output|sample|logging|validation)\.([a-z_0-9]+)[: ]")


def _check_with_loader(result: KohyaImport, tmp: Path, out: Path) -> None:
    """Load the config with `load_config` until it is accepted. A value the loader refuses under a
    key the import wrote (a kohya value out of this project's range, say) is taken out and its
    option reported with the loader's message; anything else is an error."""
    from ..fileformat import atomic_write_bytes
    from ..training.config import load_config

    for _ in range(len(result.lines) + 1):
        atomic_write_bytes(tmp, to_toml(_checkable(result)).encode("utf-8"))
        try:
            load_config(tmp)
            return
        except ConfigError as exc:
            message = str(exc).replace(f"{tmp}: ", "")
            match = _REFUSED_KEY.search(message)
            target = f"{match.group(1)}.{match.group(2)}" if match else None
            owners = [line for line in result.lines if target in line.targets]
            if not owners or match.group(2) not in result.config.get(match.group(1), {}):
                raise ConfigError(f"the converted config does not load: {out}: {message}") from None
            del result.config[match.group(1)][match.group(2)]
            for line in owners:
                del line.targets[target]
                line.status = CHANGED if line.targets else DROPPED
                line.note = f"refused by this version's config ({message})" + (f"; {line.note}" if line.note else "")
    raise ConfigError(f"the converted config does not load: {out}")


def write_import(result: KohyaImport, out: str | Path, report: str | Path | None = None,
                 overwrite: bool = False) -> tuple[Path, Path]:
    """Write the config and the report, atomically, after `load_config` has accepted the config
    (read from a temporary file beside `out`, so relative paths resolve as they will). Values the
    loader refuses are taken out of `result` and reported (see _check_with_loader)."""
    from ..fileformat import atomic_write_bytes

    out = Path(out)
    report = Path(report) if report is not None else out.with_name(out.stem + "_kohya_report.md")
    if out.suffix != ".toml":
        raise OutputError(f"--out {out}: expected a .toml file name")
    for path in (out, report):
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.import.toml")
    try:
        _check_with_loader(result, tmp, out)
        header = ("converted from kohya sd-scripts by `lokr-diffusion import-kohya`\n"
                  f"read: {', '.join(result.sources)}\nevery option and what became of it: {report.name}")
        atomic_write_bytes(tmp, to_toml(result.config, header).encode("utf-8"))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    atomic_write_bytes(report, format_report(result).encode("utf-8"))
    return out, report


# -- the mapping tables of docs/coming-from-kohya.md ---------------------------------------------

DOCS_START = "<!-- kohya-mapping:start (generated by python -m lokr_diffusion.tools.kohya_write --write-docs) -->"
DOCS_END = "<!-- kohya-mapping:end -->"
_DOC_SECTIONS = ((ARGS, "Training options (`--config_file` TOML or the command line)"),
                 (DATASET, "Dataset options (`dataset_config.toml`; most are also command-line options)"),
                 (NETWORK, "`network_args` (LyCORIS and kohya LoRA)"))
_SPECIAL_TARGETS = {"network": "each item, see `network_args` below", "data": "`[[data.datasets]]`, one per subset"}


def mapping_markdown() -> str:
    """The option tables, made from RULES and KOHYA_DEFAULTS; a target this version lacks is marked."""
    out: list[str] = []
    for source, title in _DOC_SECTIONS:
        out += [f"#### {title}", "", "| kohya option | status | here | note |", "|---|---|---|---|"]
        for rule in sorted((r for r in RULES if r.source == source), key=lambda r: r.option):
            target = _SPECIAL_TARGETS.get(rule.target or "", f"`{rule.target}`" if rule.target else "")
            note = rule.note
            if rule.target and rule.target not in _SPECIAL_TARGETS and not target_exists(rule.target):
                note = f"needs `{rule.target}`, not in this version yet" + (f"; {note}" if note else "")
            out.append(f"| `{rule.option}` | {rule.status} | {target} | {_cell(note)} |")
        out.append("")
    out += ["#### kohya defaults written out", "",
            "When the kohya setup leaves these unset, kohya's default is written, because this project's differs:",
            "", "| kohya option | written | why |", "|---|---|---|"]
    for option, (target, value, why) in KOHYA_DEFAULTS.items():
        out.append(f"| `{option}` | `{target} = {toml_value(value)}` | {_cell(why)} |")
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """`text` with the generated block between the markers replaced by `block`."""
    start, end = text.index(DOCS_START) + len(DOCS_START), text.index(DOCS_END)
    return text[:start] + "\n" + block + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lokr_diffusion.tools.kohya_write",
                                     description="print or refresh the kohya option tables of the docs")
    parser.add_argument("--write-docs", metavar="FILE", default=None,
                        help="rewrite the generated block of this Markdown file (docs/coming-from-kohya.md)")
    args = parser.parse_args(argv)
    if args.write_docs is None:
        print(mapping_markdown(), end="")
        return 0
    from ..fileformat import atomic_write_bytes

    path = Path(args.write_docs)
    atomic_write_bytes(path, replace_block(path.read_text(encoding="utf-8"), mapping_markdown()).encode("utf-8"))
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
