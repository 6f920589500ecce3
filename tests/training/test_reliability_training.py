"""Reliability of the training library: parameter names under wrappers (EMA / checkpoints), the output-dir guard and
lock, typed config values, checkpoint loading errors naming the file, fallback to the previous good checkpoint and
NaN-weight detection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from duo_plugin.errors import UserError, one_line, user_errors
from duo_plugin.training import checkpointing as ck
from duo_plugin.training import run_dir
from duo_plugin.training.config_values import PRETRAIN_TYPES, coerce_config
from duo_plugin.training.ema import EMA
from duo_plugin.training.recipe_utils import ConfigError


# ------------------------------------------------------------------------------------------------ parameter names
def _tiny_llama_denoiser():
    from duo_plugin.models.builders import duo_llama3_2

    torch.manual_seed(0)
    return duo_llama3_2(vocab_size=48, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=16, max_seq_len=16,
                        intermediate_dim=32)


def test_canonical_name_strips_every_wrapper():
    assert ck.canonical_name("decoder.layers.0._checkpoint_wrapped_module.attn.q_proj.weight") == \
        "decoder.layers.0.attn.q_proj.weight"
    assert ck.canonical_name("_orig_mod.blocks.1._fsdp_wrapped_module.w") == "blocks.1.w"
    assert ck.canonical_name("blocks.0.attn.w") == "blocks.0.attn.w"


def test_ema_with_activation_checkpointing_saves_and_reloads(tmp_path):
    """EMA made from an activation-checkpointed model: its shadows are saved by save_pretrained (on main: ValueError
    'ema_state_dict has keys the model does not have: [...._checkpoint_wrapped_module...]') and load back equal to the
    closed-form EMA d*p0 + (1-d)*p1, into a plain model too."""
    from torchtune import training as tt

    from duo_plugin.models.checkpoint import load_pretrained, save_pretrained

    m = _tiny_llama_denoiser()
    tt.set_activation_checkpointing(m, auto_wrap_policy={type(m.decoder.layers[0])})
    assert any("_checkpoint_wrapped_module" in n for n, _ in m.named_parameters())
    p0 = {k: v.clone() for k, v in m.state_dict().items()}
    ema = EMA(m, decay=0.75, use_warmup=False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    ema.update(m)
    save_pretrained(m, tmp_path / "dir", ema_state_dict=ema.full_state_dict(m)["shadow"])
    loaded = load_pretrained(tmp_path / "dir", weights="ema")
    for k, v in loaded.state_dict().items():
        if k in p0 and p0[k].is_floating_point() and "rope" not in k and "cache" not in k:
            torch.testing.assert_close(v, 0.75 * p0[k] + 0.25 * (p0[k] + 0.5), rtol=1e-6, atol=1e-6)
    # the EMA state moves between wrapped and unwrapped models (checkpoint written with AC on, resumed with AC off)
    plain = _tiny_llama_denoiser()
    e2 = EMA(plain, decay=0.75, use_warmup=False)
    e2.load_full_state_dict(ema.full_state_dict(m), plain, "cpu")
    assert set(e2.shadow) == {n for n, _ in plain.named_parameters()}
    e2.copy_to(plain)  # names resolve on the plain model
    e3 = EMA(m, decay=0.75, use_warmup=False)
    e3.load_state_dict(e2.state_dict())
    with e3.swap_into(m):
        pass


def test_ema_of_compiled_model_uses_plain_names():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    wrapped = torch.compile(lin)  # OptimizedModule: parameters named _orig_mod.*
    assert all(n.startswith("_orig_mod.") for n, _ in wrapped.named_parameters())
    ema = EMA(wrapped, decay=0.5)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    ema.copy_to(lin)


# ------------------------------------------------------------------------------------------------ run dir
def test_run_dir_rules(tmp_path):
    out = tmp_path / "run"
    assert run_dir.check_output_dir(out, False) is None  # does not exist: fresh
    out.mkdir()
    assert run_dir.check_output_dir(out, False) is None  # empty: fresh
    (out / "summary.json").write_text("{}")
    with pytest.raises(UserError, match=r"output_dir=.*not empty.*resume=true.*overwrite=true"):
        run_dir.check_output_dir(out, False)
    with pytest.raises(UserError, match=r"resume=true but .*checkpoints holds no checkpoint.*resume=auto"):
        run_dir.check_output_dir(out, True)
    assert run_dir.check_output_dir(out, "auto") is None  # auto: nothing to resume, start fresh
    keep = out / "notes.txt"
    keep.write_text("mine")
    (out / "checkpoints").mkdir()
    assert run_dir.prepare_output_dir(out, False, overwrite=True) is None
    assert not (out / "summary.json").exists() and not (out / "checkpoints").exists() and keep.read_text() == "mine"
    step = ck.save_step_checkpoint(out, 3, writer=lambda d: (d / "training_state.pt").write_bytes(b"x"))
    assert run_dir.check_output_dir(out, True) == step and run_dir.check_output_dir(out, "auto") == step
    assert run_dir.check_output_dir(out, str(step)) == step
    with pytest.raises(UserError, match="not a checkpoint directory"):
        run_dir.check_output_dir(out, str(out))
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        run_dir.check_output_dir(f, False)
    with pytest.raises(UserError, match="not writable"):
        run_dir.prepare_output_dir(f / "sub", False)


def test_run_dir_lock_refuses_a_second_writer_and_survives_sigkill(tmp_path):
    """A process holding the lock (e.g. a torch-elastic worker that outlived its launcher) blocks a second run; the OS
    releases the lock when that process is SIGKILLed."""
    tmp_path.mkdir(exist_ok=True)
    code = ("import sys, time; from duo_plugin.training.run_dir import RunDirLock; "
            f"RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another run \(pid {proc.pid}"):
            run_dir.RunDirLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with run_dir.RunDirLock(tmp_path):
        pass


# ------------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("key,value,match", [
    ("max_steps", "abc", r"'max_steps' must be an integer, got 'abc'"),
    ("global_batch_size", 31.9, r"'global_batch_size' must be an integer, got 31.9"),
    ("optimizer.lr", "fast", r"'optimizer.lr' must be a number, got 'fast'"),
    ("global_batch_size", 0, r"'global_batch_size' must be >= 1"),
    ("compile", "maybe", r"'compile' must be true or false"),
])
def test_typed_config_values_name_the_key(key, value, match):
    cfg = OmegaConf.create({"max_steps": 5, "global_batch_size": 8, "optimizer": {"lr": 1e-3}})
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError, match=match):
        coerce_config(cfg, PRETRAIN_TYPES)


def test_typed_config_values_convert_valid_strings():
    cfg = OmegaConf.create({"max_steps": "50", "global_batch_size": 32.0, "optimizer": {"lr": "3e-4"}})
    coerce_config(cfg, PRETRAIN_TYPES)
    assert (cfg.max_steps, cfg.global_batch_size, cfg.optimizer.lr) == (50, 32, 3e-4)
    assert type(cfg.max_steps) is int and type(cfg.optimizer.lr) is float


# ------------------------------------------------------------------------------------------------ checkpoints
def test_truncated_training_state_names_the_file(tmp_path):
    p = tmp_path / "training_state.pt"
    ck.save_training_state(p, {"step": 1, "w": torch.zeros(1000)})
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(UserError, match=r"training_state.pt cannot be read .*truncated or corrupt"):
        ck.load_training_state(p)


def test_load_first_good_falls_back_with_a_warning(tmp_path):
    good, bad = tmp_path / "step_00000002", tmp_path / "step_00000004"

    def load(path):
        if path == bad:
            raise UserError(f"{path} cannot be read")
        return "ok"

    with pytest.warns(UserWarning, match=r"step_00000004 is unusable .*falling back .*step_00000002"):
        assert ck.load_first_good([bad, good], load) == (good, "ok")
    with pytest.raises(UserError, match="step_00000004"), pytest.warns(UserWarning, match="no earlier checkpoint"):
        ck.load_first_good([bad], load)


def test_check_finite_reports_a_corrupt_checkpoint():
    ck.check_finite({"w": torch.ones(3)}, "ckpt")
    with pytest.raises(UserError, match=r"ckpt: weight 'w' holds NaN/Inf .*checkpoint is corrupt"):
        ck.check_finite({"w": torch.tensor([1.0, float("nan")])}, "ckpt")


# ------------------------------------------------------------------------------------------------ user errors
def test_user_errors_one_line_exit_2_and_debug_traceback(capsys, monkeypatch):
    monkeypatch.delenv("DUO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        with user_errors("duo_x"):
            raise ValueError("cannot resume: keys differ:\n  seed: 1 vs 2\nset them back")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("duo_x: error: cannot resume: keys differ:; seed: 1 vs 2; set them")
    monkeypatch.setenv("DUO_DEBUG", "1")
    with pytest.raises(ValueError):
        with user_errors("duo_x"):
            raise ValueError("boom")
    with pytest.raises(TypeError):  # a bug keeps its traceback
        with user_errors("duo_x"):
            raise TypeError("bug")
    assert one_line(FileNotFoundError(2, "No such file", "/x/y")) == "FileNotFoundError: [Errno 2] No such file: '/x/y'"


def test_inputs_inside_output_dir_do_not_count_as_an_earlier_run(tmp_path):
    """tiny_cpu keeps its tokenizer and data cache in ${output_dir}: they are inputs, not an earlier run."""
    out = tmp_path / "run"
    (out / "tokenizer").mkdir(parents=True)
    (out / "cache").mkdir()
    inputs = (str(out / "tokenizer"), str(out / "cache"))
    assert run_dir.check_output_dir(out, False, inputs=inputs) is None
    (out / "final").mkdir()
    with pytest.raises(UserError, match=r"not empty \(final\)"):
        run_dir.check_output_dir(out, False, inputs=inputs)
