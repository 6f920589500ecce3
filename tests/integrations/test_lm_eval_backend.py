"""DuoLM against independent references: exact conditional NELBO by enumeration + quadrature (UDLM form of the
integrand, not the library's f_Duo), rolling windows by brute force, greedy check on a model with a known argmax,
registry behaviour, and lm-eval's own evaluator on the bundled offline tasks."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from duo_plugin.integrations import lm_eval as dl  # noqa: E402
from duo_plugin.integrations.lm_eval_cli import rewrite_argv  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
EPS = 1e-3  # log-linear schedule epsilon and t_min


class IdTok:
    """Minimal id-level tokenizer (ids only; encode splits on spaces into integers)."""

    def __init__(self, k):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = k, 0, 1, None

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


class ConstModel(torch.nn.Module):
    """x_θ independent of the input and position: softmax(logits)."""

    def __init__(self, logits, max_seq_len=16):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))
        self.vocab_size, self.max_seq_len = self.logits.numel(), max_seq_len

    def forward(self, x, sigma, padding_mask=None):
        b, l = x.shape
        return torch.log_softmax(self.logits, -1).expand(b, l, -1).clone()


def udlm_f(log_xt, z, x, alpha, alpha_prime, k):
    """UDLM integrand (docs/method.md §1.3, P Eq. 48-49) with explicit K-dim x̄ vectors; float64 numpy."""
    xt = np.exp(log_xt)
    xbar = (1 - alpha) * np.ones(k)
    xbar[x] += k * alpha
    xbt = k * alpha * xt + (1 - alpha)
    i = z
    s = np.sum((xbar / xbar[i]) * np.log(xbt[i] * xbar / (xbt * xbar[i])))
    return alpha_prime / (k * alpha) * (k / xbar[i] - k / xbt[i] - s)


def gauss_t(n_panels=8, per=16):
    """Composite Gauss-Legendre nodes/weights for the mean over t ~ U[EPS, 1]."""
    xs, ws = np.polynomial.legendre.leggauss(per)
    edges = np.linspace(EPS, 1.0, n_panels + 1)
    t, w = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        t += list((b - a) / 2 * xs + (a + b) / 2)
        w += list((b - a) / 2 * ws)
    return np.array(t), np.array(w) / (1 - EPS)


def exact_conditional_nelbo(model, ids, n_keep, k):
    """E_{t~U[EPS,1]} E_{z ~ q_t(.|x) on positions >= n_keep} Σ_{scored} f, by enumeration (all K^n noisy states)."""
    ids = list(ids)
    n = len(ids) - n_keep
    total = 0.0
    for t, w in zip(*gauss_t()):
        alpha = 1 - (1 - EPS) * t
        ap = -(1 - EPS)
        configs = list(itertools.product(range(k), repeat=n))
        z = torch.tensor([ids[:n_keep] + list(c) for c in configs])
        sigma = torch.full((len(configs),), -math.log(alpha), dtype=torch.float32)
        with torch.no_grad():
            logp = model(z, sigma).double().numpy()
        acc = 0.0
        for ci, c in enumerate(configs):
            prob = 1.0
            f = 0.0
            for p, zc in enumerate(c):
                x = ids[n_keep + p]
                prob *= (1 - alpha) / k + (alpha if zc == x else 0.0)
                f += udlm_f(logp[ci, n_keep + p], zc, x, alpha, ap, k)
            acc += prob * f
        total += w * acc
    return total


def _tiny_dit(k=6, length=8, seed=0):
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(seed)
    m = duo_dit_tiny(k, length)
    with torch.no_grad():  # make the output layer non-trivial (adaLN-zero init would give a uniform x_θ)
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return m.eval()


# ------------------------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("n,max_len,ctx,first", [(0, 5, 0, 0), (1, 5, 0, 0), (17, 5, 0, 0), (17, 5, 2, 0),
                                                 (40, 8, 7, 0), (23, 6, 3, 11), (9, 2, 5, 4)])
def test_rolling_windows_cover_every_token_once(n, max_len, ctx, first):
    wins = dl.rolling_windows(n, max_len, prefix_len=1, context=ctx, first=first)
    scored = [i for _, ps, pe in wins for i in range(ps, pe)]
    assert scored == list(range(first, n))  # each token once, in order
    for cs, ps, pe in wins:
        assert 1 + (pe - cs) <= max_len and cs <= ps < pe
        assert ps - cs == min(max(0, min(ctx, max_len - 2)), ps)  # as much clean context as allowed


def test_parse_batch_size_and_truncation():
    assert dl.parse_batch_size("8") == 8 and dl.parse_batch_size(4) == 4
    assert dl.parse_batch_size("auto", default=16) == 16 and dl.parse_batch_size("auto:4", 16) == 16
    assert dl.parse_batch_size(None, 7) == 7
    for bad in ("0", "-3", "x"):
        with pytest.raises(ValueError):
            dl.parse_batch_size(bad)
    kept, dropped = dl.truncate_left(list(range(10)), [100, 101], max_len=6, prefix_len=1)
    assert kept == [7, 8, 9] and dropped == 7


def test_rewrite_argv_adds_tasks_and_stderr_path(tmp_path):
    a = rewrite_argv(["--model", "duo", "--model_args", "pretrained=x", "--tasks", "t", "--output_path", str(tmp_path)])
    assert a[a.index("--include_path") + 1] == str(dl.TASKS_DIR)
    assert a[a.index("--model_args") + 1] == f"pretrained=x,mc_stderr_path={tmp_path / 'duo_mc_stderr.json'}"
    b = rewrite_argv(["--model=duo", "--include_path", "/mine", "--model_args", '{"pretrained": "x"}',
                      "--output_path", str(tmp_path / "r.json")])
    assert b.count("--include_path") == 1 and "/mine" in b
    assert json.loads(b[b.index("--model_args") + 1])["mc_stderr_path"] == str(tmp_path / "r_duo_mc_stderr.json")


# ------------------------------------------------------------------------------------------------ estimator
@pytest.mark.slow
def test_loglikelihood_matches_exact_conditional_nelbo():
    k = 6
    model = _tiny_dit(k, 8)
    # the integrand is heavy-tailed near t -> 0 (f ~ 1/(1-α) with probability ~(1-α)), hence many MC samples
    # the reference conditions the network on alpha_t (the clean-fraction default is tested separately)
    lm = dl.DuoLM(model=model, tokenizer=IdTok(k), mc_samples=512, batch_size="512", greedy_check="off",
                  conditioning="alpha_t")
    reqs = [(("", ""), [3, 4], [5, 2]), (("", ""), [2], [4, 3])]
    out = lm._loglikelihood_tokens(reqs)
    summ = lm.mc_summary()["unknown"]
    assert summ["n"] == 2 and summ["tokens"] == 4
    for (_, ctx, cont), (ll, greedy) in zip(reqs, out):
        exact = exact_conditional_nelbo(model, [0] + ctx + cont, 1 + len(ctx), k)
        assert greedy is False
        se = [s for v, s, _ in lm.scorer.recorder.records["unknown"] if abs(v + ll) < 1e-9][0]
        assert 0 < se < 0.5 * exact
        assert abs(-ll - exact) < 4.5 * se, (ll, exact, se)
    # iid time sampling estimates the same quantity (larger variance)
    lm2 = dl.DuoLM(model=model, tokenizer=IdTok(k), mc_samples=256, batch_size=128, greedy_check="off",
                   time_sampling="iid", conditioning="alpha_t")
    ll2, _ = lm2._loglikelihood_tokens(reqs[:1])[0]
    se2 = lm2.scorer.recorder.records["unknown"][0][1]
    exact = exact_conditional_nelbo(model, [0, 3, 4, 5, 2], 3, k)
    assert abs(-ll2 - exact) < 4.5 * se2


def test_scores_do_not_depend_on_batching_or_padding():
    k = 6
    model = _tiny_dit(k, 8, seed=1)
    reqs = [(("", ""), [3, 4, 2], [5, 2]), (("", ""), [2], [4]), (("", ""), [5, 5, 5, 4], [3, 3])]
    a = dl.DuoLM(model=model, tokenizer=IdTok(k), mc_samples=4, batch_size=1, greedy_check="off")
    b = dl.DuoLM(model=model, tokenizer=IdTok(k), mc_samples=4, batch_size=12, greedy_check="off")
    ra = [x for x, _ in a._loglikelihood_tokens(reqs)]
    rb = [x for x, _ in b._loglikelihood_tokens(reqs)]
    rc = [x for x, _ in b._loglikelihood_tokens(reqs[::-1])][::-1]
    np.testing.assert_allclose(ra, rb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rb, rc, rtol=1e-5, atol=1e-6)
    assert b._loglikelihood_tokens([(("", ""), [3], [])])[0] == (0.0, False)  # empty continuation: log 1 (greedy off)


def test_overlong_context_truncated_left_not_free():
    k = 6
    model = _tiny_dit(k, 8)
    lm = dl.DuoLM(model=model, tokenizer=IdTok(k), mc_samples=8, greedy_check="off")
    long_ctx = [2, 3, 4, 5] * 5
    (ll_long, _), (ll_tail, _) = lm._loglikelihood_tokens(
        [(("", ""), long_ctx, [3, 2]), (("", ""), long_ctx[-5:], [3, 2])]
    )
    assert ll_long < 0 and ll_long == pytest.approx(ll_tail, abs=1e-9)  # same window: BOS + last 5 + cont
    # a continuation longer than the window is rolled, every token scored
    lm.scorer.recorder.records.clear()
    ll, _ = lm._loglikelihood_tokens([(("", ""), [2, 3], [2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4])])[0]
    assert ll < 0 and lm.mc_summary()["unknown"]["tokens"] == 11


def test_rolling_sums_every_token_with_constant_model():
    """With x_θ independent of input and position, the conditional NELBO of a window is Σ_tokens g(x), where g
    is the one-token exact value; so a rolled document must score Σ_i g(x_i) whatever the windowing."""
    k = 5
    model = ConstModel([0.5, -1.0, 2.0, 0.0, 1.0], max_seq_len=6)
    g = {x: exact_conditional_nelbo(model, [0, x], 1, k) for x in range(k)}
    doc = [2, 3, 4, 2, 0, 1, 3, 3, 2, 4, 4, 2, 1]
    lm = dl.DuoLM(model=model, tokenizer=IdTok(k), mc_samples=64, batch_size=256, rolling_context=2)

    class Req:
        args, task_name = (" ".join(map(str, doc)),), "toy_rolling"

    (ll,) = lm.loglikelihood_rolling([Req()])
    s = lm.mc_summary()["toy_rolling"]
    assert s["tokens"] == len(doc) and s["n"] == 1
    exact = sum(g[x] for x in doc)
    assert abs(-ll - exact) < 4.5 * s["total_stderr"] + 1e-9, (ll, exact, s)


def test_is_greedy_onepass_on_known_argmax():
    k = 5
    model = ConstModel([0.0, 0.0, 0.0, 3.0, 1.0])  # argmax = 3 everywhere
    lm = dl.DuoLM(model=model, tokenizer=IdTok(k), mc_samples=2)
    out = lm._loglikelihood_tokens([(("", ""), [2], [3, 3]), (("", ""), [2], [3, 4]), (("", ""), [], [3])])
    assert [g for _, g in out] == [True, False, True]


def test_bad_model_args_fail_early():
    k = 5
    m = ConstModel([0.0] * k)
    with pytest.raises(ValueError, match="unknown --model_args"):
        dl.DuoLM(model=m, tokenizer=IdTok(k), mc_sample=3)
    with pytest.raises(ValueError, match="time_sampling"):
        dl.DuoLM(model=m, tokenizer=IdTok(k), time_sampling="antithetic")
    with pytest.raises(ValueError, match="exactly one"):
        dl.DuoLM(tokenizer=IdTok(k))
    with pytest.raises(ValueError, match="tokenizer has"):
        dl.DuoLM(model=m, tokenizer=IdTok(k + 3))


def test_generate_until_clamps_prompt_and_cuts_stops():
    k = 6
    lm = dl.DuoLM(model=ConstModel([0.0, -9.0, 0.0, 5.0, 0.0, 0.0]), tokenizer=IdTok(k), gen_steps=4)

    class Req:
        def __init__(self, ctx, kw):
            self.args = (ctx, kw)

    out = lm.generate_until([Req("2 4", {"until": ["9"], "max_gen_toks": 3}), Req("2", {"max_gen_toks": 2})])
    # x_θ puts ~all mass on id 3, so the generated ids are 3s (greedy tail)
    assert out == ["3 3 3", "3 3"]


def test_generate_until_greedy_requests_use_argmax_x_theta(monkeypatch, caplog):
    """do_sample=false / temperature=0 map to diffusion greedy decoding (noise_removal=greedy, vanishing top_p), not
    to temperature-1 ancestral sampling; sampling requests keep the configured sampler; a note is logged once."""
    import duo_plugin.sampling as sampling

    k = 6
    # argmax id 3 but only ~40% of the mass: temperature-1 ancestral sampling yields other ids too
    lm = dl.DuoLM(model=ConstModel([0.0, -9.0, 0.0, 1.0, 0.0, 0.0]), tokenizer=IdTok(k), gen_steps=4,
                  noise_removal="ancestral")

    class Req:
        def __init__(self, ctx, kw):
            self.args = (ctx, kw)

    calls = []
    real = sampling.generate_continuations

    def spy(model, prompts, g, options, **kw):
        calls.append({key: getattr(options, key) for key in ("noise_removal", "top_p", "temperature")})
        return real(model, prompts, g, options, **kw)

    monkeypatch.setattr(sampling, "generate_continuations", spy)
    with caplog.at_level("WARNING", logger="duo_plugin.lm_eval"):
        greedy = lm.generate_until([Req("2", {"do_sample": False, "max_gen_toks": 6}),
                                    Req("4", {"temperature": 0.0, "max_gen_toks": 6}),
                                    Req("2 4", {"do_sample": False, "temperature": 0.0, "max_gen_toks": 5})])
        lm.generate_until([Req("4 2", {"do_sample": False, "max_gen_toks": 4})])
    assert greedy == ["3 3 3 3 3 3", "3 3 3 3 3 3", "3 3 3 3 3"]  # argmax of x_θ at every step and at the tail
    assert calls and all(c == {"noise_removal": "greedy", "top_p": dl.GREEDY_TOP_P, "temperature": 1.0}
                         for c in calls)
    notes = [r for r in caplog.records if "NOT autoregressive greedy" in r.getMessage()]
    assert len(notes) == 1

    calls.clear()
    sampled = lm.generate_until([Req("2", {"do_sample": True, "temperature": 0.7, "max_gen_toks": 6}),
                                 Req("4", {"max_gen_toks": 6})])
    assert sorted(map(tuple, (c.values() for c in calls))) == [("ancestral", 1.0, 0.7), ("ancestral", 1.0, 1.0)]
    assert any(t != "3" for out in sampled for t in out.split())  # genuinely sampled, not greedy
    with pytest.raises(ValueError, match="temperature"):
        lm.generate_until([Req("2", {"temperature": -1.0, "max_gen_toks": 2})])


# ------------------------------------------------------------------------------------------------ registry
def test_registry_keeps_builtin_backends(tmp_path):
    code = (
        "from lm_eval.api.registry import get_model\n"
        "import duo_plugin.integrations.lm_eval as m\n"
        "print(get_model('duo') is m.DuoLM, get_model('dummy').__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "DummyLM"]
    # the start-up hook alone (no duo import) makes 'duo' resolvable, and lazily
    code = (
        "import sys\nfrom lm_eval.api.registry import get_model\n"
        "print('duo_plugin.integrations.lm_eval' in sys.modules, get_model('dummy').__name__)\n"
        "print(get_model('duo').__module__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "DummyLM", "duo_plugin.integrations.lm_eval"]


# ------------------------------------------------------------------------------------------------ evaluator
@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    from duo_plugin.data.tokenizers import train_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    src = d / "corpus.txt"
    lines = [json.loads(x)["text"] for x in (dl.TASKS_DIR / "shakespeare" / "sonnet_couplets.jsonl").open()]
    src.write_text("\n".join(lines * 4) + "\n")
    return train_sentencepiece([src], 360, d / "out", hard_vocab_limit=False)


def test_simple_evaluate_bundled_tasks(sp_tokenizer, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model = _tiny_dit(int(sp_tokenizer.vocab_size), 64)
    lm = dl.DuoLM(model=model, tokenizer=sp_tokenizer, mc_samples=4, batch_size="16", gen_steps=2,
                  mc_stderr_path=str(tmp_path / "mc.json"))
    tm = TaskManager(include_path=str(dl.TASKS_DIR), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=["duo_shakespeare_ppl", "duo_shakespeare_lastword",
                                           "duo_shakespeare_gen"], task_manager=tm, limit=3,
                          bootstrap_iters=0)
    r = res["results"]
    ppl = r["duo_shakespeare_ppl"]
    assert math.isfinite(ppl["word_perplexity,none"]) and ppl["word_perplexity,none"] > 1
    # bits_per_byte and byte_perplexity describe the same summed log-likelihood
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"], rel=1e-6)
    lw = r["duo_shakespeare_lastword"]
    assert lw["perplexity,none"] > 1 and 0 <= lw["acc,none"] <= 1
    assert "exact_match,none" in r["duo_shakespeare_gen"]
    summary = json.loads((tmp_path / "mc.json").read_text())
    assert set(summary) == {"duo_shakespeare_ppl", "duo_shakespeare_lastword"}
    assert summary["duo_shakespeare_ppl"]["n"] == 3 and summary["duo_shakespeare_ppl"]["mean_stderr"] > 0


@pytest.mark.slow
def test_cli_lm_eval_model_duo(sp_tokenizer, tmp_path):
    ckpt_mod = pytest.importorskip("duo_plugin.models.checkpoint")
    model = _tiny_dit(int(sp_tokenizer.vocab_size), 64)
    ck = tmp_path / "ckpt"
    ckpt_mod.save_pretrained(model, ck)
    sp_tokenizer.save(ck / "tokenizer")
    run = tmp_path / "cwd"
    run.mkdir()
    bindir = Path(sys.executable).parent
    r = subprocess.run(
        [str(bindir / "lm_eval"), "--model", "duo", "--model_args", f"pretrained={ck},mc_samples=2,weights=model",
         "--tasks", "duo_shakespeare_ppl", "--include_path", str(dl.TASKS_DIR), "--limit", "2",
         "--batch_size", "4"],
        cwd=run, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "duo_shakespeare_ppl" in r.stdout and "word_perplexity" in r.stdout


# ------------------------------------------------------------------------------------------------ publishable numbers
class SigmaSpy(ConstModel):
    """ConstModel that records (z, sigma) of every call."""

    def __init__(self, logits, max_seq_len=16):
        super().__init__(logits, max_seq_len)
        self.calls = []

    def forward(self, x, sigma, padding_mask=None):
        self.calls.append((x.clone(), sigma.clone()))
        return super().forward(x, sigma, padding_mask)


def test_greedy_check_and_nelbo_condition_on_the_clean_fraction():
    """The network sees sigma = -log((n_ctx + alpha_t n_cont) / n), n_ctx counting BOS + context: always in the
    greedy check, and in the NELBO with conditioning=clean_fraction."""
    k = 6
    m = SigmaSpy([0.0] * k)
    lm = dl.DuoLM(model=m, tokenizer=IdTok(k), mc_samples=4, batch_size=4, conditioning="clean_fraction")
    lm.scorer.greedy([([2, 3, 4], [5, 2])])
    (z, sigma), = m.calls
    n_ctx, n_cont = 4, 2
    assert float(sigma[0]) == pytest.approx(-math.log((n_ctx + 1e-3 * n_cont) / (n_ctx + n_cont)), rel=1e-5)
    m.calls.clear()
    lm._loglikelihood_tokens([(("", ""), [2, 3, 4], [5, 2])])
    sig = torch.cat([s for z, s in m.calls if z.shape[1] == 6]).double()
    alpha_t = ((torch.exp(-sig) * 6 - n_ctx) / n_cont)  # invert the formula: must be a log-linear alpha in range
    assert bool(((alpha_t > 1e-3 - 1e-6) & (alpha_t < 1 - 1e-3 * (1 - 1e-3) + 1e-6)).all())
    assert float(torch.exp(-sig).min()) >= n_ctx / 6 - 1e-6  # never "almost nothing is clean"


def test_rolling_windows_never_score_the_last_position():
    """Training blocks end with [EOS] at position L-1: every rolling window ends with a clean, unscored EOS."""
    k = 6
    m = SigmaSpy([0.5, -1.0, 2.0, 0.0, 1.0, 0.3], max_seq_len=8)
    lm = dl.DuoLM(model=m, tokenizer=IdTok(k), mc_samples=2, batch_size=64, rolling_context=2)

    class Req:
        args, task_name = (" ".join(["2", "3", "4", "5", "0"] * 6),), "roll"

    lm.loglikelihood_rolling([Req()])
    assert lm.mc_summary()["roll"]["tokens"] == 30
    for z, _ in m.calls:
        assert z.shape[1] <= 8 and bool((z[:, -1] == 1).all())  # EOS (id 1) kept clean at the end


def test_out_of_vocabulary_continuation_is_minus_infinity():
    k = 6
    m = ConstModel([0.0] * k)
    m.valid_vocab = torch.tensor([True] * 5 + [False])  # id 5: a special id the model never produces
    lm = dl.DuoLM(model=m, tokenizer=IdTok(k + 0), mc_samples=2)
    (ll_ok, _), (ll_bad, g_bad) = lm._loglikelihood_tokens([(("", ""), [2], [3, 4]), (("", ""), [2], [3, 5])])
    assert math.isfinite(ll_ok) and ll_bad == -math.inf and g_bad is False


def test_default_batch_size_and_progress_bar(monkeypatch):
    k = 5
    m = ConstModel([0.0] * k)
    assert dl.DuoLM(model=m, tokenizer=IdTok(k), batch_size=1).batch_size == dl.DEFAULT_BATCH_SIZE
    assert dl.DuoLM(model=m, tokenizer=IdTok(k), batch_size="1").batch_size == dl.DEFAULT_BATCH_SIZE
    assert dl.DuoLM(model=m, tokenizer=IdTok(k), batch_size="8").batch_size == 8
    # progress: a bar on a terminal, else an ETA line every 30 s on stderr (and nothing with progress=false)
    from duo_plugin import _progress

    monkeypatch.setattr(_progress, "_enabled", lambda progress: False)
    clock = iter(range(0, 100_000, 31))  # 31 s between two readings: every update is due a line
    monkeypatch.setattr(_progress, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    lines = []
    monkeypatch.setattr(_progress, "print", lambda *a, **kw: lines.append(a[0]), raising=False)
    lm = dl.DuoLM(model=m, tokenizer=IdTok(k), mc_samples=4, batch_size="4", greedy_check="off")
    lm._loglikelihood_tokens([(("", ""), [2, 3], [4]), (("", ""), [3], [4, 2])])
    assert lines and all(ln.startswith("duo: scoring: ") and "ETA" in ln for ln in lines)
    lines.clear()
    quiet = dl.DuoLM(model=m, tokenizer=IdTok(k), mc_samples=4, batch_size="4", greedy_check="off", progress="false")
    quiet._loglikelihood_tokens([(("", ""), [2, 3], [4]), (("", ""), [3], [4, 2])])
    assert lines == []


def test_mc_noise_of_multiple_choice_decisions_is_reported(caplog):
    """With x_θ uniform all choices have the same expected score: most decisions are inside the MC noise, and the
    warning says so with the estimator and the sample count."""
    k = 6
    lm = dl.DuoLM(model=ConstModel([0.0] * k), tokenizer=IdTok(k), mc_samples=8)

    class Req:
        def __init__(self, ctx, cont, doc):
            self.args, self.task_name, self.doc_id = (ctx, cont), "mc", doc

    reqs = [Req(f"{d % 4 + 2} 3", f" {c + 2} {c + 2}", d) for d in range(10) for c in range(3)]
    with caplog.at_level("INFO", logger="duo_plugin.eval"):
        lm.loglikelihood(reqs)
    s = lm.mc_summary()["mc"]
    assert s["decisions"] == 10 and s["frac_decisions_within_noise"] >= 0.5
    assert "M=8" in s["estimator"] and "alpha_t" in s["estimator"]
    msgs = [r.getMessage() for r in caplog.records if "multiple-choice decisions" in r.getMessage()]
    assert msgs and "M=8" in msgs[-1] and any(r.levelname == "WARNING" for r in caplog.records)


def _ar_dit(k=7, length=12, seed=0):
    from duo_plugin.models.dit import duo_dit_tiny

    torch.manual_seed(seed)
    m = duo_dit_tiny(k, length, causal=True)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return m.eval()


def test_ar_checkpoints_are_scored_as_causal_models():
    k = 7
    m = _ar_dit(k)
    lm = dl.DuoLM(model=m, tokenizer=IdTok(k))
    assert lm.is_ar
    ctx, cont = [2, 3, 4], [5, 6]
    (ll, greedy), = lm._loglikelihood_tokens([(("", ""), ctx, cont)])
    ids = torch.tensor([[0] + ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(m(ids, torch.zeros(1)).double(), -1)[0]
    ref = sum(float(logp[i - 1, ids[0, i]]) for i in range(4, 6))
    assert ll == pytest.approx(ref, abs=1e-6)
    # greedy: the argmax continuation is reported greedy, another one not
    pred = [int(logp[3].argmax())]
    with torch.no_grad():
        pred.append(int(torch.log_softmax(m(torch.tensor([[0] + ctx + pred]), torch.zeros(1)), -1)[0, 4].argmax()))
    out = lm._loglikelihood_tokens([(("", ""), ctx, pred[:1]), (("", ""), ctx, [(pred[0] + 1) % k])])
    assert out[0][1] is True and out[1][1] is False

    class Req:
        def __init__(self, ctx, kw):
            self.args = (ctx, kw)

    text = lm.generate_until([Req("2 3 4", {"do_sample": False, "max_gen_toks": 2})])[0]
    want = [p for p in pred if p != 1]
    if pred[0] != 1:  # generation stops at EOS (id 1)
        assert text.split()[: len(want)] == [str(p) for p in want][: len(text.split())]
    # rolling: exact sum of next-token log-probs (every token once) with one window
    class RReq:
        args, task_name = ("2 3 4 5",), "ar_roll"

    (lr,) = lm.loglikelihood_rolling([RReq()])
    ids = torch.tensor([[0, 2, 3, 4, 5]])
    with torch.no_grad():
        lp = torch.log_softmax(m(ids, torch.zeros(1)).double(), -1)[0]
    assert lr == pytest.approx(sum(float(lp[i - 1, ids[0, i]]) for i in range(1, 5)), abs=1e-6)


def test_unscorable_models_are_refused():
    class NotAModel(torch.nn.Module):
        vocab_size = 5

        def forward(self, x, s):
            return x

    with pytest.raises(ValueError, match="not a model the duo backend can score"):
        dl.DuoLM(model=NotAModel(), tokenizer=IdTok(5))
    m = ConstModel([0.0] * 5)
    m.duo_metadata = {"objective": "ar"}  # claims AR but is bidirectional
    with pytest.raises(ValueError, match="objective=ar"):
        dl.DuoLM(model=m, tokenizer=IdTok(5))


def test_official_likelihood_mode_is_mean_per_token_over_the_whole_sequence():
    k = 6
    m = SigmaSpy([0.0] * k)
    lm = dl.DuoLM(model=m, tokenizer=IdTok(k), likelihood="official", mc_samples=64, batch_size=64)

    class Req:
        def __init__(self, ctx, cont, doc):
            self.args, self.task_name, self.doc_id = (ctx, cont), "off", doc

    (ll, _), = lm.loglikelihood([Req("2 3", " 4 5", 0)])
    shapes = {z.shape[1] for z, _ in m.calls}
    assert 6 in shapes  # [BOS] 2 3 4 5 [EOS]
    z6 = torch.cat([z for z, _ in m.calls if z.shape[1] == 6])
    assert bool((z6[:, :3] != torch.tensor([0, 2, 3])).any())  # the context is noised too (loss_avg_mode=full)
    # uniform x_θ: the per-token NELBO is the same for every position, so -ll is the one-token value
    one = exact_conditional_nelbo(ConstModel([0.0] * k), [0, 4], 1, k)
    se = lm.mc_summary()["off"]["mean_stderr"]
    assert abs(-ll - one) < 4 * se + 1e-9


def test_cpu_thread_policy_is_applied_when_asked(monkeypatch):
    """cpu_threads=N sets N intra-op threads (the CLI's default ``auto`` gives a tiny model one thread: two spinning
    OpenMP threads made the backend ~7x slower on a shared 2-core machine, docs/evaluation.md §8)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        dl.DuoLM(model=ConstModel([0.0] * 5), tokenizer=IdTok(5), cpu_threads="1")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        dl.DuoLM(model=ConstModel([0.0] * 5), tokenizer=IdTok(5))  # a model passed in: the process's setting
        assert torch.get_num_threads() == 2
        dl.DuoLM(model=ConstModel([0.0] * 5), tokenizer=IdTok(5), cpu_threads="auto")
        assert torch.get_num_threads() == 1  # 30 parameters < 20M
        with pytest.raises(ValueError, match="cpu_threads"):
            dl.DuoLM(model=ConstModel([0.0] * 5), tokenizer=IdTok(5), cpu_threads="many")
    finally:
        torch.set_num_threads(before)
