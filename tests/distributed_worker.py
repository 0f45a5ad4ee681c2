"""One process of a test's multi-process run: mlx-lora's CLI under an audit hook (PEP 578)
that records every path this process opens for writing, creates, renames, changes or removes.

Its last line on stderr is `RANK <rank> EXIT <status> {"wrote": [paths], "removed": [paths]}`,
written with os.write so that no redirection of sys.stderr hides it.
"""

import json
import os
import sys
import traceback

WRITE_MODES = set("wax+")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.rename", "os.mkdir", "os.chmod", "os.truncate", "os.link", "os.symlink",
           "shutil.copyfile", "shutil.move"}
REMOVALS = {"os.remove", "os.rmdir", "shutil.rmtree"}
WROTE: list[str] = []
REMOVED: list[str] = []


def audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and WRITE_MODES & set(mode)) or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            WROTE.append(os.fsdecode(path))
    elif event in CHANGES | REMOVALS and isinstance(args[0], (str, bytes, os.PathLike)):
        (REMOVED if event in REMOVALS else WROTE).append(os.fsdecode(args[0]))


def main() -> int:
    sys.addaudithook(audit)
    from mlx_lora.cli import cli

    try:
        cli.main(args=sys.argv[1:], prog_name="mlx-lora")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 (the status line must still be written)
        traceback.print_exc()
        status = 1
    rank = os.environ.get("MLX_RANK", "0")
    paths = json.dumps({"wrote": WROTE, "removed": REMOVED})
    os.write(2, f"\nRANK {rank} EXIT {status} {paths}\n".encode())
    return status


if __name__ == "__main__":
    sys.exit(main())
