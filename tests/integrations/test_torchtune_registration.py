"""torchtune registration: pure config assignment, the CLI against a fake recipe tree (in process),
and the real installed package through the start-up hook (subprocesses)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

torchtune = pytest.importorskip("torchtune")

from duo_plugin.integrations import torchtune as tt_int  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(cmd, cwd, timeout=240):
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- pure assignment
def test_assign_configs_table():
    names = [
        "duo/tiny_cpu", "duo/owt_small", "duo/lm1b_small", "duo/llama_adapt_1b", "duo/qwen_adapt",
        "duo/distill_owt", "duo/generate", "duo/generate_tiny", "duo/eval_zero_shot", "duo/other_thing",
    ]
    all_recipes = ["duo_pretrain", "duo_distill", "duo_generate", "duo_eval"]
    table = tt_int.assign_configs(names, all_recipes)
    assert table == {
        "duo_pretrain": ["duo/tiny_cpu", "duo/owt_small", "duo/lm1b_small", "duo/llama_adapt_1b",
                         "duo/qwen_adapt", "duo/other_thing"],
        "duo_distill": ["duo/distill_owt"],
        "duo_generate": ["duo/generate", "duo/generate_tiny"],
        "duo_eval": ["duo/eval_zero_shot"],
    }
    # every config lands in exactly one recipe
    flat = [c for v in table.values() for c in v]
    assert sorted(flat) == sorted(names)
    # recipes whose file is missing get nothing and their configs are dropped, not re-homed
    partial = tt_int.assign_configs(names, ["duo_pretrain"])
    assert set(partial) == {"duo_pretrain"} and "duo/distill_owt" not in partial["duo_pretrain"]


# ----------------------------------------------------------------------------- fake tree, in process
@pytest.fixture
def fake_tree(tmp_path, monkeypatch):
    from torchtune import _recipe_registry as reg

    recipes = tmp_path / "pkg" / "recipes"
    configs = tmp_path / "pkg" / "configs" / "duo"
    recipes.mkdir(parents=True)
    configs.mkdir(parents=True)
    (recipes / "duo_pretrain.py").write_text(
        "import sys\nprint('FAKE_RECIPE_ARGV', sys.argv)\n"
    )
    (recipes / "duo_generate.py").write_text("print('GEN')\n")
    (configs / "tiny_cpu.yaml").write_text("seed: 3\nbatch_size: 2\n")
    (configs / "generate_tiny.yaml").write_text("steps: 4\n")
    (configs / "distill_owt.yaml").write_text("x: 1\n")  # duo_distill.py absent -> dropped
    saved = list(reg._ALL_RECIPES)
    reg._ALL_RECIPES[:] = [r for r in saved if not tt_int._is_ours(r)]  # drop the real entries (hook)
    monkeypatch.setattr(tt_int, "RECIPES_DIR", recipes.resolve())
    monkeypatch.setattr(tt_int, "CONFIGS_DIR", (tmp_path / "pkg" / "configs").resolve())
    yield recipes, configs
    reg._ALL_RECIPES[:] = saved


def _tune(monkeypatch, capsys, *argv):
    from torchtune._cli.tune import TuneCLIParser

    monkeypatch.setattr(sys, "argv", ["tune", *argv])
    p = TuneCLIParser()
    p.run(p.parse_args())
    return capsys.readouterr().out


def test_register_fake_tree_cli(fake_tree, monkeypatch, capsys, tmp_path):
    from torchtune import _recipe_registry as reg

    recipes, configs = fake_tree
    n0 = len(reg._ALL_RECIPES)
    assert tt_int.register() == ["duo_generate", "duo_pretrain"]
    assert tt_int.register() == ["duo_generate", "duo_pretrain"]  # idempotent
    assert len(reg._ALL_RECIPES) == n0 + 2
    ours = {r.name: r for r in reg._ALL_RECIPES if tt_int._is_ours(r)}
    assert [c.name for c in ours["duo_pretrain"].configs] == ["duo/tiny_cpu"]
    assert [c.name for c in ours["duo_generate"].configs] == ["duo/generate_tiny"]
    assert ours["duo_pretrain"].supports_distributed and not ours["duo_generate"].supports_distributed
    for r in ours.values():
        assert Path(r.file_path).is_absolute() and Path(r.file_path).is_file()
        for c in r.configs:
            assert Path(c.file_path).is_absolute() and Path(c.file_path).is_file()

    # a YAML added later shows up on the next register(), still without duplicates
    (configs / "owt_small.yaml").write_text("seed: 1\n")
    tt_int.register()
    assert len(reg._ALL_RECIPES) == n0 + 2
    ours = {r.name: r for r in reg._ALL_RECIPES if tt_int._is_ours(r)}
    assert [c.name for c in ours["duo_pretrain"].configs] == ["duo/owt_small", "duo/tiny_cpu"]

    out = _tune(monkeypatch, capsys, "ls")
    assert "duo_pretrain" in out and "duo/tiny_cpu" in out and "duo/generate_tiny" in out
    assert "duo/distill_owt" not in out
    out = _tune(monkeypatch, capsys, "cat", "duo/tiny_cpu")
    assert "batch_size: 2" in out
    monkeypatch.chdir(tmp_path)
    _tune(monkeypatch, capsys, "cp", "duo/tiny_cpu", "my.yaml")
    assert (tmp_path / "my.yaml").read_text() == (configs / "tiny_cpu.yaml").read_text()
    out = _tune(monkeypatch, capsys, "run", "duo_pretrain", "--config", "duo/tiny_cpu", "seed=5")
    assert "FAKE_RECIPE_ARGV" in out and str(configs / "tiny_cpu.yaml") in out and "seed=5" in out


def test_register_skips_foreign_name_clash(fake_tree, capsys):
    from torchtune._recipe_registry import Recipe, _ALL_RECIPES

    _ALL_RECIPES.append(Recipe(name="duo_pretrain", file_path="somebody_else.py", configs=[],
                               supports_distributed=False))
    assert tt_int.register() == ["duo_generate"]
    assert "already has a recipe" in capsys.readouterr().err
    assert [r.file_path for r in _ALL_RECIPES if r.name == "duo_pretrain"] == ["somebody_else.py"]


# ----------------------------------------------------------------------------- real install
def test_startup_hook_is_lazy_and_installed(tmp_path):
    site = Path(tt_int.__file__)  # editable or wheel install: the .pth sits in site-packages
    import site as _site

    pth = [Path(d) / "duo_plugin_autoregister.pth" for d in _site.getsitepackages()]
    assert any(p.is_file() for p in pth), f"start-up hook not installed in {_site.getsitepackages()}"
    start = [Path(d) / "duo_plugin_autoregister.start" for d in _site.getsitepackages()]
    assert any(p.read_text().strip() == "duo_plugin._autoregister:install" for p in start if p.is_file())
    code = (
        "import sys; from duo_plugin import _autoregister as a;"
        "print(any(isinstance(f, a._Finder) for f in sys.meta_path),"
        " 'torch' in sys.modules, 'torchtune' in sys.modules, 'lm_eval' in sys.modules)"
    )
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False", "False", "False"], (r.stdout, r.stderr)
    del site


def test_hook_never_breaks_torchtune(tmp_path):
    # a registration that raises must leave torchtune importable and usable
    code = (
        "import duo_plugin.integrations.torchtune as t\n"
        "def boom(): raise RuntimeError('kaboom')\n"
        "t.register = boom\n"
        "from torchtune._recipe_registry import get_all_recipes\n"
        "print(len(get_all_recipes()) > 10)\n"
    )
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "True", (r.stdout, r.stderr)
    assert "kaboom" in r.stderr


def _real_recipes():
    return [n for n in tt_int.RECIPE_CONFIG_PREFIXES if (tt_int.RECIPES_DIR / f"{n}.py").is_file()]


@pytest.mark.slow
def test_tune_ls_cat_cp_real_package(tmp_path):
    """Plain `tune` (no wrapper) lists our recipes/configs through the .pth hook; duo-tune too."""
    recipes = _real_recipes()
    configs = tt_int.discover_configs()
    if not recipes:
        pytest.skip("no duo_plugin/recipes/duo_*.py exists yet")
    r = _run([str(BIN / "tune"), "ls"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in recipes:
        assert name in r.stdout
    table = tt_int.assign_configs([n for n, _ in configs], recipes)
    registered = [c for cs in table.values() for c in cs]
    for c in registered:
        assert c in r.stdout
    r2 = _run([str(BIN / "duo-tune"), "ls"], cwd=tmp_path)
    assert r2.returncode == 0 and r2.stdout == r.stdout
    if registered:
        cfg = registered[0]
        path = dict(configs)[cfg]
        r = _run([str(BIN / "tune"), "cat", cfg], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[0] in path.read_text()
        r = _run([str(BIN / "tune"), "cp", cfg, "copied.yaml"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "copied.yaml").read_text() == path.read_text()


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0 and "No module named 'hatchling'" in (r.stdout + r.stderr):
        r = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(REPO)],
            capture_output=True, text=True, timeout=600,
        )
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = tmp_path.glob("duo_plugin-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    assert "duo_plugin_autoregister.pth" in names and "duo_plugin_autoregister.start" in names
    for p in tt_int.RECIPES_DIR.glob("*.py"):
        assert f"duo_plugin/recipes/{p.name}" in names
    for _, p in tt_int.discover_configs():
        assert "duo_plugin/" + p.relative_to(tt_int.PACKAGE_DIR).as_posix() in names
    tasks = tt_int.PACKAGE_DIR / "lm_eval_tasks"
    for p in tasks.rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts:
            assert "duo_plugin/" + p.relative_to(tt_int.PACKAGE_DIR).as_posix() in names
    ep = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(whl).read(ep[0]).decode()
    assert "[lm_eval.models]" in text and "duo-tune" in text and "duo-eval" in text


@pytest.mark.slow
def test_tune_run_by_name_generate(tmp_path):
    """`tune run duo_generate --config duo/generate ...` resolves by name through the hook and runs."""
    if "duo_generate" not in _real_recipes() or "duo/generate" not in dict(tt_int.discover_configs()):
        pytest.skip("duo_generate recipe / duo/generate config not present")
    ckpt_mod = pytest.importorskip("duo_plugin.models.checkpoint")
    from duo_plugin.data.tokenizers import train_sentencepiece
    from duo_plugin.models.dit import duo_dit_tiny

    src = tmp_path / "c.txt"
    src.write_text("\n".join(f"line {i} of a tiny corpus with some words" for i in range(50)) + "\n")
    tok = train_sentencepiece([src], 300, tmp_path / "tok", hard_vocab_limit=False)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ck = tmp_path / "ckpt"
    ckpt_mod.save_pretrained(duo_dit_tiny(int(tok.vocab_size), 16), ck)
    tok.save(ck / "tokenizer")
    r = _run([str(BIN / "tune"), "run", "duo_generate", "--config", "duo/generate", f"checkpoint={ck}",
              "weights=model", f"output_dir={tmp_path / 'out'}", "num_samples=2", "batch_size=2", "steps=2",
              "seq_len=8"], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "out" / "samples.jsonl").is_file()
