"""The runs of the small-scale training study (benchmarks/study.py), as data.

A plan is a list of runs ``{corpus, method, seed, overrides, tag}``; ``QUEUE`` is the order in which
``python benchmarks/study.py run`` works through them.  The runner re-reads this file before every launch: append
a plan to QUEUE while a study runs and it is picked up.  A run is identified by ``corpus/method/tag/s<seed>``:
never reuse a tag for different overrides (a recorded key is skipped).
"""

from __future__ import annotations


def grid(corpora, methods, seeds, overrides=(), tag="base") -> list[dict]:
    """Seed-major order: every (corpus, method) gets seed 0 before any gets seed 1."""
    return [{"corpus": c, "method": m, "seed": s, "overrides": tuple(overrides), "tag": tag}
            for s in seeds for c in corpora for m in methods]


PLANS = {
    # duo/tiny_cpu's shape and budget as shipped, 3 seeds, the new corpus first
    "baseline": grid(["bom", "shakespeare"], ["duo", "udlm", "mdlm"], [0, 1, 2]),
    **{f"baseline_s{s}": grid(["bom", "shakespeare"], ["duo", "udlm", "mdlm"], [s]) for s in (0, 1, 2)},
    # width: d = 128 (cond 64), 2 layers, 4 heads (~0.6M parameters): does capacity shorten the plateau?
    "d128_bom_duo_s0": grid(["bom"], ["duo"], [0], ["model.dim=128", "model.cond_dim=64"], "d128"),
    "d128_bom_s0": grid(["bom"], ["udlm", "mdlm"], [0], ["model.dim=128", "model.cond_dim=64"], "d128"),
    # the draft duo/*small_cpu configs (= these overrides on the tiny configs) everywhere, and AR on that backbone
    "d128_all": grid(["bom", "shakespeare"], ["duo", "udlm", "mdlm"], [0, 1, 2], ["model.dim=128", "model.cond_dim=64"],
                     "d128"),
    "ar_d128": grid(["bom", "shakespeare"], ["ar"], [0], ["model.dim=128", "model.cond_dim=64"], "d128"),
    # batch 64 (the same steps: twice the tokens; the low-t spike diluted 2x)
    "b64_bom_s0": grid(["bom"], ["duo", "udlm"], [0], ["global_batch_size=64"], "b64"),
    "ar": grid(["bom", "shakespeare"], ["ar"], [0], ["max_steps=600"], "steps600"),
    # the pipeline end to end in a minute (use with --results /tmp/...: not a study result)
    "smoke": grid(["bom"], ["duo", "mdlm"], [0], ["max_steps=20", "eval_every=10", "checkpoint.every=10"], "smoke"),
}

# on a 2-core machine shared with other jobs a pair of tiny runs takes 10-20 min, a d128 run ~3.5x as long
QUEUE = ["d128_bom_duo_s0", "baseline_s0", "baseline_s1", "d128_bom_s0", "ar", "baseline_s2", "b64_bom_s0", "d128_all",
         "ar_d128"]
