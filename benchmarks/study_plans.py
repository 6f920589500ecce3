"""The runs of the small-scale training study (benchmarks/study.py), as data.

A plan is a list of runs ``{corpus, method, seed, overrides, tag}``; ``QUEUE`` is the order in which
``python benchmarks/study.py run`` works through them.  The runner re-reads this file before every launch: append
a plan to QUEUE while a study runs and it is picked up.  A run is identified by ``corpus/method/tag/s<seed>``:
never reuse a tag for different overrides (a recorded key is skipped).
"""

from __future__ import annotations


def grid(corpora, methods, seeds, overrides=(), tag="base", vocab=None) -> list[dict]:
    """Seed-major order: every (corpus, method) gets seed 0 before any gets seed 1.  ``vocab``: the tokenizer size
    (None: the config's 256; another size trains its own tokenizer per corpus, study.Run.data_name)."""
    extra = {} if vocab is None else {"vocab": vocab}
    return [{"corpus": c, "method": m, "seed": s, "overrides": tuple(overrides), "tag": tag, **extra}
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
    # round 4, single-factor screen on the Book of Mormon (where Duo and UDLM fail 2 of 3 seeds at duo/tiny_cpu)
    **{f"screen_{tag}": grid(["bom"], ["duo", "udlm"], [0, 1, 2], over, tag) for tag, over in {
        "b128": ["global_batch_size=128"],                    # 4x the tokens per step (same steps)
        "lr1e3": ["optimizer.lr=1e-3"],                       # a third of the learning rate
        "notc": ["model.time_conditioning=false"],            # no sigma input (MDLM's setting)
        "L4": ["model.n_layers=4"],                           # twice the depth
    }.items()},
    "screen_b128_s0": grid(["bom"], ["duo", "udlm"], [0], ["global_batch_size=128"], "b128"),
    # round 4: batch 128 everywhere (the screen's winner), every method, corpus and seed; AR on the same settings
    "b128_all": grid(["jargon", "shakespeare", "bom"], ["duo", "udlm", "mdlm"], [0, 1, 2], ["global_batch_size=128"],
                     "b128"),
    "ar_b128": grid(["jargon", "shakespeare", "bom"], ["ar"], [0], ["global_batch_size=128", "max_steps=600"],
                    "b128steps600"),
    # the one b128 run that escaped late (Duo, Book of Mormon, seed 2) at batch 256
    "b256_bom_duo_s2": grid(["bom"], ["duo"], [2], ["global_batch_size=256"], "b256"),
    # the duo/*small_cpu configs exactly as shipped (batch 128, 3,000 steps): the final PPL at the full budget
    "small_all": grid(["jargon", "shakespeare", "bom"], ["duo", "udlm", "mdlm"], [0, 1, 2],
                      ["global_batch_size=128", "max_steps=3000"], "b128s3000"),
    # round 7: small_all's Jargon File block alone, seed-major, then AR there (run beside repro_s2 by a second driver,
    # which must not reach the Book of Mormon runs the first one holds)
    "small_jargon": [r for s in (0, 1, 2) for r in grid(["jargon"], ["udlm", "mdlm", "duo"], [s],
                                                          ["global_batch_size=128", "max_steps=3000"], "b128s3000")]
                    + grid(["jargon"], ["ar"], [0], ["global_batch_size=128", "max_steps=3000"], "b128s3000"),
    # the two batch-128 runs that escaped latest (seed-independent evaluation: 700 and 600), first
    "small_late": [*grid(["bom"], ["duo"], [2], ["global_batch_size=128", "max_steps=3000"], "b128s3000"),
                   *grid(["bom"], ["udlm"], [1], ["global_batch_size=128", "max_steps=3000"], "b128s3000")],
    # batch 256 on the other Book of Mormon seeds (is the escape earlier and tighter than at 128?)
    "b256_bom": grid(["bom"], ["duo", "udlm"], [0, 1, 2], ["global_batch_size=256"], "b256"),
    # duo/tiny_cpu as shipped (batch 32) on the third corpus
    "baseline_jargon": grid(["jargon"], ["duo", "udlm", "mdlm"], [0, 1, 2]),
    # round 5, the reproduction's training grid (benchmarks/reproduce.py --corpus shakespeare|bom reads these runs):
    # the duo/*small_cpu configs as shipped (AR = duo/ar_small_cpu) and Duo with the paper's curriculum share
    # (50 % of training: 1,500 of 3,000 steps), seed-major so that every seed's set completes before the next starts
    "repro": [r for s in (0, 1, 2) for r in (
        grid(["shakespeare", "bom"], ["ar", "duo", "mdlm", "udlm"], [s], ["global_batch_size=128", "max_steps=3000"],
             "b128s3000")
        + grid(["shakespeare", "bom"], ["duo"], [s], ["global_batch_size=128", "max_steps=3000", "curriculum.steps=1500"],
               "b128s3000c1500"))],
    "repro_s0": [],  # filled below: the seed-0 block of "repro" (the reproduction's pipeline is checked on it first)
    # round 5: the single factors not yet screened, duo/*tiny_cpu as shipped (batch 32, where the plateau is) on the
    # Book of Mormon (Duo and UDLM fail 2 of 3 seeds there as shipped), 3 seeds each (round 4's screen design)
    **{f"screen_{tag}": grid(["bom"], ["duo", "udlm"], [0, 1, 2], over, tag) for tag, over in {
        "noclip": ["clip_grad_norm=null"],                     # no gradient clipping (shipped: 1.0)
        "ema0": ["ema.decay=0"],                              # evaluate the raw weights (shipped: EMA 0.99)
        "warmup200": ["lr_scheduler.warmup_steps=200"],       # 4x the warm-up (shipped: 50)
        "gate1": ["model.gate_init=1.0"],                     # the residual gates open at init (shipped: adaLN-zero)
        "out02": ["model.output_init_std=0.02"],              # a random output layer (shipped: zero, uniform x_theta)
    }.items()},
    "screen_c500": grid(["bom"], ["duo"], [0, 1, 2], ["curriculum.steps=500"], "c500"),  # 5x the curriculum
    # round 6: the last two factors of the list, same design (Book of Mormon, batch 32, seeds 0-2).
    # Tokenizer size: half and twice the shipped 256 pieces (K_eff = K - 2), each with its own tokenizer.
    **{f"screen_k{k}": grid(["bom"], ["duo", "udlm"], [0, 1, 2], [], f"k{k}", vocab=k) for k in (128, 512)},
    # The curriculum's gamma window (Duo only; shipped: discrete alpha in [0.05, 0.95] = gamma [-3.053, -0.198] at
    # K_eff 254): the low-noise half alpha in [0.5, 0.99], and a wide window alpha in [0.01, 0.99]
    # (duo_plugin.diffusion.duality.gamma_window(254, lo, hi)).
    "screen_gwclean": grid(["bom"], ["duo"], [0, 1, 2], ["curriculum.gamma_min=-3.3559", "curriculum.gamma_max=-2.0751"],
                           "gwclean"),
    "screen_gwwide": grid(["bom"], ["duo"], [0, 1, 2], ["curriculum.gamma_min=-3.3559", "curriculum.gamma_max=1.4641"],
                          "gwwide"),
    # both windows escaped in 3 of 3 seeds (the base: 1 of 3; every other Duo screen at batch 32: 8 of 24): three
    # more seeds of the low-noise window and of the base, to tell a window effect from a lucky draw
    "screen_gw_more": [*grid(["bom"], ["duo"], [3, 4, 5], ["curriculum.gamma_min=-3.3559",
                                                            "curriculum.gamma_max=-2.0751"], "gwclean"),
                       *grid(["bom"], ["duo"], [3, 4, 5])],
    # seeds 3-5 gave 5/6 vs 1/6 (Fisher p = 0.08): six more seeds of each
    "screen_gw_more2": [r for s in range(6, 12) for r in (
        grid(["bom"], ["duo"], [s], ["curriculum.gamma_min=-3.3559", "curriculum.gamma_max=-2.0751"], "gwclean")
        + grid(["bom"], ["duo"], [s]))]
    # the base's seeds 0-2 again, with every checkpoint kept (round 3 predates the seed-independent evaluation and
    # its run folders are gone); the same seed is the same run (the own evaluation must repeat round 3's numbers)
    + grid(["bom"], ["duo"], [0, 1, 2], [], "asshipped"),
    # round 7: the γ-window confirmation on fresh seeds, decided in advance (docs/small-scale-training.md, round 7):
    # seeds 12-23 of the low-noise window and of the base, paired by seed; two-sided Fisher's exact test on the
    # seed-independent escape counts at 0.05
    "screen_gw_confirm": [r for s in range(12, 24) for r in (
        grid(["bom"], ["duo"], [s], ["curriculum.gamma_min=-3.3559", "curriculum.gamma_max=-2.0751"], "gwclean")
        + grid(["bom"], ["duo"], [s]))],
    # the pipeline end to end in a minute (use with --results /tmp/...: not a study result)
    # (MDLM with a 128-piece tokenizer of its own: the tokenizer-size path end to end)
    "smoke": [*grid(["bom"], ["duo"], [0], ["max_steps=20", "eval_every=10", "checkpoint.every=10"], "smoke"),
              *grid(["bom"], ["mdlm"], [0], ["max_steps=20", "eval_every=10", "checkpoint.every=10"], "smoke",
                    vocab=128)],
}

PLANS.update({f"repro_s{s}": [r for r in PLANS["repro"] if r["seed"] == s] for s in (0, 1, 2)})

# two runs at a time on 2 cores: a batch-32 tiny run ~2-5 min wall, batch 128 ~7-9 min, batch 256 ~15-18 min
QUEUE = ["screen_k128", "screen_k512", "screen_gwclean", "screen_gwwide", "repro_s0", "screen_notc", "screen_L4", "screen_gate1", "screen_out02", "screen_noclip", "screen_ema0",
         "screen_warmup200", "screen_c500",
         "repro", "screen_b128", "b256_bom_duo_s2", "b128_all", "screen_lr1e3", "baseline_jargon", "ar_b128", "small_late", "small_all",
         "screen_notc", "b256_bom", "screen_L4"]
