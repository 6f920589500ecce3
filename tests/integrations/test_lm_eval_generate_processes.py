"""lm-eval ``generate_until`` serves every process the toolkit trains (Duo / UDLM uniform-state, MDLM absorbing, AR
causal) through the one generation library: a model whose x_θ puts its mass on one id generates that id under every
process, outputs never hold ids the model cannot produce ([MASK], ids outside ``valid_vocab``), and a request's
continuation does not depend on the other requests of the call (each has its own seeded generator)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from duo_plugin.integrations import lm_eval as dl  # noqa: E402

_spec = importlib.util.spec_from_file_location("lm_eval_golden_cases",
                                               Path(__file__).with_name("lm_eval_golden_cases.py"))
_gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gc)
K = _gc.K


class Peaked(torch.nn.Module):
    """x_θ with ~all mass on id 5 at every position."""

    def __init__(self, kind):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.width = K + 1 if kind == "mdlm" else K
        self.vocab_size, self.max_seq_len = self.width, 16
        self.duo_metadata = {"objective": kind}

    def forward(self, x, sigma, padding_mask=None, **kw):
        lg = torch.full((*x.shape, self.width), -30.0)
        lg[..., 5] = 0.0
        return torch.log_softmax(lg, -1)


@pytest.mark.parametrize("kind", ["duo", "udlm", "mdlm"])  # AR: a KV-cache model is needed (argmax test: backend tests)
def test_a_peaked_model_generates_its_mode_under_every_process(kind):
    lm = dl.DuoLM(model=Peaked(kind), tokenizer=_gc.IdTok(K), gen_steps=4, progress="false")
    out = lm.generate_until([_gc.Req(("2 3", {"do_sample": False, "max_gen_toks": 4})),
                             _gc.Req(("4", {"max_gen_toks": 3}))])
    assert out == ["5 5 5 5", "5 5 5"]


@pytest.mark.parametrize("kind", ["duo", "udlm", "mdlm", "ar"])
def test_generation_is_per_request_and_within_the_vocabulary(kind):
    lm = dl.DuoLM(model=_gc.tiny_model(kind), tokenizer=_gc.IdTok(K), gen_steps=4, seed=7, progress="false")
    reqs = [_gc.Req(("2 3 4", {"max_gen_toks": 5, "until": ["\n"]})), _gc.Req(("6", {"max_gen_toks": 5})),
            _gc.Req(("9 9", {"max_gen_toks": 5}))]
    together = lm.generate_until(reqs)
    alone = [lm.generate_until([r])[0] for r in reqs]
    assert together == alone
    valid = getattr(lm.model, "valid_vocab", None)
    for text in together:
        ids = [int(t) for t in text.split()]
        assert len(ids) <= 5 and all(0 <= i < K for i in ids)  # never [MASK] (id K for MDLM), never EOS (cut)
        assert 1 not in ids
        if valid is not None:
            assert all(bool(valid[i]) for i in ids)
