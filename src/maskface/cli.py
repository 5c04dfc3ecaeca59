"""``maskface`` command line: one sub-command per stage for ad-hoc use outside Snakemake.

Each sub-command lives in its stage module as ``cli_main(argv) -> int``; modules are imported only when
their sub-command runs, so ``maskface --help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "download": ("maskface.download", "Fetch a URL with resume and checksum; extract archives safely."),
    "manifest": ("maskface.datasets", "Scan a folder-per-identity dataset into a raw Parquet manifest."),
    "align": ("maskface.align", "Detect (MTCNN) and align faces of images or folders to 112x96."),
    "mask": ("maskface.mask", "Draw synthetic face masks on images or folders."),
    "demo": ("maskface.demo", "Open-set recognition on a video against a gallery folder."),
}


def _usage() -> str:
    lines = ["usage: maskface COMMAND [ARGS...]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines.append("")
    lines.append("`maskface COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"maskface: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
