"""duo-plugin: uniform-state discrete diffusion language models (Duo) for the PyTorch LLM stack."""

__version__ = "0.1.0"

# The tiny start-up hook (imports only ``sys``): registration with torchtune / lm-eval / transformers happens when
# *they* are imported. Installed at interpreter start by the .pth file of an installed duo-plugin; repeated here so a
# source checkout on PYTHONPATH behaves the same after ``import duo_plugin``.
from duo_plugin._autoregister import install as _install_startup_hook  # noqa: E402

_install_startup_hook()
