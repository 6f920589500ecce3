"""Lazy start-up hook: register duo-plugin with torchtune and lm-eval when *they* are imported.

Installed at interpreter start-up by ``duo_plugin_autoregister.pth`` (an ``import`` line, Python
< 3.18) and ``duo_plugin_autoregister.start`` (PEP 829 entry point ``duo_plugin._autoregister:install``,
Python >= 3.15), both placed at the root of site-packages by the wheel (and by the editable
install). :func:`install` only puts a tiny finder at the front of ``sys.meta_path``; it imports
neither torch, torchtune nor lm_eval, so unrelated Python processes pay ~0.5 ms.

When a target module is imported, the finder wraps its loader so that, right after the module
body has executed, our registration runs:

* ``torchtune._recipe_registry`` -> :func:`duo_plugin.integrations.torchtune.register`
  (plain ``tune ls / cp / cat / run duo_pretrain --config duo/tiny_cpu`` then work).
* ``lm_eval.models`` -> :func:`duo_plugin.integrations.lm_eval_registry.register`, which adds the
  lazy placeholder ``"duo" -> "duo_plugin.integrations.lm_eval:DuoLM"`` to lm-eval's model
  registry (plain ``lm_eval --model duo`` then works on lm-eval 0.4.13, which has no plugin
  discovery). Hooking ``lm_eval.models`` -- and not ``lm_eval.api.registry`` -- avoids the
  *registry-empty pitfall*: ``get_model`` imports ``lm_eval.models`` only when the registry is
  empty, so registering anything before that import would hide all built-in backends.

* ``transformers.models.auto.modeling_auto`` -> :func:`duo_plugin.integrations.transformers.register`
  (``AutoConfig`` / ``AutoModelForMaskedLM`` load duo and official MDLM-layout folders without remote code).

Any failure is reported on stderr and swallowed: the plugin must never break torchtune or lm-eval.
"""

from __future__ import annotations

import sys

_TARGETS = {
    "torchtune._recipe_registry": ("duo_plugin.integrations.torchtune", "register"),
    "lm_eval.models": ("duo_plugin.integrations.lm_eval_registry", "register"),
    "transformers.models.auto.modeling_auto": ("duo_plugin.integrations.transformers", "register"),
}


def _run_registration(target: str) -> None:
    mod_name, func_name = _TARGETS[target]
    try:
        import importlib

        getattr(importlib.import_module(mod_name), func_name)()
    except Exception as exc:  # never break the host library because of the plugin
        print(f"[duo_plugin] registration with {target.split('.')[0]} failed: {exc!r}", file=sys.stderr)


class _Loader:
    """Delegating loader: executes the real module, then runs our registration."""

    def __init__(self, inner, target: str):
        self._inner = inner
        self._target = target

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _run_registration(self._target)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code, ...
        return getattr(self._inner, name)


class _Finder:
    """Meta-path finder that only reacts to the module names in ``_TARGETS``."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname not in _TARGETS:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _Loader):
            spec.loader = _Loader(spec.loader, fullname)
        return spec

    @staticmethod
    def invalidate_caches():
        pass


def install() -> None:
    """Install the finder once (idempotent); register at once for targets already imported."""
    try:
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
        for target in _TARGETS:
            if target in sys.modules:
                _run_registration(target)
    except Exception as exc:  # pragma: no cover - start-up must never fail
        print(f"[duo_plugin] start-up hook failed: {exc!r}", file=sys.stderr)
