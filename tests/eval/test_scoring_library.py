"""Request scoring is a library: ``eval.scoring.RequestScorer`` scores log-likelihood requests and rolling documents
without lm-eval (not even imported), and equals the exact answer where one exists (an AR model: the causal
log-likelihood computed directly from its forward)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from duo_plugin.eval.processes import process_for_model
from duo_plugin.eval.scoring import RequestScorer, ScoringConfig
from duo_plugin.eval.windows import WindowSpec, rolling_windows

ROOT = Path(__file__).resolve().parents[2]


def _causal(k=7, length=12):
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(0)
    m = duo_dit_tiny(k, length, causal=True)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    m.duo_metadata = {"objective": "ar"}
    return m.eval()


def test_ar_scores_equal_the_causal_log_likelihood():
    m = _causal()
    sc = RequestScorer(m, process_for_model(m), WindowSpec(bos=0, eos=1, max_length=12, rolling_context=3),
                       ScoringConfig(progress=False))
    (ll, greedy), = sc.loglikelihood([([2, 3, 4], [5, 6])])
    ids = torch.tensor([[0, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        logp = torch.log_softmax(m(ids, torch.zeros(1)).double(), -1)[0]
    assert abs(ll - float(logp[3, 5] + logp[4, 6])) < 1e-5  # float32 forwards, batched vs alone
    # rolling over a document longer than the window: every token once, each with its preceding context
    doc = [2 + (i * 3) % 5 for i in range(25)]
    (lr,) = sc.loglikelihood_rolling([doc])
    ref = 0.0
    for cs, ps, pe in rolling_windows(25, 12, 1, 3):  # an AR model uses the whole window (no closing EOS)
        x = torch.tensor([[0] + doc[cs:pe]])
        with torch.no_grad():
            lp = torch.log_softmax(m(x, torch.zeros(1)).double(), -1)[0]
        ref += sum(float(lp[j - 1, x[0, j]]) for j in range(1 + ps - cs, x.shape[1]))
    assert abs(lr - ref) < 1e-5
    assert sc.mc_summary()["unknown"]["likelihood"] == "ar"


def test_the_library_does_not_import_lm_eval():
    code = ("import sys, torch\n"
            "from duo_plugin.eval.scoring import RequestScorer, ScoringConfig\n"
            "from duo_plugin.eval.mc import MCPolicy\n"
            "from duo_plugin.eval.processes import process_for_model\n"
            "from duo_plugin.eval.windows import WindowSpec, rolling_windows\n"
            "from duo_plugin.models.dit import duo_dit_tiny\n"
            "torch.manual_seed(0); m = duo_dit_tiny(8, 10).eval()\n"
            "sc = RequestScorer(m, process_for_model(m), WindowSpec(0, 1, 10, 2), ScoringConfig(MCPolicy(4), "
            "progress=False))\n"
            "out = sc.loglikelihood([([2, 3], [4, 5])]) + [(v, False) for v in sc.loglikelihood_rolling([[2] * 15])]\n"
            "assert all(v < 0 for v, _ in out), out\n"
            "assert 'lm_eval' not in sys.modules\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
