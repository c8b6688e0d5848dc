"""What the studio may read and write: only files under the folders it was given, and atomically.

Every path a request names is resolved (``..`` and symbolic links followed) and must land inside one
of the given folders; anything else is refused before a byte is read. Pictures are sent as PNGs made
by the one image decoder (``cotune.data.images``), so a request cannot make the studio send a file
that is not a picture.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path


class Refused(PermissionError):
    """A path outside the studio's folders (or not a file it serves)."""


class Folders:
    """The folders the studio serves and writes under, each named by its index in ``roots``.

    Args:
        roots: folders (duplicates and folders inside another one are kept: indices stay stable).
    """

    def __init__(self, roots: list[str | Path]) -> None:
        self.roots: list[Path] = []
        for root in roots:
            self.add(root)

    def add(self, root: str | Path) -> int:
        """Adds a folder (once) and returns its index."""
        real = Path(os.path.realpath(root))
        if real in self.roots:
            return self.roots.index(real)
        self.roots.append(real)
        return len(self.roots) - 1

    def inside(self, path: str | Path) -> Path:
        """``path`` resolved, if it lies under one of the folders.

        Raises:
            Refused: it does not.
        """
        real = Path(os.path.realpath(path))
        for root in self.roots:
            if real == root or root in real.parents:
                return real
        raise Refused(f"'{path}' is outside the folders this studio was given")

    def resolve(self, index: int, relative: str) -> Path:
        """The file ``relative`` to folder ``index``, refusing anything that leaves it.

        Raises:
            Refused: an unknown folder, an absolute path, or a path that leaves the folder (``..``,
                a symbolic link pointing out).
        """
        if not 0 <= index < len(self.roots):
            raise Refused(f"no folder {index}")
        if os.path.isabs(relative) or "\x00" in relative:
            raise Refused(f"'{relative}' is not a path inside folder {index}")
        root = self.roots[index]
        real = Path(os.path.realpath(root / relative))
        if real != root and root not in real.parents:
            raise Refused(f"'{relative}' leaves folder {index}")
        return real

    def ref(self, path: str | Path) -> tuple[int, str] | None:
        """(folder index, path relative to it) of a file under the folders, or None."""
        try:
            real = self.inside(path)
        except Refused:
            return None
        best = max((r for r in self.roots if r == real or r in real.parents), key=lambda r: len(r.parts))
        return self.roots.index(best), real.relative_to(best).as_posix()

    def url(self, path: str | Path) -> str | None:
        """The studio URL of a picture under the folders (``/api/image/K/REL``), or None."""
        found = self.ref(path)
        return f"/api/image/{found[0]}/{found[1]}" if found else None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary sibling and one rename (a reader never sees half)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def picture_png(path: str | Path, max_side: int = 768) -> bytes:
    """The picture at ``path`` decoded by cotune's one decoder, shrunk to ``max_side``, as PNG bytes."""
    from cotune.data.images import load_image

    image = load_image(str(path))
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
