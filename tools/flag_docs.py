"""The flag tables of docs/USAGE.md, made from the scripts' own parsers so that they always match --help.

    python -m tools.flag_docs           # rewrite the tables in docs/USAGE.md
    python -m tools.flag_docs --check   # exit 1 if docs/USAGE.md's tables differ from the parsers

Each table sits between ``<!-- flags: SCRIPT -->`` and ``<!-- /flags -->``.
"""
import argparse
import importlib
import re
import sys
from typing import Dict

SCRIPTS = ("main.py", "test_mse_mfsim.py", "test_LR.py", "predict.py", "submitit_train.py")
USAGE = "docs/USAGE.md"
BLOCK = re.compile(r"(<!-- flags: (?P<script>\S+) -->\n)(?P<body>.*?)(<!-- /flags -->)", re.S)


def parser_of(script: str) -> argparse.ArgumentParser:
    return importlib.import_module(script.removesuffix(".py")).build_parser()


def flag_table(p: argparse.ArgumentParser) -> str:
    """One row per flag: how it is written, what it does, and the config key it sets (if any)."""
    rows = ["| flag | what it does | config key |", "|---|---|---|"]
    for action in p._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = max(action.option_strings, key=len)
        if action.choices is not None:
            flag += " {" + ",".join(map(str, action.choices)) + "}"
        elif action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            flag += f" {metavar} [{metavar} ...]" if action.nargs == "+" else f" {metavar}"
        text = (action.help or "") % {"default": action.default}
        text = text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        key = getattr(action, "config_key", None)
        rows.append(f"| `{flag}` | {text} | {f'`{key}`' if key else ''} |")
    return "\n".join(rows) + "\n"


def tables() -> Dict[str, str]:
    return {script: flag_table(parser_of(script)) for script in SCRIPTS}


def rewrite(text: str) -> str:
    made = tables()
    return BLOCK.sub(lambda m: m.group(1) + made[m.group("script")] + m.group(4), text)


def main() -> None:
    p = argparse.ArgumentParser(description="Write (or --check) the flag tables of docs/USAGE.md.")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if the file is out of date")
    p.add_argument("--readme", default=USAGE, help="the file (default: %(default)s)")
    args = p.parse_args()
    with open(args.readme) as f:
        text = f.read()
    new = rewrite(text)
    if args.check:
        if new != text:
            sys.exit(f"{args.readme}: the flag tables differ from --help; run python -m tools.flag_docs")
        return
    with open(args.readme, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
