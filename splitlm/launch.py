"""How splitlm starts its own parts (`splitlm serve`, `splitlm edge`, ...) as child processes.

`python -m splitlm.cli` puts the current directory first on `sys.path`, so a `splitlm/` folder
there (the folder `git clone` makes) hides the installed package. `-P` would prevent that, but
only from Python 3.11 and we support 3.10; so the child runs a two-line boot that drops that
first entry and calls `splitlm.cli.main`. The child's working directory stays the caller's, so
relative paths mean the same thing to both.
"""

from __future__ import annotations

import sys

# With `-c`, sys.path[0] is "" (the current directory) unless Python runs in safe-path mode.
_BOOT = ("import sys\n"
         "if sys.path[:1] == ['']: del sys.path[0]\n"
         "from splitlm.cli import main\n"
         "sys.exit(main())")


def cli_command(*args: str) -> list[str]:
    """The argv that runs `splitlm ARGS` in a child process with this interpreter, from any directory."""
    return [sys.executable, "-c", _BOOT, *args]
