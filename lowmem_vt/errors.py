"""The one exception class the command line reports as a one-line ``error:`` with exit status 2.

Every error raised on what a user gave (a recipe key, a path, a data file, a model folder, a checkpoint, an
option) derives from ``UserError``; its message says what was wrong, where, and what to do. Anything else that
escapes a command is a bug and keeps its traceback. This module imports nothing: every module can raise it.
"""


class UserError(Exception):
    """A problem with what the user gave, phrased for the user in one line (status 2 from the CLI)."""


def what_is_at(path) -> str:
    """What lies at ``path``, as the end of a sentence about it: "does not exist", "is a folder", "is a character
    device, not a regular file" (``/dev/zero``), "is a named pipe, not a regular file"... Never opens it (reading a
    device or a pipe would never end)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a symbolic link to nothing" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return "is a regular file"
    if stat.S_ISDIR(mode):
        return "is a folder"
    kinds = {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISFIFO: "a named pipe",
             stat.S_ISSOCK: "a socket"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a special file")
    return f"is {kind}, not a regular file"
