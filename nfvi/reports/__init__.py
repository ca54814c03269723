"""Per-task table and figure writers for ``nfvi report``: ``write(frame, out_dir) -> list[Path]``."""
