"""Fixed-seed lm-eval backend cases whose scores were recorded *before* evaluation moved into a library
(``lm_eval_goldens.json``, written by ``python tests/integrations/lm_eval_golden_cases.py --record`` at that commit).

``test_lm_eval_golden.py`` replays them: the ``duo`` backend must keep returning the same log-likelihoods, rolling
log-likelihoods and greedy flags for the same seeds, for every process it scores (Duo / UDLM uniform-state, MDLM
absorbing, AR causal) and every likelihood mode (``nelbo`` under both conditionings and time samplings, ``official``,
``official_suffix``).

``udlm_nelbo`` and ``mdlm_nelbo`` (whose ``valid_vocab`` leaves out BOS) were re-recorded once, deliberately, when
evaluation stopped replacing unscored ids outside ``valid_vocab`` by the first valid id (the network now sees BOS,
as in training and in the official code); every other case is still the pre-move recording.

The models are tiny DiTs with seeded random weights (no training needed: the scores are a deterministic function of
the weights, the requests and the seed), on an integer "tokenizer" (``"3 4 5"`` -> ``[3, 4, 5]``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("lm_eval_goldens.json")
K, L = 12, 16  # data vocabulary (ids 0 = BOS, 1 = EOS, 2..11 content), window


class IdTok:
    def __init__(self, k):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = k, 0, 1, None

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


class Req:
    def __init__(self, args, task="golden", doc_id=None):
        self.args, self.task_name, self.doc_id = args, task, doc_id


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny DiT for ``kind`` in duo | udlm | mdlm | ar (adaLN-zero layers re-drawn so x_θ is not uniform)."""
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(seed)
    width = K + 1 if kind == "mdlm" else K
    m = duo_dit_tiny(width, L, causal=(kind == "ar"))
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    m.duo_metadata = {"objective": kind}
    if kind in ("udlm", "mdlm"):  # BOS is never a noise id (a valid_vocab that is not all ids)
        vv = torch.ones(width, dtype=torch.bool)
        vv[0] = False
        if kind == "mdlm":
            vv[K] = False  # the appended [MASK]
        m.valid_vocab = vv
    return m.eval()


#: loglikelihood requests: (context, continuation, doc_id); multiple-choice groups share a doc_id. The last one has
#: a continuation longer than the window (scored over rolling windows).
LL_REQUESTS = [
    ("2 3 4", " 5", 0), ("2 3 4", " 6", 0), ("2 3 4", " 7", 0), ("2 3 4", " 8", 0),
    ("9 8 7 6 5 4", " 3 2", 1), ("9 8 7 6 5 4", " 3 3", 1), ("9 8 7 6 5 4", " 11 10", 1),
    ("", "4 5 6", None), ("5", " 5 5 5 5 5 5", None),
    ("2 3 4 5 6 7 8 9 10 11 2 3 4 5 6 7 8 9", " 10", None),  # context longer than the window: left-truncated
    ("3", " " + " ".join(str(2 + (i * 7) % 10) for i in range(20)), None),
] + [("4 9 4", f" {v}", 2) for v in range(K)]  # every single-token continuation: exactly one is the argmax
ROLLING_DOCS = [
    "2 3 4 5 6 7 8 9 10 11",
    " ".join(str(2 + (i * 3) % 10) for i in range(37)),
    "7",
]


def cases():
    """(name, model kind, DuoLM options, run rolling?) for every process and likelihood mode."""
    base = {"mc_samples": 8, "seed": 3}
    return [
        ("duo_nelbo", "duo", dict(base), True),
        ("duo_clean_fraction_iid", "duo", dict(base, conditioning="clean_fraction", time_sampling="iid"), True),
        ("duo_rows_cap", "duo", dict(base, batch_size="5", rolling_context=3, window_eos="false"), True),
        ("duo_official", "duo", dict(base, likelihood="official", weights="ema"), False),
        ("duo_official_suffix", "duo", dict(base, likelihood="official_suffix", weights="ema"), False),
        ("udlm_nelbo", "udlm", dict(base, seed=5), True),
        ("mdlm_nelbo", "mdlm", dict(base), True),
        ("ar_exact", "ar", dict(base), True),
    ]


def run_case(kind: str, options: dict, rolling: bool) -> dict:
    """The backend's outputs for one case: ``loglikelihood`` [(ll, greedy)], ``rolling`` [ll] (JSON-able)."""
    from duo_plugin.integrations import lm_eval as dl

    options = dict(options)
    options.pop("weights", None)  # the weights choice is a loading option; these models are passed in directly
    lm = dl.DuoLM(model=tiny_model(kind), tokenizer=IdTok(K), progress="false", **options)
    out = {"loglikelihood": [[float(ll), bool(g)] for ll, g in
                             lm.loglikelihood([Req((c, x), doc_id=d) for c, x, d in LL_REQUESTS])]}
    if rolling:
        out["rolling"] = [float(v) for v in lm.loglikelihood_rolling([Req((d,)) for d in ROLLING_DOCS])]
    return out


def record() -> dict:
    return {name: run_case(kind, opts, rolling) for name, kind, opts, rolling in cases()}


if __name__ == "__main__":
    if "--record" not in sys.argv:
        print(json.dumps(record(), indent=1))
    else:
        GOLDEN.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
