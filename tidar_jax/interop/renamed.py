"""A read-only view of a checkpoint's tensors under other names: how a wrapped decoder (Nemotron-Labs-Diffusion's
`encoder.`, Mistral-3's `language_model.`) is read as the plain transformers model it holds."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np


class RenamedTensors(Mapping):
    """`tensors` with each name `n` shown as `rename(n)`; a name that `rename` maps to None is left out (e.g. a
    vision tower a text-only import does not read). Tensors are still read lazily, and `file_of` (when `tensors`
    has it, as `hf.SafetensorsCheckpoint`) names the file of a renamed tensor, for error messages."""

    def __init__(self, tensors: Mapping[str, np.ndarray], rename: Callable[[str], str | None]):
        self._tensors = tensors
        self._names = {new: name for name in tensors if (new := rename(name)) is not None}
        where = getattr(tensors, "file_of", None)
        if where is not None:
            self.file_of = lambda name: where(self._names[name])

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[self._names[name]]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def prefix_renamer(renames: tuple[tuple[str, str | None], ...]) -> Callable[[str], str | None]:
    """A `rename` for `RenamedTensors`: the first (old prefix, new prefix) pair whose old prefix starts the name
    replaces it (new None: the tensor is left out); other names are kept as they are."""

    def rename(name: str) -> str | None:
        for old, new in renames:
            if name.startswith(old):
                return None if new is None else new + name[len(old):]
        return name

    return rename
