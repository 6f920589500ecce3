"""The shared diffusion base (``objectives.diffusion``): σ = −log α from the process (closed forms), the loss head
and curriculum input chosen once at setup, the pad rule, and a new process trained by a subclass that only names
its process."""

from __future__ import annotations

import math

import pytest
import torch

from duo_plugin.diffusion.absorbing import AbsorbingProcess
from duo_plugin.diffusion.process import UniformProcess
from duo_plugin.diffusion.schedules import LogLinearSchedule, stratified_times
from duo_plugin.models.dit import duo_dit_tiny
from duo_plugin.objectives import DiffusionObjective, DuoObjective, ObjectiveContext, pad_rule
from duo_plugin.objectives.mdlm import MDLMObjective

K, L, B, SEED = 24, 8, 4, 11


def _model(k=K):
    torch.manual_seed(0)
    return duo_dit_tiny(k, L, dim=32, n_layers=1, n_heads=2, cond_dim=16, dropout=0.0).eval()


def _ctx(k=K, valid=None, **kw):
    valid = torch.ones(k, dtype=torch.bool) if valid is None else valid
    return ObjectiveContext(seed=SEED, global_batch_size=B, vocab_size=k, valid_vocab=valid, seq_len=L,
                            device=torch.device("cpu"), **kw)


def _sigmas(model):
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[1].clone()), with_kwargs=True)
    return seen


@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_process_sigma_is_minus_log_of_the_log_linear_alpha(eps):
    t = torch.tensor([1e-3, 0.25, 0.5, 1.0], dtype=torch.float64)
    want = torch.tensor([-math.log(1 - (1 - eps) * float(x)) for x in t], dtype=torch.float64)
    sched = LogLinearSchedule(eps=eps)
    for proc in (UniformProcess(K, None, sched), AbsorbingProcess(K + 1, K, schedule=sched)):
        got = proc.sigma(t)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("objective", ["mdlm", "udlm", "duo_curriculum"])
def test_the_network_is_conditioned_on_minus_log_alpha(objective):
    """σ handed to the network = −log α_t of the phase's schedule: log-linear (closed form) or T(γ_t) (the duality
    map integrated directly, ``duality.discrete_alpha``; the objective interpolates a 65-point table)."""
    from duo_plugin.diffusion.duality import discrete_alpha, gamma_window

    k = K + 1 if objective == "mdlm" else K
    valid = torch.ones(k, dtype=torch.bool)
    if objective == "mdlm":
        valid[-1] = False
        obj = MDLMObjective()
    else:
        obj = DuoObjective(curriculum_steps=5 if objective == "duo_curriculum" else 0, kernels_curriculum_input="dense",
                           kernels_nelbo="dense", table_points=65)
    model = _model(k)
    obj.setup(model, _ctx(k, valid))
    seen = _sigmas(model)
    x0 = torch.randint(0, K - 1, (B, L), generator=torch.Generator().manual_seed(0))
    pos, step = list(range(B)), 2
    with torch.no_grad():
        obj(model, x0, torch.ones(B, L, dtype=torch.bool), pos, step)
    t = stratified_times(SEED, step, pos, B, 1e-3, dtype=torch.float64)
    if objective == "duo_curriculum":
        gmin, gmax = gamma_window(K)
        alpha = discrete_alpha(gmin + t * (gmax - gmin), K)
        tol = 1e-4
    else:
        alpha, tol = 1 - (1 - 1e-3) * t, 1e-6
    torch.testing.assert_close(seen[0].double(), -torch.log(alpha), rtol=tol, atol=tol)


def test_duo_picks_its_head_and_curriculum_input_once(monkeypatch):
    """The kernel paths are chosen in setup (one ``choose_paths`` call) and fixed as strategy objects; calls in both
    phases never choose again."""
    import duo_plugin.kernels.select as select

    calls = []
    real = select.choose_paths
    monkeypatch.setattr(select, "choose_paths", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = {("dense", "dense", "dense"): ("DenseSoftInput", "DenseNelbo"),
             ("dense", "chunked", "chunked"): ("FusedSoftInput", "FusedNelbo"),
             ("topk", "dense", "reference"): ("TopKSoftInput", "FusedNelbo")}
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, L, dtype=torch.bool)
    for (soft, kin, kn), (want_in, want_head) in cases.items():
        calls.clear()
        obj = DuoObjective(curriculum_steps=2, curriculum_input=soft, topk=4, kernels_curriculum_input=kin,
                           kernels_nelbo=kn, table_points=65)
        model = _model()
        obj.setup(model, _ctx())
        assert (type(obj.soft_input).__name__, type(obj.head).__name__) == (want_in, want_head)
        for step in range(4):  # curriculum (0, 1) and discrete (2, 3)
            loss, _, m = obj(model, x0, mask, list(range(B)), step)
            assert torch.isfinite(loss) and m["phase"] == ("curriculum" if step < 2 else "discrete")
        assert len(calls) == 1


def test_pad_rule():
    x0 = torch.tensor([[1, 2, 3, 0]])
    z = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[True, True, True, False]])
    valid = torch.ones(9, dtype=torch.bool)
    valid[[0, 4]] = False  # 0 = an invalid pad id; the filler is the first valid id, 1
    p = pad_rule(z, x0, mask, "clean_masked", valid)
    assert p.z_in.tolist() == [[5, 6, 7, 0]] and p.model_kwargs["padding_mask"] is mask
    assert p.z_loss.tolist() == [[5, 6, 7, 1]] and p.x_loss.tolist() == [[1, 2, 3, 1]]
    p = pad_rule(z, x0, mask, "official", valid)
    assert p.z_in is z and p.model_kwargs == {} and p.z_loss.tolist() == [[5, 6, 7, 1]]
    p = pad_rule(z, x0, torch.ones_like(mask), "clean_masked", valid.logical_or(torch.arange(9) == 0))
    assert p.z_in is z and p.model_kwargs == {} and p.x_loss is x0
    with pytest.raises(ValueError, match=r"valid_vocab at 1 scored position\(s\): \[4\]"):
        pad_rule(z, torch.tensor([[1, 4, 3, 0]]), mask, "clean_masked", valid)


class _Keep(UniformProcess):
    """A toy process for the subclass test: z_t = x0 always (α-independent), NELBO = −log x_θ[x0]."""

    def corrupt(self, x0, alpha_t, generator):
        return x0.clone()

    def nelbo(self, log_x_theta, z_t, x0, alpha_t, alpha_prime_t):
        return -log_x_theta.gather(-1, x0[..., None]).squeeze(-1)


class _KeepObjective(DiffusionObjective):
    name = "keep"

    def build_process(self, model, ctx):
        return _Keep(ctx.vocab_size, ctx.valid_vocab, self.schedule)


def test_a_new_process_is_one_subclass():
    """A subclass that only returns its process gets the whole path: the loss is Σ over real tokens of the process's
    NELBO at σ = −log α_t (checked against a direct forward)."""
    model = _model()
    obj = _KeepObjective(alpha_eps=1e-3, t_min=1e-3)
    obj.setup(model, _ctx())
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 5:] = False
    with torch.no_grad():
        loss, n, m = obj(model, x0, mask, list(range(B)), 0)
        t = stratified_times(SEED, 0, list(range(B)), B, 1e-3, dtype=torch.float64)
        sigma = (-torch.log(1 - (1 - 1e-3) * t)).float()
        logp = model(x0, sigma, padding_mask=mask)
    ref = sum(-float(logp[b, i, x0[b, i]]) for b in range(B) for i in range(L) if mask[b, i])
    assert m == {"phase": "keep"} and n == int(mask.sum())
    assert float(loss) == pytest.approx(ref, rel=1e-5)
