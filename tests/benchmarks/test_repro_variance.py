"""benchmarks/repro_variance.py: the replay is the runs' training trajectory (gradients against ones computed by hand
from the runs' saved checkpoints, losses against the runs' own summaries), the hard arm differs from the soft one
only through the network input, the statistics against numpy brute force, the block bootstrap against the closed
form on synthetic Gaussian gradients, and the refusals.

Two tiny study-style runs (``tune run duo_pretrain`` with ``duo/tiny_cpu`` and ``duo/udlm_tiny_cpu``, the command on
the first line of ``<OUTPUT_DIR>.log`` as ``benchmarks/study.py`` writes it) are made once per module: 8 steps of a
0.04M-parameter DiT at batch 8, curriculum for steps 0..6, checkpoints at steps 3 and 6; the window is [2, 6)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
START, WINDOW, CKPT_STEP = 2, 4, 3


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


rv = _load("repro_variance_under_test", REPO / "benchmarks" / "repro_variance.py")
# the recipe tests' session fixture: a toy corpus and a 320-piece SentencePiece tokenizer (no downloads)
tiny_assets = _load("_variance_recipes_conftest", REPO / "tests" / "recipes" / "conftest.py").tiny_assets


def _command(config: str, out: Path, assets: dict, seed: int = 0, curriculum_steps: int = 7) -> list[str]:
    exe = shutil.which("tune") or str(Path(sys.executable).parent / "tune")
    return [exe, "run", "duo_pretrain", "--config", config, f"output_dir={out}", f"seed={seed}",
            f"tokenizer.path={assets['tokenizer']}", f"data.cache_dir={out.parent / 'cache'}", "data.source=files",
            f"data.files=[{assets['corpus']}]", "data.seq_len=16", "data.val_fraction=0.1", "model.dim=32",
            "model.n_layers=1", "model.n_heads=2", "model.cond_dim=16", "global_batch_size=8", "max_steps=8",
            "lr_scheduler.warmup_steps=2", f"curriculum.steps={curriculum_steps}", "curriculum.table_points=65",
            "eval_every=0", f"checkpoint.every={CKPT_STEP}", "checkpoint.keep_last=0", "progress_bar=false",
            "log_every=1"]


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """``{"duo": OUTPUT_DIR, "udlm": OUTPUT_DIR}``: both trained concurrently, each command on its log's first line."""
    root = tmp_path_factory.mktemp("variance_runs")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs, outs = [], {}
    for name, config, cur in (("duo", "duo/tiny_cpu", 7), ("udlm", "duo/udlm_tiny_cpu", 0)):
        out = root / f"shakespeare__{name}__tiny__s0"
        cmd = _command(config, out, tiny_assets, curriculum_steps=cur)
        log = open(root / f"{out.name}.log", "w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)), log))
        outs[name] = out
    for proc, log in procs:
        assert proc.wait(timeout=300) == 0, Path(log.name).read_text()[-2000:]
        log.close()
    return outs


@pytest.fixture(scope="module")
def pair(runs):
    return rv.collect_pair(runs["duo"], runs["udlm"], list(range(START, START + WINDOW)))


def _by_hand(run: Path, arm: str):
    """(loss, float64 gradient) of ``arm`` at step CKPT_STEP from the run's saved checkpoint of that step (the
    weights before its update), written from the published pieces (stratified t, keyed generators, the duality
    schedule T(γ), the log-linear schedule, f_Duo) without the objective: the soft input w/τ, the hard z_t = argmax w
    (same α, α', σ = −log α), or the log-linear z_t ~ q(z_t | x0)."""
    from study_replay import global_batch

    from duo_plugin.diffusion import duality
    from duo_plugin.diffusion.losses import curriculum_inputs, duo_nelbo
    from duo_plugin.diffusion.schedules import DualitySchedule, LogLinearSchedule, stratified_times
    from duo_plugin.diffusion.uniform import corrupt, num_valid, row_generators
    from duo_plugin.models.checkpoint import load_pretrained

    recipe = rv.open_recipe(run, "variance_test_")  # the data pipeline only: the step's global batch
    try:
        x0, mask, _ = global_batch(recipe, CKPT_STEP)
    finally:
        rv.close_recipe(recipe, "variance_test_")
    assert bool(mask.all())  # wrap packing: every token scored
    model = load_pretrained(run / "checkpoints" / f"step_{CKPT_STEP:08d}" / "model", weights="model")
    k, vv = int(model.vocab_size), model.valid_vocab
    k_eff = num_valid(k, vv)
    n = x0.shape[0]
    t = stratified_times(0, CKPT_STEP, range(n), n, t_min=1e-3, dtype=torch.float64)
    gens = row_generators(0, CKPT_STEP, range(n))
    if arm == "discrete_at_duo":
        sched = LogLinearSchedule(eps=1e-3)
        alpha, ap = sched.alpha(t), sched.alpha_prime(t)
        z_t = corrupt(x0, alpha, gens, vv)
        inp = z_t
    else:
        gmin, gmax = duality.gamma_window(k_eff)
        dual = DualitySchedule(k_eff, gmin, gmax, table=duality.DualityTable.build(k_eff, gmin, gmax, num_points=65))
        z_t, soft = curriculum_inputs(x0, dual.gamma(t), 1e-3, k, gens, vv)
        alpha, ap = dual.alpha(t), dual.alpha_prime(t)
        inp = soft if arm == "soft" else z_t
    params = [p for p in model.parameters() if p.requires_grad]
    loss = duo_nelbo(model(inp, (-torch.log(alpha)).float()).float(), z_t, x0, alpha, ap, vv).mean()
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1).double() for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow  # two tiny runs through tune run + their replays (~20 s)
def test_the_replay_is_the_runs_training_trajectory(runs, pair):
    """Every window step's soft loss is the loss the Duo run logged (its summary), the discrete one the UDLM run's;
    the soft/hard/discrete_at_duo gradients at step 3 are those computed by hand from the run's step-3 checkpoint."""
    row = CKPT_STEP - START
    for name, arm in (("duo", "soft"), ("udlm", "discrete")):
        logged = json.loads((runs[name] / "summary.json").read_text())["losses"][START:START + WINDOW]
        assert pair[name].losses[arm] == pytest.approx(logged, rel=1e-6)
    duo = pair["duo"]
    for arm in ("soft", "hard", "discrete_at_duo"):
        loss, grad = _by_hand(runs["duo"], arm)
        assert duo.losses[arm][row] == pytest.approx(loss, rel=1e-6)
        assert _rel(duo.grads[arm][row], grad) < 1e-6, arm
        # the comparison discriminates: the neighbouring step's gradient is far away
        assert _rel(duo.grads[arm][row + 1], grad) > 1e-2
    soft = _by_hand(runs["duo"], "soft")[1]
    assert _rel(duo.grads["hard"][row], soft) > 1e-3  # the hard arm is not the soft one at τ = 1e-3


@pytest.mark.slow  # two tiny runs through tune run + their replays (~20 s)
def test_hard_arm_differs_from_soft_only_through_the_input(runs):
    """softmax(w/τ) → one-hot(argmax w) as τ → 0: with τ = 1e-9 the soft and hard arms' gradients coincide (so
    the hard arm keeps t, z_t, α, α', σ and the loss of the soft one); with τ = 1 they do not.  At the step-3
    checkpoint's weights (at initialisation the DiT's zero output layer ignores its input)."""
    from duo_plugin.models.checkpoint import load_pretrained

    recipe = rv.open_recipe(runs["duo"], "variance_test_")
    try:
        ckpt = load_pretrained(runs["duo"] / "checkpoints" / f"step_{CKPT_STEP:08d}" / "model", weights="model")
        recipe.model.load_state_dict(ckpt.state_dict())
        out = {}
        for tau in (1e-9, 1.0):
            recipe.objective.tau = tau
            res, _ = rv.step_gradients(recipe, CKPT_STEP, ("soft", "hard"))
            out[tau] = (res["soft"], res["hard"])
    finally:
        rv.close_recipe(recipe, "variance_test_")
    (ls, gs), (lh, gh) = out[1e-9]
    assert lh == pytest.approx(ls, rel=1e-6) and _rel(gh, gs) < 1e-5
    (ls, gs), (lh, gh) = out[1.0]
    assert abs(lh - ls) > 1e-3 and _rel(gh, gs) > 1e-2


@pytest.mark.slow  # two tiny runs through tune run + their replays (~20 s)
def test_statistics_against_numpy_brute_force(pair):
    rec = rv.window_record(pair, START, WINDOW, top_k=100, reps=50)
    for arm, traj in (("soft", pair["duo"]), ("hard", pair["duo"]), ("discrete_at_duo", pair["duo"]),
                      ("discrete", pair["udlm"])):
        g = traj.grads[arm].numpy()
        var = np.array([[np.sum((g[:, j] - g[:, j].mean()) ** 2) / (g.shape[0] - 1)] for j in range(g.shape[1])])[:, 0]
        st = rec["stats"][arm]
        assert st["top_k_sum"]["value"] == pytest.approx(np.sort(var)[::-1][:100].sum(), rel=1e-10)
        assert st["trace"]["value"] == pytest.approx(var.sum(), rel=1e-10)
        assert st["grad_norm_mean"]["value"] == pytest.approx(np.mean(np.sqrt((g ** 2).sum(1))), rel=1e-10)
        if arm != "soft":
            want = st["trace"]["value"] / rec["stats"]["soft"]["trace"]["value"]
            assert rec["ratios"][f"{arm}/soft"]["trace"]["value"] == pytest.approx(want, rel=1e-12)
    assert rec["checks"]["same_batches"] is True
    for arm in ("soft", "discrete"):
        chk = rec["checks"][f"{arm}_vs_trained_step"]
        assert chk["loss_max_rel_diff"] < 1e-6 and chk["run_logged_loss_max_rel_diff"] < 1e-6
    assert rec["window"] == [START, START + WINDOW] and rec["n_params"] == g.shape[1]


def test_bootstrap_replicates_recompute_the_statistics_on_the_resampled_steps():
    """One replicate's statistics equal :func:`window_stats` of the rows it draws (by brute force: rows repeated
    by their counts)."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(12, 40, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 40, dtype=torch.float64)
    counts = rv.block_bootstrap_counts(12, 3, 7, seed=5)
    assert counts.sum(1).tolist() == [12.0] * 7
    boot = rv.bootstrap_stats(g, counts, top_k=5)
    for r in range(7):
        rows = torch.repeat_interleave(torch.arange(12), counts[r].long())
        v = g[rows].var(0, unbiased=True)
        assert float(boot["top_k_sum"][r]) == pytest.approx(float(v.sort(descending=True).values[:5].sum()), rel=1e-9)
        assert float(boot["trace"][r]) == pytest.approx(float(v.sum()), rel=1e-9)
        assert float(boot["grad_norm_mean"][r]) == pytest.approx(float(g[rows].norm(dim=1).mean()), rel=1e-12)


def test_block_bootstrap_se_matches_the_closed_form_and_shrinks_with_more_steps():
    """Rows g_s ~ N(0, s² I_P) i.i.d.: the trace of the unbiased per-weight variance over W steps has standard
    deviation s² sqrt(2P/(W−1)).  The bootstrap SE (block 5, 400 replicates) is within 25 % of it at W = 100 and
    W = 400 (Monte Carlo: a replicate SD from 400 draws is within ~4 % at 1 SE, the plug-in kurtosis of 50 weights
    adds a few %), so it shrinks by ~sqrt(99/399) = 0.50; the same seed gives the same SE."""
    gen = torch.Generator().manual_seed(0)
    p, s = 50, 1.5
    se = {}
    for w in (100, 400):
        g = s * torch.randn(w, p, generator=gen, dtype=torch.float64)
        iv = rv.summarize({"soft": g}, top_k=10, block=5, reps=400, boot_seed=3)["stats"]["soft"]["trace"]
        again = rv.summarize({"soft": g}, top_k=10, block=5, reps=400, boot_seed=3)["stats"]["soft"]["trace"]
        assert again == iv  # deterministic for a fixed seed
        want = s ** 2 * (2 * p / (w - 1)) ** 0.5
        assert 0.75 < iv["se"] / want < 1.25, (w, iv["se"], want)
        assert iv["ci95"][0] < p * s ** 2 < iv["ci95"][1]
        se[w] = iv["se"]
    assert 0.35 < se[400] / se[100] < 0.7


def _refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        rv.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.slow  # two tiny runs through tune run + their replays (~20 s)
def test_refusals_name_the_flag_and_the_fix(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUO_DEBUG", raising=False)
    duo, udlm = str(runs["duo"]), str(runs["udlm"])
    # the window [4, 8) leaves the curriculum (steps 0..6)
    err = _refusal(capsys, ["--duo", duo, "--udlm", udlm, "--start", "4", "--window", "4"])
    assert "--start/--window" in err and "curriculum" in err and "7 steps" in err
    # a run with another seed (only its command is read before refusing)
    other = tmp_path / "shakespeare__udlm__tiny__s1"
    other.mkdir()
    first = (runs["udlm"].parent / f"{runs['udlm'].name}.log").read_text().splitlines()[0]
    (tmp_path / f"{other.name}.log").write_text(first.replace(f"output_dir={udlm}", f"output_dir={other}")
                                                .replace("seed=0", "seed=1") + "\n")
    err = _refusal(capsys, ["--duo", duo, "--udlm", str(other), "--start", "2", "--window", "4"])
    assert "--duo/--udlm" in err and "seed" in err
    # the Duo run passed as the UDLM run
    err = _refusal(capsys, ["--duo", duo, "--udlm", duo, "--start", "2", "--window", "4"])
    assert "--udlm" in err and "curriculum.steps=0" in err
    err = _refusal(capsys, ["--duo", duo, "--udlm", udlm, "--start", "2", "--window", "1"])
    assert "--window" in err
    # the window [5, 9) runs past the runs' training (max_steps=8)
    err = _refusal(capsys, ["--duo", duo, "--udlm", udlm, "--start", "5", "--window", "4"])
    assert "--start/--window" in err and "max_steps=8" in err
