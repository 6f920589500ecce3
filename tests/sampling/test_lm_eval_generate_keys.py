"""lm-eval backend ``generate_until`` with the sampler ``model_args``: predictor / Ψ settings / guidance reach the
sampler, and ``block_len`` generates continuations longer than the model's window with the prompt kept."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lm_eval")

from duo_plugin.integrations import lm_eval as dl  # noqa: E402
from duo_plugin.sampling import PsiSchedule  # noqa: E402


class IdTok:
    def __init__(self, k):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = k, 0, 1, None

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


class PosModel(torch.nn.Module):
    """x_θ puts ~all mass on id 3 at every position, and records the inputs it sees."""

    def __init__(self, k=6, max_seq_len=12):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.max_seq_len, self.k = k, max_seq_len, k
        self.inputs = []

    def forward(self, x, sigma, padding_mask=None):
        self.inputs.append(x.clone())
        lg = torch.full((*x.shape, self.k), -20.0)
        lg[..., 3] = 0.0
        return torch.log_softmax(lg, -1)


class Req:
    def __init__(self, ctx, kw):
        self.args = (ctx, kw)


def test_sampler_model_args_reach_the_sampler(monkeypatch):
    import duo_plugin.sampling as sampling

    calls = []
    real = sampling.generate_continuations

    def spy(model, prompts, g, options, **kw):
        calls.append({key: getattr(options, key) for key in ("predictor", "psi", "guidance_weight", "posterior_impl")})
        return real(model, prompts, g, options, **kw)

    monkeypatch.setattr(sampling, "generate_continuations", spy)
    lm = dl.DuoLM(model=PosModel(), tokenizer=IdTok(6), gen_steps=3, predictor="psi", psi_high_mode="pure-pc",
                  psi_middle_mode="max-capped-0.01", psi_low_mode="max-rescale-0.1", psi_high_frac="0.1",
                  psi_middle_frac="0.5", guidance_weight="1.5", posterior_impl="chunked")
    assert lm.generate_until([Req("2 4", {"max_gen_toks": 3})]) == ["3 3 3"]
    assert calls == [{"predictor": "psi", "psi": PsiSchedule("pure-pc", "max-capped-0.01", "max-rescale-0.1", 0.1,
                                                             0.5), "guidance_weight": 1.5, "posterior_impl": "chunked"}]
    with pytest.raises(ValueError, match="Ψ mode"):
        dl.DuoLM(model=PosModel(), tokenizer=IdTok(6), predictor="psi", psi_low_mode="remdm")
    with pytest.raises(ValueError, match="predictor"):
        dl.DuoLM(model=PosModel(), tokenizer=IdTok(6), predictor="remdm")


def test_block_len_generates_beyond_the_window():
    model = PosModel(max_seq_len=12)
    lm = dl.DuoLM(model=model, tokenizer=IdTok(6), gen_steps=2, block_len=4)
    out = lm.generate_until([Req("2 4 5", {"max_gen_toks": 20})])
    assert out == [" ".join(["3"] * 20)]
    # every window is the model's width; window 0 holds [BOS] + the prompt at its start
    assert all(x.shape[1] == 12 for x in model.inputs)
    assert model.inputs[0][0, :4].tolist() == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="block_len"):
        dl.DuoLM(model=PosModel(), tokenizer=IdTok(6), block_len=30)
    no_blocks = dl.DuoLM(model=PosModel(), tokenizer=IdTok(6), gen_steps=2)
    with pytest.raises(ValueError, match="block_len"):
        no_blocks.generate_until([Req("2", {"max_gen_toks": 20})])
