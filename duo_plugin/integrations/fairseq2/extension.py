"""``fairseq2.extension`` entry point: registers the ``duo`` model family, architectures and asset cards."""

from __future__ import annotations

import os
from pathlib import Path

from fairseq2.composition import register_file_assets, register_model_family
from fairseq2.models import ModelHubAccessor
from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer

from duo_plugin.models.dit import DiT

from .config import ARCHS, DuoConfig
from .model import DUO_FAMILY, convert_duo_state_dict, create_duo_model

__all__ = ["setup_duo_extension", "get_duo_model_hub", "ASSET_DIRS_ENV"]

#: os.pathsep-separated directories of extra YAML asset cards (e.g. written by ``write_asset_card``).
ASSET_DIRS_ENV = "DUO_FAIRSEQ2_ASSET_DIRS"


def setup_duo_extension(container: DependencyContainer) -> None:
    register_model_family(
        container,
        DUO_FAMILY,
        kls=DiT,
        config_kls=DuoConfig,
        factory=create_duo_model,
        # DiT.__init__ performs the paper's initialisation (zero adaLN / output, Kaiming embedding); a meta
        # build + reset_parameters() would not reproduce it, so always build on a real device.
        supports_meta=False,
        state_dict_converter=convert_duo_state_dict,
    )
    arch = ConfigRegistrar(container, DuoConfig)
    for name, fn in ARCHS.items():
        arch(name)(fn)
    # Asset cards for local checkpoints (see ``model.write_asset_card``); a missing directory is not an error.
    for d in filter(None, os.environ.get(ASSET_DIRS_ENV, "").split(os.pathsep)):
        register_file_assets(container, Path(d), not_exist_ok=True)


#: Typed hub: ``get_duo_model_hub().load_model("card")`` / ``.create_new_model(DuoConfig(...))``.
get_duo_model_hub = ModelHubAccessor(DUO_FAMILY, kls=DiT, config_kls=DuoConfig)
