"""nfvi's Hydra search-path plugin: the groups every nfvi command shares live in ``nfvi/conf/shared/`` (flow, optim,
paths, hydra/launcher, hydra_defaults), while each command has its own config root ``nfvi/conf/<command>/``.

A search-path plugin, rather than ``hydra.searchpath`` in each primary config, because Hydra lists the groups of
``--help`` from the search path it starts with. It only acts when the primary config root is one of nfvi's (a folder
``nfvi/conf/<command>`` beside ``nfvi/conf/shared``), so other Hydra apps in the same environment are untouched, and it
takes ``shared/`` from the same installation (checkout or wheel) as the root.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def shared_dir(path: str) -> Path | None:
    """``nfvi/conf/shared`` beside ``path`` when ``path`` (``file://...`` or a plain folder) is an nfvi config root."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif "://" in path:
        return None
    root = Path(path)
    shared = root.parent / "shared"
    if root.parent.name == "conf" and root.parent.parent.name == "nfvi" and root != shared and shared.is_dir():
        return shared
    return None


class NfviSharedConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            shared = shared_dir(element.path)
            if shared is not None:
                search_path.append(provider="nfvi", path=f"file://{shared}")
                return
