# Files read from a directory a user points at (a checkpoint, a diffusers model, a VAE): a name that checks out as
# "a file name inside the directory" can still be a symlink to anything on the machine. Every such read goes
# through `inside`: no symlink, and the resolved path contained in the resolved directory.
from __future__ import annotations

from pathlib import Path


class OutsideDirectory(ValueError):
    """A file that would be read from outside the directory it was named in."""


def inside(directory: str | Path, name: str | Path) -> Path:
    """`directory / name`, refused (OutsideDirectory) if it is a symlink or resolves outside `directory`."""
    root = Path(directory)
    path = root / name
    if path.is_symlink():
        raise OutsideDirectory(
            f"{path} is a symlink (to {path.readlink()}); refused: cpdit reads only plain files "
            f"inside {root}. Copy the file into the directory instead"
        )
    if not path.resolve().is_relative_to(root.resolve()):
        raise OutsideDirectory(f"{path} resolves to {path.resolve()}, outside {root.resolve()}; refused")
    return path


def plain_tree(directory: str | Path) -> Path:
    """`directory`, refused (OutsideDirectory) if anything under it is a symlink or resolves outside it: for
    directories whose files a library reads by itself (a T5 encoder and tokenizer, loaded by transformers)."""
    root = Path(directory)
    for path in sorted(root.rglob("*")):
        try:
            inside(root, path.relative_to(root))
        except OutsideDirectory as err:
            raise OutsideDirectory(
                f"{err}. A Hugging Face cache snapshot is symlinks into its blobs: copy it to a plain directory "
                f"(cp -rL {root} DIR) and point at DIR"
            ) from None
    return root
