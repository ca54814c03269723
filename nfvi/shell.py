"""Shell conventions of the ``nfvi`` command: ``--version``, tab completion, and ``--help`` without schemas.

Completion: ``eval "$(nfvi -sc install=bash)"`` (or ``nfvi <command> -sc install=bash``) defines completion for
``nfvi``: the command names after ``nfvi``, then each command's config groups, options and keys, which Hydra's own
completion (``nfvi <command> -sc query=bash``) supplies once the script has rewritten the line as Hydra expects it
(``nfvi-<command> <overrides>``). Hydra's own install script cannot serve: it completes a program per command.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterable, Iterator

SCHEMA_PREFIX = "base_"  # the dataclass schemas registered in each group (base_flow, base_dataset, ...)

BASH_COMPLETION = r"""# nfvi tab completion for bash: eval "$(nfvi -sc install=bash)"
_nfvi_completion() {
    local cur="${COMP_WORDS[COMP_CWORD]}"
    if [ "$COMP_CWORD" -le 1 ]; then
        COMPREPLY=($(compgen -W "__COMMANDS__ --help --version" -- "$cur"))
        return
    fi
    local cmd="${COMP_WORDS[1]}"
    local rest="${COMP_LINE#*"$cmd"}"
    local line="nfvi-$cmd$rest"
    local point=$((COMP_POINT - ${#COMP_LINE} + ${#line}))
    local choices
    choices=$(COMP_POINT=$point COMP_LINE="$line" "${COMP_WORDS[0]}" "$cmd" -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -W "$choices" -- "$cur"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _nfvi_completion nfvi
"""


def version_line() -> str:
    """``nfvi 0.1.0 (torch ..., hydra-core ..., Python ...)``."""
    from importlib.metadata import PackageNotFoundError, version

    from nfvi import __version__

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"nfvi {__version__} (torch {of('torch')}, hydra-core {of('hydra-core')}, Python {platform.python_version()})"
    )


def completion_script(shell: str, commands: Iterable[str]) -> str:
    """The completion script for ``shell`` (bash only, as Hydra's query side supports bash)."""
    if shell != "bash":
        raise ValueError(f"shell completion for {shell!r} is not available; choose: bash")
    return BASH_COMPLETION.replace("__COMMANDS__", " ".join(commands))


def install_request(args: list[str]) -> str | None:
    """The shell of ``-sc install=<shell>`` / ``--shell-completion install=<shell>`` in ``args``, else None."""
    for flag in ("-sc", "--shell-completion"):
        if flag in args:
            i = args.index(flag)
            value = args[i + 1] if i + 1 < len(args) else ""
            if value.startswith("install="):
                return value.split("=", 1)[1]
    return None


@contextlib.contextmanager
def schemas_hidden() -> Iterator[None]:
    """While active, Hydra's ``--help`` and completion list only the options a user may pick (no ``base_*``)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    original = ConfigLoaderImpl.get_group_options

    def user_options(self, *args, **kwargs):
        return [o for o in original(self, *args, **kwargs) if not o.startswith(SCHEMA_PREFIX)]

    ConfigLoaderImpl.get_group_options = user_options
    try:
        yield
    finally:
        ConfigLoaderImpl.get_group_options = original
