"""A model folder is data on every loader path: each payload below is planted in a copy of a trained model folder and
loaded through duo_generate, duo_eval, the lm-eval backend (``lm_eval --model duo``), ``duo_distill init_from=`` and
``duo_pretrain init_from=``.  Each must stop with ONE line naming the refused field, exit status 2, no canary (no code
from the folder, no dotted path resolved: ``tempfile.mkstemp`` would leave a file in the watched temp dir), and the
earlier run's files unchanged.  The folder is on ``sys.path`` during the in-process loads, as the working directory is
under ``tune run`` with ``checkpoint=.``, so a resolved dotted path WOULD import the package shipped in the folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "duo_plugin" / "configs" / "duo"

CANARY_PKG = "duo_canary_pkg"
SP_BUILDER = "torchtune.models.llama2.llama2_tokenizer"


def _plant_package(folder: Path, canary: Path, name: str = CANARY_PKG) -> None:
    """A package inside the folder whose import (and whose ``make``) leaves the canary file."""
    pkg = folder / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"open({str(canary)!r}, 'a').write('imported\\n')\n"
        f"def make(*a, **k):\n    open({str(canary)!r}, 'a').write('called\\n')\n")


def _tt_descriptor(**kwargs) -> dict:
    return {"type": "torchtune", "component": SP_BUILDER, "kwargs": {"path": "tokenizer.model", **kwargs}}


def _edit_json(f: Path, edit) -> None:
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


def _set_descriptor(folder: Path, desc: dict) -> None:
    (folder / "tokenizer" / "duo_tokenizer.json").write_text(json.dumps(desc))


# payload id -> (how to plant it in a copy of good/final, substring the one error line must contain)
PAYLOADS = {
    "prompt_template_into_shipped_package": (
        lambda d: _set_descriptor(d, _tt_descriptor(prompt_template=f"{CANARY_PKG}.make")),
        "refusing argument 'prompt_template'"),
    "prompt_template_tempfile_mkstemp": (
        lambda d: _set_descriptor(d, _tt_descriptor(prompt_template="tempfile.mkstemp")),
        "refusing argument 'prompt_template'"),
    "unknown_builder_argument": (
        lambda d: _set_descriptor(d, _tt_descriptor(tokenizer_cls=f"{CANARY_PKG}.make")),
        "refusing argument 'tokenizer_cls'"),
    "file_argument_outside_folder": (
        lambda d: _set_descriptor(d, {**_tt_descriptor(), "kwargs": {"path": "../../tokenizer.model"}}),
        "must be a file name inside the tokenizer folder"),
    "dotted_path_in_token_field": (
        lambda d: _set_descriptor(d, {**json.loads((d / "tokenizer" / "duo_tokenizer.json").read_text()),
                                      "type": "hf", "bos_token": "os.system"}),
        "refusing field bos_token='os.system'"),
    "unexpected_descriptor_field": (
        lambda d: _set_descriptor(d, {**json.loads((d / "tokenizer" / "duo_tokenizer.json").read_text()),
                                      "loader": f"{CANARY_PKG}.make"}),
        "unexpected field 'loader'"),
    "dotted_path_in_builder_kwargs": (
        lambda d: _edit_json(d / "duo_config.json", lambda c: c["builder_kwargs"].update(attn=f"{CANARY_PKG}.make")),
        f"refusing field builder_kwargs.attn='{CANARY_PKG}.make'"),
    "dotted_path_in_metadata": (
        lambda d: _edit_json(d / "duo_config.json", lambda c: c["metadata"].update(objective="subprocess.getoutput")),
        "refusing field objective='subprocess.getoutput'"),
    "component_key_in_metadata": (
        lambda d: _edit_json(d / "duo_config.json",
                             lambda c: c["metadata"].update(sampler={"_component_": f"{CANARY_PKG}.make"})),
        "refusing field sampler.'_component_'"),
}


def _loaders(h, w, folder: Path, out: Path):
    """loader id -> (prog, callable) loading ``folder`` the way a user would."""
    from omegaconf import OmegaConf

    from duo_plugin.recipes import duo_distill as dd
    from duo_plugin.recipes import duo_eval as de
    from duo_plugin.recipes import duo_generate as dg
    from duo_plugin.recipes import duo_pretrain as dp

    corpus = w["assets"]["corpus"]

    def lm_eval():
        from duo_plugin.integrations.lm_eval import DuoLM

        DuoLM.create_from_arg_string(f"pretrained={folder},device=cpu")

    small = {"data.seq_len": 16, "global_batch_size": 8, "max_steps": 2, "distill.rounds": 1,
             "distill.steps_per_round": 2, "eval.num_samples": 1, "progress_bar": False,
             "eval.scorer.type": "none"}  # the payload is in init_from; no Gen PPL scorer needed
    return {
        "duo_generate": ("duo_generate", lambda: dg.run(h.generate_cfg(folder, out / "gen"))),
        "duo_eval": ("duo_eval", lambda: de.run(h.eval_cfg(folder, out / "eval", corpus))),
        "lm_eval": ("lm_eval", lm_eval),
        "duo_distill": ("duo_distill", lambda: dd.run(h.distill_cfg(folder, out / "distill", corpus, **small))),
        "duo_pretrain": ("duo_pretrain", lambda: dp.run(OmegaConf.merge(
            h.pretrain_cfg(out, w["assets"], "pretrain", max_steps=2),
            {"init_from": str(folder), "tokenizer": {"path": str(folder / "tokenizer")}}))),
    }


LOADERS = ("duo_generate", "duo_eval", "lm_eval", "duo_distill", "duo_pretrain")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_payload_is_refused_on_every_loader(payload, loader, trained, tmp_path, capsys, monkeypatch, h):
    monkeypatch.delenv("DUO_DEBUG", raising=False)
    folder = tmp_path / "model"
    shutil.copytree(trained["good"] / "final", folder)
    canary = tmp_path / "CANARY"
    _plant_package(folder, canary)
    plant, must = PAYLOADS[payload]
    plant(folder)
    monkeypatch.syspath_prepend(str(folder))  # `tune run ... checkpoint=.`: the folder is importable
    watched = tmp_path / "tempdir"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))  # tempfile.mkstemp() called by name would land here
    before = h.snapshot(trained["good"])
    prog, fn = _loaders(h, trained, folder, tmp_path / "out")[loader]
    line = h.one_line_error(prog, fn, capsys)
    assert must in line, line
    assert "model folder is data" in line or "inside the tokenizer folder" in line, line
    assert not canary.exists(), canary.read_text()
    assert list(watched.iterdir()) == [], "a dotted path from the folder was resolved and called"
    assert CANARY_PKG not in sys.modules
    assert h.snapshot(trained["good"]) == before


def test_metadata_tokenizer_descriptor_is_checked_too(trained, tmp_path, capsys, monkeypatch, h):
    """No tokenizer/ folder: duo_generate falls back to duo_config.json's metadata.tokenizer; the same allow-list."""
    from duo_plugin.recipes import duo_generate as dg

    folder = tmp_path / "model"
    shutil.copytree(trained["good"] / "final", folder)
    shutil.rmtree(folder / "tokenizer")
    canary = tmp_path / "CANARY"
    _plant_package(folder, canary)
    monkeypatch.syspath_prepend(str(folder))
    _edit_json(folder / "duo_config.json",
               lambda c: c["metadata"].update(tokenizer=_tt_descriptor(prompt_template=f"{CANARY_PKG}.make")))
    line = h.one_line_error("duo_generate", lambda: dg.run(h.generate_cfg(folder, tmp_path / "g")), capsys)
    assert "refusing argument 'prompt_template'" in line and not canary.exists()


def test_hf_config_json_with_code_keys_is_refused(trained, tmp_path, capsys, h):
    """``duo_pretrain init_from=<HF dir>``: config.json is data too (``auto_map`` names remote code)."""
    from omegaconf import OmegaConf

    from duo_plugin.recipes import duo_pretrain as dp

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 320,
                                                    "auto_map": {"AutoModel": f"{CANARY_PKG}.make"}}))
    cfg = OmegaConf.merge(h.pretrain_cfg(trained["root"], trained["assets"], "hf_init"), {"init_from": str(folder)})
    line = h.one_line_error("duo_pretrain", lambda: dp.run(cfg), capsys)
    assert "refusing field 'auto_map'" in line and "config.json" in line


def test_saved_torchtune_tokenizer_is_self_contained_and_reloads(trained, tmp_path):
    """The allow-list does not break the legitimate path: a torchtune tokenizer saved into a folder copies its file
    and names it relatively; the folder moved elsewhere still loads and encodes identically."""
    from duo_plugin.data.tokenizers import load_tokenizer
    from duo_plugin.integrations.torchtune_tokenizer import TorchtuneTokenizer

    sp = trained["assets"]["tokenizer"] / "tokenizer.model"
    tok = TorchtuneTokenizer.from_config(SP_BUILDER, path=str(sp), prompt_template=None)
    tok.save(tmp_path / "a")
    desc = json.loads((tmp_path / "a" / "duo_tokenizer.json").read_text())
    assert desc["kwargs"] == {"path": "tokenizer.model"}  # prompt_template is not recorded; the path is relative
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    again = load_tokenizer(tmp_path / "b")
    assert again.encode("the king and the queen") == tok.encode("the king and the queen")
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"replaced")
    from duo_plugin.errors import UserError

    with pytest.raises(UserError, match="does not match the sha256"):
        load_tokenizer(tmp_path / "b")


def test_checkpoint_dot_with_a_shadowing_package_runs_no_folder_code(trained, tmp_path):
    """The real command from inside the folder (``python -m`` puts the working directory first on sys.path): a
    package named like a module the loader imports lazily (``safetensors``) ships in the folder.  The entry point
    drops the working directory from sys.path, so generation works and the planted package never runs.  (Modules a
    recipe imports at its top, before any of our code runs, are Python's own ``python -m`` behaviour: ``tune run``
    appends the working directory after site-packages instead, and ``python -P`` leaves it out.)"""
    folder = tmp_path / "model"
    shutil.copytree(trained["good"] / "final", folder)
    canary = tmp_path / "CANARY"
    _plant_package(folder, canary, name="safetensors")  # imported lazily, after the entry point started
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("DUO_DEBUG", None)
    cmd = [sys.executable, "-m", "duo_plugin.recipes.duo_generate", "--config", str(CONFIGS / "generate.yaml"),
           "checkpoint=.", f"output_dir={tmp_path / 'out'}", "steps=2", "num_samples=1", "batch_size=1",
           "progress_bar=false"]
    p = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not canary.exists(), "code shipped in the model folder ran"
    assert (tmp_path / "out" / "samples.jsonl").is_file()


def test_drop_cwd_from_sys_path_rules(tmp_path, monkeypatch):
    """Generation/evaluation entry points always drop the working directory; training recipes drop it when it is a
    model/tokenizer folder or inside init_from / tokenizer.path, and keep it otherwise (``tune run`` puts it there so
    a config's ``_component_`` can name the user's own code)."""
    from duo_plugin.runtime import drop_cwd_from_sys_path

    project, folder = tmp_path / "project", tmp_path / "model"
    project.mkdir()
    folder.mkdir()
    (folder / "duo_config.json").write_text("{}")
    base = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() not in (project, folder)]
    for cwd, kw, dropped in ((project, {}, True), (project, {"only_if_data": True}, False),
                             (folder, {"only_if_data": True}, True),
                             (project, {"only_if_data": True, "data_dirs": (str(project),)}, True)):
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "path", ["", str(cwd), *base])
        removed = drop_cwd_from_sys_path(**kw)
        assert (removed == ["", str(cwd)]) == dropped and (str(cwd) in sys.path) != dropped, (cwd, kw, removed)
