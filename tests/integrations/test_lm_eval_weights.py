"""``likelihood=official`` scores the raw (non-EMA) weights of a model folder by default, as the official harness
loads its ``state_dict``; ``weights=ema`` is the explicit alternative; ``nelbo`` keeps EMA by default; the choice is
in the estimator line and in every MC summary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from duo_plugin.integrations import lm_eval as dl  # noqa: E402
from duo_plugin.models.checkpoint import save_pretrained  # noqa: E402

_spec = importlib.util.spec_from_file_location("lm_eval_golden_cases",
                                               Path(__file__).with_name("lm_eval_golden_cases.py"))
_gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gc)


def _folder(tmp_path, with_ema=True):
    raw = _gc.tiny_model("duo", seed=0)
    ema = _gc.tiny_model("duo", seed=1).state_dict()
    out = save_pretrained(raw, tmp_path / ("m" if with_ema else "m_no_ema"), metadata={"objective": "duo"},
                          ema_state_dict=ema if with_ema else None)
    return out, raw.state_dict(), ema


def _same(model, sd):
    return all(torch.equal(model.state_dict()[k].cpu(), v) for k, v in sd.items())


def _label(lm):
    (ll, _), = lm.loglikelihood([_gc.Req(("2 3", " 4"), task="w")])
    return lm.mc_summary()["w"]["weights"], lm.estimator()


def test_official_mode_scores_raw_weights_unless_ema_is_asked_for(tmp_path):
    folder, raw, ema = _folder(tmp_path)
    tok = _gc.IdTok(_gc.K)
    official = dl.DuoLM(pretrained=str(folder), tokenizer=tok, likelihood="official", mc_samples=2, progress="false")
    assert _same(official.model, raw) and not _same(official.model, ema)
    label, est = _label(official)
    assert label == "raw" and "raw weights" in est
    explicit = dl.DuoLM(pretrained=str(folder), tokenizer=tok, likelihood="official", weights="ema", mc_samples=2,
                        progress="false")
    assert _same(explicit.model, ema)
    assert _label(explicit)[0] == "ema"
    nelbo = dl.DuoLM(pretrained=str(folder), tokenizer=tok, mc_samples=2, progress="false")  # nelbo: EMA default
    assert _same(nelbo.model, ema) and _label(nelbo)[0] == "ema"
    raw_nelbo = dl.DuoLM(pretrained=str(folder), tokenizer=tok, weights="raw", mc_samples=2, progress="false")
    assert _same(raw_nelbo.model, raw) and _label(raw_nelbo)[0] == "raw"
    with pytest.raises(ValueError, match="weights must be 'ema' or 'raw'"):
        dl.DuoLM(pretrained=str(folder), tokenizer=tok, weights="shadow")


def test_a_folder_without_ema_is_labelled_raw(tmp_path):
    folder, raw, _ = _folder(tmp_path, with_ema=False)
    lm = dl.DuoLM(pretrained=str(folder), tokenizer=_gc.IdTok(_gc.K), weights="ema", mc_samples=2, progress="false")
    assert _same(lm.model, raw) and _label(lm)[0] == "raw (the folder has no EMA)"
