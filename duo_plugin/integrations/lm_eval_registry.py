"""Lightweight lm-eval registration (no torch import): the lazy ``"duo"`` model placeholder.

Called by the start-up hook right after ``lm_eval.models`` executed (see
``duo_plugin._autoregister``), or explicitly. It registers the *string* placeholder
``"duo_plugin.integrations.lm_eval:DuoLM"``; lm-eval materialises it on ``get_model("duo")``, and
the ``@register_model("duo")`` decorator in that module upgrades the placeholder to the class
(lm-eval allows exactly this placeholder -> class upgrade).
"""

from __future__ import annotations

MODEL_NAME = "duo"
MODEL_TARGET = "duo_plugin.integrations.lm_eval:DuoLM"


def register() -> None:
    """Idempotently add the ``duo`` placeholder to ``lm_eval.api.registry.model_registry``.

    Imports ``lm_eval.models`` first (a no-op when called from the hook) so that the registry is
    never left holding only our entry (the registry-empty pitfall).
    """
    import lm_eval.models  # noqa: F401  -- must precede our registration
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)
