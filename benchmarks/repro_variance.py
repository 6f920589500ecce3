"""The paper's gradient-variance claim measured as the paper does, with the control that isolates the relaxation.

Claim (Duo, Sahoo et al. 2025, Fig. 2 / Table 4, LM1B, τ = 1e-3; docs/method.md §3): the summed
gradient variance of the top-100 highest-variance weights, measured across training steps, is 0.86 with the
Gaussian-relaxed curriculum vs 55.1 without (all weights: 1469.85 vs 5454.7).  The paper's "with" and "without"
differ in two things at once: the network input (soft ``softmax(w/τ)`` vs hard ids) and the schedule (duality
``α = T(γ_t)`` vs log-linear).  The ``hard`` arm below changes only the input.

**Estimator.**  Two study runs (``benchmarks/study.py``: an OUTPUT_DIR with ``<OUTPUT_DIR>.log`` whose first line is
the ``tune run`` command) are replayed in-process step for step (``benchmarks/study_replay.py``: same config, seed,
data order and noise keyed by (seed, step, position); the weights move exactly as in the run).  Over a window of W
consecutive steps ``[S, S+W)``, at each step ``s``, at the weights BEFORE that step's update, on step ``s``'s global
batch, the full gradient ``g_s`` (every trainable parameter, flattened, float64, before clipping) of the step's loss
``Σ_mask f / #tokens`` (what ``training.loop.accumulate_gradients`` backpropagates) is recorded for each arm:

* ``soft`` (Duo run): the curriculum loss exactly as trained, from ``objective.curriculum_batch`` (soft input w/τ,
  z_t = argmax w, α = T(γ_t), α', σ = −log α) and the objective's own loss head;
* ``hard`` (Duo run): the SAME noisy batch (same t, Gaussian latent, z_t, α, α', σ, head), but the network reads
  the hard z_t ids instead of the soft input: the control isolating the relaxation from the schedule;
* ``discrete`` (UDLM run, ``duo/udlm_tiny_cpu``: the discrete log-linear NELBO from step 0): its own training
  gradient on its own trajectory (the paper's "without curriculum"; each arm at its own run's weights, as in the
  paper; the batches and times t are those of the Duo run's steps: both are keyed by (seed, step, position));
* ``discrete_at_duo`` (Duo run's weights, same batch): the discrete phase's estimator (log-linear α, hard
  z_t ~ q(z_t | x0)), a fixed-weights cross-check (what ``reproduce.py:stage_variance`` compares).

**Statistics** per arm, from the ``[W, P]`` matrix of gradients: the per-weight unbiased variance across the steps
``v_j = Σ_s (g_sj − ḡ_j)² / (W − 1)`` (the weights move during the window, so ``v_j`` includes the drift of the
expected gradient, as the paper's across-steps measurement does); (a) the paper's statistic, the sum of the top-k
``v_j`` (k = 100); (b) the trace ``Σ_j v_j``; (c) the mean gradient norm ``(1/W) Σ_s ‖g_s‖``.  Ratios
``hard/soft``, ``discrete/soft`` and ``discrete_at_duo/soft`` of each.

**Uncertainty**: a moving-block bootstrap over steps (Künsch 1989): a replicate concatenates ``ceil(W/b)`` blocks
of ``b`` consecutive window steps with uniformly drawn starts, truncated to W steps; every statistic (the top-k
selection included) is recomputed on the replicate; all arms use the same replicates (paired), so a ratio's
replicates are the ratios of the arms' replicates.  Reported: standard error = standard deviation of the R
replicates, 95 % percentile interval.  ``b`` defaults to ``ceil(W^(1/3))`` (the MSE-optimal order for variance-type
statistics, Hall, Horowitz & Jing 1995); replicates from a ``torch.Generator`` seeded by ``boot_seed``.

**Checks** in every record: at each replayed step the ``soft`` (and ``discrete``) loss and gradient norm against
the loss and pre-clip gradient norm of the replayed ``train_step`` (a mismatch raises), the loss against the one the
run itself logged (``summary.json``; a drift is reported on stderr), and the two runs' global batches are identical
at every step (else a refusal).

    python benchmarks/repro_variance.py --duo RUNS/shakespeare__duo__b128s3000c1500__s0 \\
        --udlm RUNS/shakespeare__udlm__b128s3000__s0 --start 500 --window 100 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARMS = ("soft", "hard", "discrete", "discrete_at_duo")
DUO_ARMS = ("soft", "hard", "discrete_at_duo")  # measured on the Duo run's trajectory; "discrete" on the UDLM run's
STATS = ("top_k_sum", "trace", "grad_norm_mean")
PAPER = {"source": "Sahoo et al. 2025, Fig. 2 / Table 4 (LM1B, tau = 1e-3, 100K steps)",
         "top100_sum": {"curriculum": 0.86, "no_curriculum": 55.1},
         "trace": {"curriculum": 1469.85, "no_curriculum": 5454.7}}
#: the replay must BE the run: the soft/discrete loss and gradient norm against the replayed train_step's
CHECK_RTOL = 1e-5


def _user_error(msg: str):
    from duo_plugin.errors import UserError

    return UserError(msg)


# ------------------------------------------------------------------------------------------------ runs
def run_command(out_dir: Path) -> str | None:
    """The ``tune run`` command on the first line of the study's ``<OUTPUT_DIR>.log`` (None without that log)."""
    log = out_dir.parent / (out_dir.name + ".log")
    if not log.is_file():
        return None
    first = log.read_text().splitlines()[0]
    return first[2:] if first.startswith("$ ") else first


def pair_key(cfg) -> dict:
    """What two runs must share for a paired comparison: seed, batch, tokenizer and data (the data cache folder
    aside), resolved."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in (c.get("data") or {}).items() if k != "cache_dir"}
    return {"seed": c.get("seed"), "global_batch_size": c.get("global_batch_size"),
            "tokenizer.path": (c.get("tokenizer") or {}).get("path"), "data": data}


def check_pair(duo_dir: Path, udlm_dir: Path) -> None:
    """Refuse (UserError naming the flags) a missing run or two runs with different data/tokenizer/seed/batch."""
    from study_replay import run_config

    for flag, d in (("--duo", duo_dir), ("--udlm", udlm_dir)):
        if not d.is_dir() or run_command(d) is None and not (d / "torchtune_config.yaml").is_file():
            raise _user_error(f"{flag} {d}: not a study run (no folder with {d.name}.log beside it or "
                              "torchtune_config.yaml in it); pass an OUTPUT_DIR written by benchmarks/study.py")
    a, b = pair_key(run_config(duo_dir)), pair_key(run_config(udlm_dir))
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise _user_error(f"--duo/--udlm: the runs differ in {', '.join(diff)} ({a[diff[0]]!r} vs {b[diff[0]]!r}); "
                          "pair a Duo and a UDLM run of the same corpus, tokenizer, seed and global_batch_size")


def check_phases(recipe, steps: list[int], flag: str, run: Path) -> None:
    """``--duo``: a Duo objective whose curriculum is active at every step; ``--udlm``: the uniform-state objective
    in its discrete phase at every step; both: every step within the run's ``max_steps``."""
    obj = recipe.objective
    if getattr(obj, "name", None) != "duo" or not hasattr(obj, "curriculum_batch"):
        raise _user_error(f"{flag} {run}: objective {getattr(obj, 'name', obj)!r} is not the uniform-state Duo "
                          "objective; pass a duo/tiny_cpu (--duo) or duo/udlm_tiny_cpu (--udlm) run")
    if max(steps) >= int(recipe.max_steps):
        raise _user_error(f"--start/--window: step {max(steps)} is beyond {flag} {run}'s training (max_steps="
                          f"{recipe.max_steps}); choose a window inside the run's steps")
    want = "curriculum" if flag == "--duo" else "discrete"
    bad = [s for s in steps if obj.phase(s) != want]
    if not bad:
        return
    if flag == "--duo":
        raise _user_error(f"--start/--window: the Duo run {run} is not in its curriculum ({obj.describe_curriculum()}) "
                          f"at steps {bad[0]}..{bad[-1]} of the window; choose --start and --window inside the "
                          "curriculum (or pass a run with a longer curriculum.steps)")
    raise _user_error(f"--udlm {run}: the run trains its curriculum at step {bad[0]}; pass a UDLM run "
                      "(duo/udlm_tiny_cpu, curriculum.steps=0)")


def batch_key(x0: torch.Tensor, mask: torch.Tensor) -> str:
    h = hashlib.sha1(x0.detach().cpu().numpy().tobytes())
    h.update(mask.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ gradients
def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    """float64 ``[P]``: ``d loss / d params`` flattened in ``params`` order (zeros for an unused parameter); the
    parameters' ``.grad`` are left untouched."""
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for g, p in zip(gs, params)])


def hard_batch(nb, x0: torch.Tensor, mask: torch.Tensor):
    """The curriculum batch ``nb`` with the network reading the hard ``z_t`` ids (pads as the pad rule feeds ids:
    put back to ``x0`` under ``clean_masked``); everything else (z_t, x0, α, α', σ, masks) unchanged."""
    if bool(mask.all()):
        ids = nb.z_t
    elif "padding_mask" in nb.model_kwargs:
        ids = torch.where(mask, nb.z_t, x0)
    else:
        raise _user_error("data.pad_mode: official with padded rows: the hard arm cannot rebuild z_t at the (noised) "
                          "pads; replay a run with data.packing: wrap or data.pad_mode: clean_masked")
    return nb._replace(model_in=ids, override=contextlib.nullcontext())


def arm_batch(objective, arm: str, model, x0, mask, pos, step: int):
    """The :class:`~duo_plugin.objectives.diffusion.NoisyBatch` of ``arm`` at ``step``, from the objective itself
    (same keyed generators as the run)."""
    if arm == "soft":
        return objective.curriculum_batch(model, x0, mask, pos, step)
    if arm == "hard":
        return hard_batch(objective.curriculum_batch(model, x0, mask, pos, step), x0, mask)
    return objective.noisy_batch(model, x0, mask, pos, step)  # discrete / discrete_at_duo: log-linear, hard z_t


def step_gradients(recipe, step: int, arms: tuple) -> tuple[dict, str]:
    """``({arm: (loss, float64 [P] gradient)}, batch key)`` at the recipe's current weights on ``step``'s global
    batch: the loss is ``Σ_mask f / #tokens`` as the training step backpropagates it."""
    from duo_plugin.objectives.base import masked_token_sum
    from study_replay import global_batch

    x0, mask, pos = global_batch(recipe, step)
    obj, model = recipe.objective, recipe.model
    n = float(obj.count_tokens(mask))
    params = trainable(model)
    model.train()
    out = {}
    for arm in arms:
        nb = arm_batch(obj, arm, model, x0, mask, pos, step)
        loss = masked_token_sum(obj.head(model, nb, obj.ctx.autocast), mask) / n
        out[arm] = (float(loss.detach()), flat_grad(loss, params))
    return out, batch_key(x0, mask)


@dataclass
class Trajectory:
    """Per-step gradients of a replayed run's arms at ``steps`` (rows in that order)."""

    run: str
    command: str | None
    seed: int
    steps: list[int]
    grads: dict = field(default_factory=dict)  # arm -> float64 [len(steps), P]
    losses: dict = field(default_factory=dict)  # arm -> [loss per step]
    trained_loss: list = field(default_factory=list)  # the replayed train_step's loss / pre-clip grad norm
    trained_grad_norm: list = field(default_factory=list)
    batch_keys: list = field(default_factory=list)

    def rows(self, start: int, window: int) -> list[int]:
        return [i for i, s in enumerate(self.steps) if start <= s < start + window]


def open_recipe(run: Path, prefix: str):
    from study_replay import replay_recipe

    return replay_recipe(run, prefix)


def close_recipe(recipe, prefix: str, cleanup: bool = True) -> None:
    """Clean up a replay recipe (unless ``study_replay.replay`` did) and remove its temporary output folder
    (``study_replay.replay_recipe``'s)."""
    if cleanup:
        recipe.cleanup()
    out = Path(recipe.output_dir)
    if out.name.startswith(prefix) and out.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(out, ignore_errors=True)


def collect(recipe, run: Path, steps: list[int], arms: tuple) -> Trajectory:
    """Replay ``recipe`` (the run in ``run``) from step 0 through ``max(steps)``; record every arm's gradient at each
    of ``steps`` before the update, and the trained loss / grad norm of those steps (the recipe is cleaned up)."""
    from study_replay import replay

    traj = Trajectory(str(run), run_command(run), int(recipe.cfg.seed), list(steps))
    row = {s: i for i, s in enumerate(steps)}
    n_params = sum(p.numel() for p in trainable(recipe.model))
    for arm in arms:
        traj.grads[arm] = torch.empty(len(steps), n_params, dtype=torch.float64)
        traj.losses[arm] = [math.nan] * len(steps)

    def before(step: int) -> None:
        res, key = step_gradients(recipe, step, arms)
        for arm, (loss, g) in res.items():
            traj.grads[arm][row[step]] = g
            traj.losses[arm][row[step]] = loss
        traj.batch_keys.append(key)

    def after(step: int, m: dict) -> None:
        traj.trained_loss.append(float(m["loss"]))
        traj.trained_grad_norm.append(None if m.get("grad_norm") is None else float(m["grad_norm"]))

    replay(recipe, steps, before, after)
    return traj


def logged_losses(run: Path) -> list | None:
    """The per-step training losses the run itself recorded (``summary.json``), or None."""
    f = Path(run) / "summary.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("losses")


def replay_check(traj: Trajectory, arm: str) -> dict:
    """Max relative difference of ``arm``'s loss and gradient norm from the replayed training step's (raises when
    the arm is not the gradient the replay trains on), and of its loss from the loss the run itself logged at those
    steps (``summary.json``; a replay that drifted from the run, e.g. other threads or hardware, shows here and is
    reported on stderr)."""
    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-30)

    loss = max(rel(a, b) for a, b in zip(traj.losses[arm], traj.trained_loss))
    norms = traj.grads[arm].norm(dim=1).tolist()
    gn = [rel(a, b) for a, b in zip(norms, traj.trained_grad_norm) if b is not None]
    out = {"loss_max_rel_diff": loss, "grad_norm_max_rel_diff": max(gn) if gn else None}
    if loss > CHECK_RTOL or (gn and max(gn) > CHECK_RTOL):
        raise RuntimeError(f"{traj.run}: the {arm} arm is not the trained gradient ({out}): the replay diverged "
                           "from the run's training step")
    logged = logged_losses(Path(traj.run))
    if logged is not None and len(logged) > max(traj.steps):
        out["run_logged_loss_max_rel_diff"] = max(rel(a, logged[s]) for a, s in zip(traj.losses[arm], traj.steps))
        if out["run_logged_loss_max_rel_diff"] > CHECK_RTOL:
            print(f"repro_variance: WARNING: the replay of {traj.run} is not the run: its {arm} losses differ from "
                  f"the logged ones by up to {out['run_logged_loss_max_rel_diff']:.2g} (relative)", file=sys.stderr)
    return out


def collect_pair(duo_dir: Path, udlm_dir: Path, steps: list[int], arms: tuple = ARMS) -> dict:
    """``{"duo": Trajectory, "udlm": Trajectory}`` after the refusals (:func:`check_pair`, :func:`check_phases`,
    the first step's batches identical); each run replayed once over ``steps``."""
    duo_arms = tuple(a for a in arms if a in DUO_ARMS)
    check_pair(duo_dir, udlm_dir)
    duo = open_recipe(duo_dir, "repro_variance_duo_")
    udlm = None
    try:
        check_phases(duo, steps, "--duo", duo_dir)
        if "discrete" in arms:
            udlm = open_recipe(udlm_dir, "repro_variance_udlm_")
            check_phases(udlm, steps, "--udlm", udlm_dir)
            from study_replay import global_batch

            if batch_key(*global_batch(duo, steps[0])[:2]) != batch_key(*global_batch(udlm, steps[0])[:2]):
                raise _user_error(f"--duo/--udlm: the runs' global batches differ at step {steps[0]}; pair runs of "
                                  "the same corpus, tokenizer, seed and global_batch_size")
    except BaseException:
        close_recipe(duo, "repro_variance_duo_")
        if udlm is not None:
            close_recipe(udlm, "repro_variance_udlm_")
        raise
    try:
        out = {"duo": collect(duo, duo_dir, steps, duo_arms)}  # collect's replay cleans the recipe up
    finally:
        close_recipe(duo, "repro_variance_duo_", cleanup=False)
    if udlm is not None:
        try:
            out["udlm"] = collect(udlm, udlm_dir, steps, ("discrete",))
        finally:
            close_recipe(udlm, "repro_variance_udlm_", cleanup=False)
        bad = [s for s, a, b in zip(steps, out["duo"].batch_keys, out["udlm"].batch_keys) if a != b]
        if bad:
            raise _user_error(f"--duo/--udlm: the runs' global batches differ at step {bad[0]}; pair runs of the "
                              "same corpus, tokenizer, seed and global_batch_size")
    return out


# ------------------------------------------------------------------------------------------------ statistics
def window_stats(g: torch.Tensor, top_k: int = 100) -> dict:
    """Per-weight unbiased variance across the rows (steps) of ``g [W, P]``: the sum of its ``top_k`` largest
    entries, its sum (the trace) and the mean row norm."""
    var = g.var(dim=0, unbiased=True)
    return {"top_k_sum": float(var.topk(min(top_k, var.numel())).values.sum()), "trace": float(var.sum()),
            "grad_norm_mean": float(g.norm(dim=1).mean())}


def default_block(n: int) -> int:
    return max(1, math.ceil(n ** (1 / 3)))


def block_bootstrap_counts(n: int, block: int, reps: int, seed: int) -> torch.Tensor:
    """float64 ``[reps, n]``: how often each of ``n`` consecutive steps occurs in each moving-block replicate
    (``ceil(n/block)`` blocks of ``block`` consecutive steps, uniform starts in ``[0, n − block]``, first ``n``)."""
    if not 1 <= block <= n:
        raise _user_error(f"--block {block}: must be in [1, window={n}]")
    gen = torch.Generator().manual_seed(int(seed))
    k = math.ceil(n / block)
    starts = torch.randint(0, n - block + 1, (reps, k), generator=gen)
    idx = (starts[:, :, None] + torch.arange(block)).reshape(reps, -1)[:, :n]
    return torch.zeros(reps, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))


def bootstrap_stats(g: torch.Tensor, counts: torch.Tensor, top_k: int = 100, chunk: int = 32) -> dict:
    """The :func:`window_stats` of every replicate (rows of ``counts``) of ``g [W, P]``: ``{stat: float64 [R]}``.
    A replicate's variance from its weighted sums of the centred rows (variance is shift-invariant; centring keeps
    the one-pass formula accurate in float64)."""
    n = g.shape[0]
    c = g - g.mean(0)
    c2 = c * c
    norms = g.norm(dim=1)
    k = min(top_k, g.shape[1])
    out = {s: [] for s in STATS}
    for i in range(0, counts.shape[0], chunk):
        cw = counts[i:i + chunk]
        m = cw @ c / n
        var = (cw @ c2 - n * m * m) / (n - 1)
        out["top_k_sum"].append(var.topk(k, dim=1).values.sum(1))
        out["trace"].append(var.sum(1))
        out["grad_norm_mean"].append(cw @ norms / n)
    return {s: torch.cat(v) for s, v in out.items()}


def interval(value: float, reps: torch.Tensor) -> dict:
    """``{"value", "se", "ci95"}``: the point value, the replicates' standard deviation and 2.5/97.5 percentiles."""
    r = reps[torch.isfinite(reps)]
    return {"value": value, "se": float(r.std(unbiased=True)) if r.numel() > 1 else None,
            "ci95": [float(torch.quantile(r, 0.025)), float(torch.quantile(r, 0.975))] if r.numel() else None}


def summarize(grads: dict, *, top_k: int = 100, block: int | None = None, reps: int = 500, boot_seed: int = 0
              ) -> dict:
    """Statistics with paired block-bootstrap intervals for ``{arm: [W, P]}`` and the ratios of every arm to
    ``soft``: ``{"stats": {arm: {stat: interval}}, "ratios": {"arm/soft": {stat: interval}}, "bootstrap": ...}``."""
    n = next(iter(grads.values())).shape[0]
    block = default_block(n) if block is None else int(block)
    counts = block_bootstrap_counts(n, block, reps, boot_seed)
    point, boot = {}, {}
    for arm, g in grads.items():
        point[arm], boot[arm] = window_stats(g, top_k), bootstrap_stats(g, counts, top_k)
    stats = {arm: {s: interval(point[arm][s], boot[arm][s]) for s in STATS} for arm in grads}
    ratios = {}
    if "soft" in grads:
        for arm in (a for a in grads if a != "soft"):
            ratios[f"{arm}/soft"] = {s: interval(point[arm][s] / point["soft"][s], boot[arm][s] / boot["soft"][s])
                                     for s in STATS}
    return {"stats": stats, "ratios": ratios, "bootstrap": {
        "method": "moving-block bootstrap over steps (Kunsch 1989), paired across arms; se = sd of the replicates, "
                  "ci95 = 2.5/97.5 percentiles", "block": block, "reps": reps, "seed": boot_seed}}


# ------------------------------------------------------------------------------------------------ records
def window_record(pair: dict, start: int, window: int, *, top_k: int = 100, block: int | None = None,
                  reps: int = 500, boot_seed: int = 0) -> dict:
    """One JSON record for the window ``[start, start + window)`` of trajectories from :func:`collect_pair`."""
    grads, losses, runs, checks = {}, {}, {}, {}
    for name, traj in pair.items():
        rows = traj.rows(start, window)
        if len(rows) != window:
            raise ValueError(f"the {name} trajectory lacks steps of [{start}, {start + window})")
        for arm, g in traj.grads.items():
            grads[arm] = g[rows]
            lt = torch.tensor([traj.losses[arm][i] for i in rows], dtype=torch.float64)
            losses[arm] = {"mean": float(lt.mean()), "var": float(lt.var(unbiased=True))}
        runs[name] = {"dir": traj.run, "command": traj.command, "seed": traj.seed}
        arm = "soft" if name == "duo" else "discrete"
        if arm in traj.grads:
            checks[f"{arm}_vs_trained_step"] = replay_check(traj, arm)
    if "udlm" in pair:
        checks["same_batches"] = pair["duo"].batch_keys == pair["udlm"].batch_keys
    rec = {"window": [start, start + window], "start": start, "W": window, "arms": list(grads), "top_k": top_k,
           "n_params": int(next(iter(grads.values())).shape[1]), "runs": runs, "loss": losses,
           **summarize(grads, top_k=top_k, block=block, reps=reps, boot_seed=boot_seed),
           "checks": checks, "paper": PAPER,
           "estimator": "per-weight unbiased variance across the W window steps of the full float64 gradient of "
                        "each step's training loss at the weights before that step's update (see module docstring)"}
    return rec


def measure_windows(duo_dir, udlm_dir, starts: list[int], window: int, *, arms: tuple = ARMS, top_k: int = 100,
                    block: int | None = None, reps: int = 500, boot_seed: int = 0) -> list[dict]:
    """One record (:func:`window_record`) per window ``[start, start + window)``; each run replayed once."""
    if window < 2:
        raise _user_error(f"--window {window}: a variance needs at least 2 steps")
    if not starts or min(starts) < 0:
        raise _user_error(f"--start {starts}: steps are >= 0")
    if "soft" not in arms:
        raise _user_error("--arms: include soft (every ratio is to the soft arm)")
    steps = sorted({s for st in starts for s in range(st, st + window)})
    pair = collect_pair(Path(duo_dir), Path(udlm_dir), steps, tuple(arms))
    return [window_record(pair, st, window, top_k=top_k, block=block, reps=reps, boot_seed=boot_seed)
            for st in starts]


def measure(duo_dir, udlm_dir, start: int, window: int, **kw) -> dict:
    """The record of one window (keyword arguments as :func:`measure_windows`)."""
    return measure_windows(duo_dir, udlm_dir, [start], window, **kw)[0]


def table_lines(rec: dict) -> list[str]:
    def f(iv):
        return f"{iv['value']:.4g} ± {iv['se']:.2g}" if iv["se"] is not None else f"{iv['value']:.4g}"

    out = [f"window [{rec['window'][0]}, {rec['window'][1]}) W={rec['W']}  P={rec['n_params']}  "
           f"(± block-bootstrap SE, b={rec['bootstrap']['block']}, R={rec['bootstrap']['reps']})",
           f"{'arm':<16} {'top-' + str(rec['top_k']) + ' sum':>22} {'trace':>22} {'mean |g|':>22}"]
    for arm, st in rec["stats"].items():
        out.append(f"{arm:<16} {f(st['top_k_sum']):>22} {f(st['trace']):>22} {f(st['grad_norm_mean']):>22}")
    for name, st in rec["ratios"].items():
        out.append(f"{name:<16} {f(st['top_k_sum']):>22} {f(st['trace']):>22} {f(st['grad_norm_mean']):>22}")
    return out


def main(argv=None) -> int:
    from duo_plugin.errors import user_errors

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duo", required=True, help="a study run of Duo whose curriculum covers the window")
    ap.add_argument("--udlm", required=True, help="a study run of UDLM (duo/udlm_tiny_cpu), same data/seed/batch")
    ap.add_argument("--start", type=int, nargs="+", required=True, help="first step of each window")
    ap.add_argument("--window", type=int, default=100, help="W consecutive steps (default 100)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--top-k", type=int, default=100, help="the paper's top-100 (default)")
    ap.add_argument("--block", type=int, default=None, help="bootstrap block length (default ceil(W^(1/3)))")
    ap.add_argument("--reps", type=int, default=500, help="bootstrap replicates (default 500)")
    ap.add_argument("--boot-seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    with user_errors("repro_variance"):
        recs = measure_windows(a.duo, a.udlm, a.start, a.window, arms=tuple(a.arms), top_k=a.top_k, block=a.block,
                               reps=a.reps, boot_seed=a.boot_seed)
        for rec in recs:
            print("\n".join(table_lines(rec)), flush=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps({"records": recs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
