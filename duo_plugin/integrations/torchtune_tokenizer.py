"""Wrap a torchtune model tokenizer (``llama3_tokenizer``, ``qwen2_5_tokenizer``, ``llama2_tokenizer``, ...) as a
:class:`duo_plugin.data.tokenizers.DuoTokenizer`. The only module of ``duo_plugin.data``'s tokenizer family that
imports torchtune.

Use :meth:`TorchtuneTokenizer.from_config` (builder dotpath + kwargs) so that ``save`` can write a descriptor
that :func:`duo_plugin.data.tokenizers.load_tokenizer` rebuilds; a tokenizer wrapped from an instance works for
everything but ``save``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from duo_plugin._io import atomic_write_text
from duo_plugin.data.tokenizers import (DESCRIPTOR_NAME, TORCHTUNE_FILE_ARGS, TORCHTUNE_TOKENIZER_ARGS, SpecialIds,
                                        check_descriptor, file_sha256, register_descriptor_loader)

__all__ = ["TorchtuneTokenizer"]


def _resolve(dotpath: str):
    mod, _, name = dotpath.rpartition(".")
    if not mod:
        raise ValueError(f"component must be a dotted path like torchtune.models.llama3.llama3_tokenizer, got {dotpath!r}")
    return getattr(importlib.import_module(mod), name)


class TorchtuneTokenizer(SpecialIds):
    """A torchtune ``ModelTokenizer`` seen through the DuoTokenizer protocol.

    Args:
        tokenizer: the torchtune tokenizer instance (needs ``encode(text, add_bos=, add_eos=)``, ``decode``,
            ``eos_id``; ``bos_id`` falls back to ``eos_id`` when the tokenizer has none, as GPT-2/Qwen-style
            vocabularies use one document separator for both, like Duo's OWT setup).
        component / kwargs: the builder that made it, recorded by ``save``.
        bos_id / eos_id / pad_id: explicit overrides.
    """

    type_name = "torchtune"

    def __init__(
        self,
        tokenizer: Any,
        *,
        component: str | None = None,
        kwargs: dict | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        self.tt = tokenizer
        self.component = component
        self.kwargs = dict(kwargs or {})
        eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise ValueError(f"{type(tokenizer).__name__} has no eos_id; pass eos_id=... to TorchtuneTokenizer")
        bos = bos_id if bos_id is not None else getattr(tokenizer, "bos_id", None)
        pad = pad_id if pad_id is not None else getattr(tokenizer, "pad_id", None)
        st = getattr(tokenizer, "special_tokens", None)
        eos = int(eos)
        self._set_special_ids(
            int(bos) if bos is not None else eos,
            eos,
            int(pad) if pad is not None and int(pad) >= 0 else None,
            {int(v) for v in st.values()} if isinstance(st, dict) else (),
        )
        specials = self._specials
        vs = getattr(tokenizer, "vocab_size", None)
        if vs is None:
            base = getattr(tokenizer, "base_vocab_size", None)
            if base is None:
                raise ValueError(f"{type(tokenizer).__name__} exposes no vocab_size; cannot size the model")
            vs = max([int(base) - 1, *specials]) + 1
        self._vocab_size = max(int(vs), max(specials) + 1)

    @classmethod
    def from_config(cls, component: str, **kwargs) -> "TorchtuneTokenizer":
        """Build ``component(**kwargs)`` (e.g. ``torchtune.models.llama3.llama3_tokenizer``, path=...)."""
        return cls(_resolve(component)(**kwargs), component=component, kwargs=kwargs)

    @classmethod
    def from_descriptor(cls, desc: dict, base: str | os.PathLike = ".") -> "TorchtuneTokenizer":
        """Rebuild from a saved descriptor (``base``: the folder holding it).  A descriptor is data from a model
        folder: only allow-listed builders with allow-listed arguments (files inside ``base``, integers), checked
        by :func:`~duo_plugin.data.tokenizers.check_descriptor` before anything is imported; ``prompt_template``
        is passed as ``None`` so torchtune resolves no dotted path either (encode/decode never use it)."""
        checked = check_descriptor(desc, Path(base))
        component, kwargs = checked["component"], checked["kwargs"]
        tok = _resolve(component)(**kwargs, prompt_template=None)
        return cls(tok, component=component, kwargs=kwargs)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(list(self.tt.encode(text, add_bos=False, add_eos=False)), add_bos, add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return self.tt.decode(self._drop_bos_eos_pad(ids))

    def descriptor(self) -> dict:
        if self.component is None:
            raise ValueError("this TorchtuneTokenizer was wrapped from an instance; build it with "
                             "TorchtuneTokenizer.from_config(component, **kwargs) to save or cache it")
        kept = self._saved_kwargs()
        files = {k: file_sha256(self.kwargs[k]) for k in kept if k in TORCHTUNE_FILE_ARGS}
        return {
            "type": self.type_name,
            "component": self.component,
            "kwargs": {k: (Path(str(v)).name if k in TORCHTUNE_FILE_ARGS else v) for k, v in kept.items()},
            "file_sha256": files,
            "vocab_size": self.vocab_size,
            "bos_id": self._bos,
            "eos_id": self._eos,
            "pad_id": self._pad,
            "special_ids": sorted(self._specials),
        }

    def _saved_kwargs(self) -> dict:
        """The builder arguments a descriptor records: the allow-listed ones (files and integers; e.g. a
        ``prompt_template`` does not change encode/decode and a descriptor may not name one)."""
        allowed = TORCHTUNE_TOKENIZER_ARGS.get(str(self.component), ())
        kept = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in self.kwargs.items() if k in allowed}
        names = [Path(v).name for k, v in kept.items() if k in TORCHTUNE_FILE_ARGS]
        if len(set(names)) != len(names):
            raise ValueError(f"tokenizer files {names} share a file name; rename one so save() can copy both")
        return kept

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Copy the tokenizer files into ``out_dir`` and write ``duo_tokenizer.json`` naming them by file name (a
        saved folder is self-contained data: :func:`~duo_plugin.data.tokenizers.load_tokenizer` accepts only files
        inside it)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for k, v in self._saved_kwargs().items():
            if k in TORCHTUNE_FILE_ARGS and Path(v).resolve() != (out / Path(v).name).resolve():
                shutil.copyfile(v, out / Path(v).name)
        atomic_write_text(out / DESCRIPTOR_NAME, json.dumps(self.descriptor(), indent=2, sort_keys=True))
        return out

    def __repr__(self) -> str:
        return f"TorchtuneTokenizer({type(self.tt).__name__}, vocab_size={self.vocab_size})"


register_descriptor_loader("torchtune", TorchtuneTokenizer.from_descriptor)
