"""The bad inputs and faults a careless or hostile user hits, on every entry point: each stops with exit status 2 and
ONE line naming the key (or file) and the fix, and leaves the earlier run's files unchanged (by sha256).  Inputs that
are legal but almost certainly a mistake warn instead; ``data.val_fraction=0`` works."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.recipes import duo_eval as de
from duo_plugin.recipes import duo_generate as dg
from duo_plugin.recipes import duo_pretrain as dp

REPO = Path(__file__).resolve().parents[2]


def _huge_vocab_folder(w) -> Path:
    """A model folder declaring a 10^9-token vocabulary (~0.5 TB of fp32 embeddings): nothing may allocate it."""
    d = w["root"] / "huge_vocab"
    if not d.exists():
        shutil.copytree(w["good"] / "final", d)
        cfg = json.loads((d / "duo_config.json").read_text())
        cfg["builder_kwargs"]["vocab_size"] = cfg["vocab_size"] = 10 ** 9
        (d / "duo_config.json").write_text(json.dumps(cfg))
    return d


def _tiny_corpus(w) -> Path:
    f = w["root"] / "one_paragraph.txt"
    f.write_text("The king spoke to the queen in the castle by the river at night.\n")
    return f


def _pre(h, w, tmp, **o):
    return lambda: dp.run(h.pretrain_cfg(tmp, w["assets"], "run", **o))


def _gen(h, w, tmp, **o):
    return lambda: dg.run(h.generate_cfg(w["good"] / "final", tmp / "gen", **o))


def _ev(h, w, tmp, **o):
    return lambda: de.run(h.eval_cfg(w["good"] / "final", tmp / "eval", w["assets"]["corpus"], **o))


# (id, prog, factory(h, world, tmp_path) -> callable, substrings of the one line)
TABLE = [
    ("data_files_without_source_files", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"data.source": "shakespeare"}),
     ["data.files is set but data.source=shakespeare ignores it", "set data.source=files"]),
    ("data_hub_without_source_hub", "duo_pretrain",
     lambda h, w, t: _pre(h, w, t, **{"data.hub": {"path": "text", "split": "train"}}),
     ["data.hub is set but data.source=files ignores it", "data.source=hub"]),
    ("device_gpu_unknown", "duo_pretrain", lambda h, w, t: _pre(h, w, t, device="gpu"),
     ["device='gpu' is not a device", "device=cpu"]),
    ("tiny_corpus_heldout", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"data.files": [str(_tiny_corpus(w))]}),
     ["held-out split needs at least 2 documents", "data.val_fraction: 0"]),
    ("model_too_large_for_memory", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"model.vocab_size": 10 ** 9}),
     ["training the model of model.* needs about", "GiB", "of parameters", "available"]),
    ("init_from_folder_too_large", "duo_pretrain",
     lambda h, w, t: _pre(h, w, t, init_from=str(_huge_vocab_folder(w))),
     ["huge_vocab needs about", "GiB of parameters", "available"]),
    ("generate_folder_too_large", "duo_generate",
     lambda h, w, t: (lambda: dg.run(h.generate_cfg(_huge_vocab_folder(w), t / "gen"))),
     ["huge_vocab needs about", "available"]),
    ("generate_add_bos_maybe", "duo_generate", lambda h, w, t: _gen(h, w, t, add_bos="maybe"),
     ["config key 'add_bos' must be true or false, got 'maybe'"]),
    ("generate_variable_length_maybe", "duo_generate", lambda h, w, t: _gen(h, w, t, variable_length="maybe"),
     ["config key 'variable_length' must be true or false, got 'maybe'"]),
    ("generate_batch_size_abc", "duo_generate", lambda h, w, t: _gen(h, w, t, batch_size="abc"),
     ["config key 'batch_size' must be an integer, got 'abc'"]),
    ("eval_block_size_0", "duo_eval", lambda h, w, t: _ev(h, w, t, block_size=0),
     ["config key 'block_size' must be >= 3, got 0"]),
    ("eval_max_blocks_0", "duo_eval", lambda h, w, t: _ev(h, w, t, max_blocks=0),
     ["config key 'max_blocks' must be >= 1, got 0"]),
    ("eval_device_gpu", "duo_eval", lambda h, w, t: _ev(h, w, t, device="gpu"), ["device='gpu' is not a device"]),
    # messages that named no key (or the wrong one) before
    ("val_fraction_1_5", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"data.val_fraction": 1.5}),
     ["config key 'data.val_fraction' must be < 1.0, got 1.5"]),
    ("ema_decay_2", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"ema.decay": 2}),
     ["config key 'ema.decay' must be <= 1.0, got 2.0"]),
    ("sample_by_word", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"data.sample_by": "word"}),
     ["data.sample_by", "got 'word'"]),
    ("model_component_missing", "duo_pretrain",
     lambda h, w, t: _pre(h, w, t, **{"model._component_": "nonexistent.module.fn"}),
     ["model._component_='nonexistent.module.fn' cannot be loaded", "importable dotted path"]),
    ("optimizer_unknown_argument", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"optimizer.betaz": [0.9, 0.9]}),
     ["optimizer: AdamW.__init__() got an unexpected keyword argument 'betaz'", "fix the optimizer.* keys"]),
    ("metric_logger_missing", "duo_pretrain",
     lambda h, w, t: _pre(h, w, t, **{"metric_logger": {"_component_": "x.y"}}),
     ["metric_logger._component_='x.y' cannot be loaded"]),
    ("data_files_directory", "duo_pretrain", lambda h, w, t: _pre(h, w, t, **{"data.files": [str(t)]}),
     ["is a directory", "use a glob"]),
    ("data_cache_dir_is_a_file", "duo_pretrain",
     lambda h, w, t: _pre(h, w, t, **{"data.cache_dir": str(w["assets"]["corpus"])}),
     ["(data.cache_dir) is a file", "set data.cache_dir to a directory"]),
    ("init_weights_foo", "duo_pretrain", lambda h, w, t: _pre(h, w, t, init_weights="foo"),
     ["init_weights must be 'ema' or 'model'", "got 'foo'"]),
    ("tokenizer_path_text_file", "duo_pretrain",
     lambda h, w, t: _pre(h, w, t, **{"tokenizer.path": str(w["assets"]["corpus"])}),
     ["unrecognised tokenizer file", "(tokenizer.path / tokenizer=)"]),
    ("seq_len_longer_than_data", "duo_pretrain",
     lambda h, w, t: _pre(h, w, t, **{"data.seq_len": 100000, "model.max_seq_len": 100000}),
     ["lower the block length (data.seq_len"]),
    ("generate_dtype_fp16", "duo_generate", lambda h, w, t: _gen(h, w, t, dtype="fp16"),
     ["dtype must be fp32 or bf16", "got 'fp16'"]),
    ("generate_n_blocks_negative", "duo_generate", lambda h, w, t: _gen(h, w, t, **{"blocks.n_blocks": -1}),
     ["config key 'blocks.n_blocks' must be >= 0, got -1"]),
    ("eval_val_fraction_2", "duo_eval", lambda h, w, t: _ev(h, w, t, **{"dataset.val_fraction": 2}),
     ["config key 'dataset.val_fraction' must be < 1.0, got 2.0"]),
]
if not torch.cuda.is_available():
    TABLE += [
        ("device_cuda_without_cuda", "duo_pretrain", lambda h, w, t: _pre(h, w, t, device="cuda"),
         ["device=cuda but CUDA is not available", "set device=cpu"]),
        ("generate_device_cuda_without_cuda", "duo_generate", lambda h, w, t: _gen(h, w, t, device="cuda"),
         ["device=cuda but CUDA is not available"]),
    ]


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, trained, tmp_path, capsys, monkeypatch, h):
    name, prog, factory, must = case
    monkeypatch.delenv("DUO_DEBUG", raising=False)
    before = h.snapshot(trained["good"])
    line = h.one_line_error(prog, factory(h, trained, tmp_path), capsys)
    for s in must:
        assert s in line, (s, line)
    assert h.snapshot(trained["good"]) == before


def test_val_fraction_0_trains_and_validates_nothing(trained, tmp_path, h):
    """``data.val_fraction=0`` (what the tiny-corpus message recommends) trains, with eval_every > 0, without a
    validation split (no KeyError)."""
    s = dp.run(h.pretrain_cfg(tmp_path, trained["assets"], "v0", max_steps=2, eval_every=1, global_batch_size=2,
                              **{"data.val_fraction": 0, "data.files": [str(_tiny_corpus(trained))]}))
    assert s["steps"] == 2 and s["final_val"] is None and all(math.isfinite(x) for x in s["losses"])


def test_huge_lr_warns(trained, caplog, h, tmp_path):
    cfg = h.pretrain_cfg(tmp_path, trained["assets"], "lr", **{"optimizer.lr": 1e6})
    with caplog.at_level(logging.WARNING):
        dp.validate_config(cfg)
    assert any("optimizer.lr=1e+06 is far above the usual range" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("losses,warns", [([6.0, 6.2, 9.0, 9.5, 8.5, 9.1, 8.8], True),   # stays 1.4-1.6x up
                                          ([6.2, 10.1, 6.4, 7.9, 4.2, 4.7, 5.0], False),  # one noisy step
                                          ([6.0, 5.5, 5.0, 4.8, 4.5, 4.4, 4.2], False)])
def test_exploding_loss_warns_once(losses, warns, caplog):
    fake = SimpleNamespace(losses=[], phases=[], is_rank_zero=True, cfg=OmegaConf.create({"optimizer": {"lr": 1e6}}),
                           EXPLODE_WINDOW=50, EXPLODE_FACTOR=1.3, EXPLODE_RUN=5)
    with caplog.at_level(logging.WARNING):
        for x in losses:
            fake.losses.append(x)
            fake.phases.append("discrete")
            dp.DuoPretrainRecipe._warn_if_loss_explodes(fake)
    msgs = [r.getMessage() for r in caplog.records if "is likely far too high" in r.getMessage()]
    assert len(msgs) == (1 if warns else 0) and (not warns or "optimizer.lr=1000000.0" in msgs[0])


class SafetensorError(Exception):
    """Stands in for safetensors' Rust-side error type (not importable by name)."""


def _torch_enospc(*a, **k):
    try:  # what torch.save raised on a full file system here: the OSError, with torch's RuntimeError as context
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError:
        raise OSError(errno.ENOSPC, "No space left on device") from None


def _safetensors_enospc(*a, **k):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                          'left on device" })')


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_disk_full_is_one_line_and_resume_is_exact(writer, trained, tmp_path, capsys, monkeypatch, h):
    """ENOSPC while writing the second checkpoint (the training state through torch.save, or the weights through
    safetensors, each failing the way that library reports a full disk): one line, exit 2; the first checkpoint is
    intact and resuming from it reproduces the undisturbed losses exactly."""
    import safetensors.torch

    monkeypatch.delenv("DUO_DEBUG", raising=False)
    # one torch.save per checkpoint; two safetensors files (model, EMA) per checkpoint: fail in the second one
    target, name, ok = (torch, "save", 1) if writer == "torch.save" else (safetensors.torch, "save_file", 2)
    real, calls = getattr(target, name), []

    def fails_the_second_time(*a, **k):
        calls.append(1)
        return real(*a, **k) if len(calls) <= ok else (_torch_enospc if writer == "torch.save" else
                                                     _safetensors_enospc)()

    monkeypatch.setattr(target, name, fails_the_second_time)
    line = h.one_line_error("duo_pretrain", _pre(h, trained, tmp_path), capsys)
    assert "disk full (No space left on device)" in line and "resume=true" in line, line
    monkeypatch.setattr(target, name, real)
    d = tmp_path / "run"
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    s = dp.run(h.pretrain_cfg(tmp_path, trained["assets"], "run", resume=True))
    assert s["losses"] == trained["summary"]["losses"]


@pytest.fixture
def lm_eval_cli(monkeypatch):
    """Make this process look like lm-eval's command line (``lm_eval ...``)."""
    import lm_eval.__main__  # noqa: F401

    monkeypatch.setattr(sys, "argv", ["lm_eval"])
    monkeypatch.delenv("DUO_DEBUG", raising=False)


@pytest.mark.parametrize("args,must", [
    ("foo=1", ["unknown --model_args for duo: ['foo']", "valid:"]),
    ("weigths=ema", ["unknown --model_args for duo: ['weigths']", "weights"]),
    ("weights=best", ["weights must be 'ema' or 'raw', got 'best'"]),
])
def test_lm_eval_model_args_errors_are_one_line_on_the_cli(args, must, trained, lm_eval_cli, capsys):
    from duo_plugin.integrations.lm_eval import DuoLM

    with pytest.raises(SystemExit) as exc:
        DuoLM.create_from_arg_string(f"pretrained={trained['good'] / 'final'},{args}", {"device": "cpu"})
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("lm_eval: error:")]
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for s in must:
        assert s in lines[0], (s, lines[0])


def test_lm_eval_model_args_errors_propagate_from_the_python_api(trained):
    from duo_plugin.errors import UserError
    from duo_plugin.integrations.lm_eval import DuoLM

    with pytest.raises(ValueError, match="weights must be"):
        DuoLM.create_from_arg_string(f"pretrained={trained['good'] / 'final'},weights=best", {"device": "cpu"})
    with pytest.raises(ValueError, match="unknown --model_args for duo"):  # no SystemExit outside the CLI
        DuoLM.create_from_arg_string(f"pretrained={trained['good'] / 'final'},foo=1", {"device": "cpu"})
    assert issubclass(UserError, ValueError)


@pytest.mark.slow
@pytest.mark.parametrize("cli,args,task,must", [
    ("duo-eval", "foo=1", "duo_shakespeare_ppl", "unknown --model_args for duo: ['foo']"),
    ("duo-eval", "weights=best", "duo_shakespeare_ppl", "weights must be 'ema' or 'raw', got 'best'"),
    ("duo-eval", "", "no_such_task", "Tasks not found: no_such_task"),
    ("lm_eval", "weights=best", "duo_shakespeare_ppl", "lm_eval: error: weights must be 'ema' or 'raw'"),
])
def test_eval_cli_errors_exit_2(cli, args, task, must, trained, tmp_path):
    """The real command lines (``duo-eval``; lm-eval's own ``python -m lm_eval --model duo``): one line, exit status
    2, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DUO_DEBUG", None)
    ma = f"pretrained={trained['good'] / 'final'}" + (f",{args}" if args else "")
    mod = "duo_plugin.integrations.lm_eval_cli" if cli == "duo-eval" else "lm_eval"
    cmd = [sys.executable, "-m", mod, "--model", "duo", "--model_args", ma, "--tasks", task, "--device", "cpu"]
    if cli == "lm_eval":
        cmd += ["--include_path", str(REPO / "duo_plugin" / "lm_eval_tasks")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    errs = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert p.returncode == 2 and len(errs) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert must in errs[0], errs[0]
