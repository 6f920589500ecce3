"""Every command block of README.md (and docs/*.md blocks marked ``<!-- runnable -->``) works as written.

Commands are the lines of fenced ``bash`` blocks (backslash continuations joined; the trailing ``# ...`` comment is
the line's note).  A note carrying ``[gpu]`` or ``[hub]`` marks a command that needs a GPU / the Hugging Face hub /
external weights: it is checked for syntax and config validity only (the config loads, the overrides merge, the
recipe's ``validate_config`` accepts it; lm-eval task names exist).  ``[long]`` marks whole-workflow commands (the
demo, the test suite, installs, benchmarks) that are checked for existence only.  Every other command is RUN, in a
scratch directory whose ``outputs/demo`` holds a Duo model trained in this session by the README's own first
training command (and ``outputs/demo_ar`` an AR one), with tiny overrides appended (few steps/samples/blocks) and
the documented placeholders substituted: ``<model dir>`` -> ``outputs/demo/final``, ``<AR model dir>`` ->
``outputs/demo_ar/final``, ``<text file>`` -> a small text file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("gpu", "hub", "long")
PLACEHOLDERS = {"<model dir>": "outputs/demo/final", "<AR model dir>": "outputs/demo_ar/final",
                "<text file>": "corpus.txt"}
pytestmark = pytest.mark.slow


def _strip_comment(line: str) -> tuple[str, str]:
    """(command, comment): the first ``#`` outside quotes that starts a word begins the comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def command_blocks(text: str, only_marked: bool) -> list[str]:
    blocks, lines, inside, marked = [], text.splitlines(), False, False
    cur: list[str] = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not inside and s.startswith("```"):
            lang = s[3:].strip()
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marked = prev == "<!-- runnable -->"
            inside, cur = True, []
            keep = lang in ("bash", "sh", "shell") and (marked or not only_marked)
            cur = [] if keep else None
        elif inside and s.startswith("```"):
            inside = False
            if cur is not None:
                blocks.append("\n".join(cur))
        elif inside and cur is not None:
            cur.append(line)
    return blocks


def commands(text: str, only_marked: bool = False) -> list[tuple[str, str]]:
    """``[(command, note)]`` of the text's command blocks, continuation lines joined."""
    out = []
    for block in command_blocks(text, only_marked):
        pending, notes = "", []
        for raw in block.splitlines():
            cmd, note = _strip_comment(raw)
            if note:
                notes.append(note)
            if cmd.endswith("\\"):
                pending += cmd[:-1].strip() + " "
                continue
            full = (pending + cmd.strip()).strip()
            pending = ""
            if full:
                out.append((full, " ".join(notes)))
            notes = []
    return out


def all_commands() -> list[tuple[str, str, str]]:
    found = [("README.md", c, n) for c, n in commands((ROOT / "README.md").read_text())]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        found += [(f"docs/{doc.name}", c, n) for c, n in commands(doc.read_text(), only_marked=True)]
    return found


def tags_of(note: str) -> set[str]:
    return {t for t in TAGS if f"[{t}]" in note}


# ------------------------------------------------------------------------------------------------ parsing (fast)
def test_parser_on_a_known_block():
    md = ("x\n```bash\nfoo a=1 \\\n    b='#x'   # note [gpu]\nbar  # plain\n```\n```python\nnot_me()\n```\n"
          "<!-- runnable -->\n```bash\nbaz\n```\n")
    assert commands(md) == [("foo a=1 b='#x'", "note [gpu]"), ("bar", "plain"), ("baz", "")]
    assert commands(md, only_marked=True) == [("baz", "")]


@pytest.mark.parametrize("where,cmd,note", all_commands(), ids=lambda v: str(v)[:60])
def test_placeholders_are_documented(where, cmd, note):
    """Only documented placeholders may appear in commands that run."""
    if tags_of(note):
        return
    left = re.findall(r"<[^<>]*>", cmd)
    assert not [p for p in left if p not in PLACEHOLDERS], f"{where}: undocumented placeholder in {cmd!r}"
    assert "..." not in cmd, f"{where}: '...' in a runnable command: {cmd!r}"


# ------------------------------------------------------------------------------------------------ running
ENV_KEYS = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
TINY = {
    "duo_pretrain": "max_steps=4 eval_every=4 eval_max_batches=1 checkpoint.every=2 progress_bar=false "
                    "max_wall_s=null",
    "duo_generate": "num_samples=2 batch_size=2 steps=4 progress_bar=false",
    "duo_eval": "max_blocks=4 batch_size=4 progress_bar=false",
    "duo_distill": "distill.rounds=1 distill.steps_per_round=2 eval.num_samples=2 eval.batch_size=2 "
                   "'eval.steps=[2]' 'eval.samplers=[greedy]' checkpoint.every=2 progress_bar=false "
                   "output_dir=outputs/distill_test",
}


def _env():
    env = dict(os.environ, **ENV_KEYS)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: str, cwd: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"command failed ({p.returncode}): {cmd}\n--- stderr tail\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch cwd with outputs/demo (Duo) and outputs/demo_ar (AR) trained here by `tune run duo_pretrain`."""
    ws = tmp_path_factory.mktemp("readme")
    base = "tune run duo_pretrain --config duo/tiny_cpu"
    _run(f"{base} max_steps=6 eval_every=6 eval_max_batches=1 checkpoint.every=3 progress_bar=false max_wall_s=null",
         ws)
    assert (ws / "outputs/demo/final/duo_config.json").is_file(), "duo/tiny_cpu must write outputs/demo/final"
    _run(f"{base} objective=ar curriculum.steps=0 output_dir=outputs/demo_ar tokenizer.path=outputs/demo/tokenizer "
         "max_steps=6 eval_every=6 eval_max_batches=1 checkpoint.every=6 progress_bar=false max_wall_s=null", ws)
    from duo_plugin.data.corpora import shakespeare_documents

    (ws / "corpus.txt").write_text("\n".join(shakespeare_documents()[:3000]), encoding="utf-8")
    return ws


def _tune_parts(cmd: str):
    argv = shlex.split(cmd)
    i = argv.index("run") + 1
    while argv[i].startswith("--") and argv[i] != "--config":
        i += 2  # --nproc_per_node N
    recipe = argv[i]
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2:]]
    return recipe, config, overrides


def check_tune_config(cmd: str) -> None:
    """Config validity of a `tune run` command: the config is registered for the recipe, the overrides merge and
    the recipe's validate_config accepts the result."""
    import importlib

    from omegaconf import OmegaConf

    from duo_plugin.integrations.torchtune import discover_configs

    recipe, config, overrides = _tune_parts(re.sub(r"<[^<>]*>", "/placeholder", cmd))  # e.g. <OWT model dir>
    paths = dict(discover_configs())
    assert config in paths, f"unknown config {config!r} in: {cmd}"
    assert all("=" in o for o in overrides), f"overrides must be key=value: {cmd}"
    cfg = OmegaConf.merge(OmegaConf.load(paths[config]), OmegaConf.from_dotlist(overrides))
    mod = importlib.import_module(f"duo_plugin.recipes.{recipe}")
    mod.validate_config(cfg)


def check_lm_eval(cmd: str) -> None:
    from lm_eval.tasks import TaskManager

    from duo_plugin.integrations.lm_eval_cli import TASKS_DIR

    argv = shlex.split(cmd.replace("$(", "").replace(")", ""))
    assert argv[argv.index("--model") + 1] == "duo"
    tasks = argv[argv.index("--tasks") + 1].split(",")
    known = set(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)
    assert set(tasks) <= known, f"unknown tasks {set(tasks) - known} in: {cmd}"


def _tiny(cmd: str, ws: Path) -> str:
    for k, v in PLACEHOLDERS.items():
        cmd = cmd.replace(k, v)
    argv0 = shlex.split(cmd)[0]
    if argv0 in ("tune", "duo-tune"):
        recipe, _, overrides = _tune_parts(cmd)
        extra = TINY.get(recipe, "")
        if recipe == "duo_pretrain":
            if "resume=true" in overrides:
                shutil.rmtree(ws / "outputs/resume", ignore_errors=True)
                shutil.copytree(ws / "outputs/demo", ws / "outputs/resume")
                return f"{cmd} output_dir=outputs/resume max_steps=8 progress_bar=false"
            if not any(o.startswith("output_dir=") for o in overrides) and _tune_parts(cmd)[1] != "duo/tiny_cpu":
                # a baseline config: keep its own output_dir, which later README commands read (plots)
                extra += " tokenizer.path=outputs/demo/tokenizer"
                return f"{cmd} {extra}"
            name = f"outputs/cmd_{abs(hash(cmd)) % 10**8}"
            extra += f" output_dir={name} tokenizer.path=outputs/demo/tokenizer"
        return f"{cmd} {extra}"
    if argv0 in ("lm_eval", "duo-eval"):
        return cmd.replace("mc_samples=32", "mc_samples=2") + " --limit 2"
    return cmd


@pytest.mark.parametrize("where,cmd,note", all_commands(), ids=lambda v: str(v)[:60])
def test_readme_command(where, cmd, note, workspace):
    tags = tags_of(note)
    argv0 = shlex.split(cmd)[0]
    if "long" in tags:
        if argv0.startswith("scripts/"):
            assert os.access(ROOT / argv0, os.X_OK), f"{where}: {argv0} is not an executable script"
        elif argv0 == "python" and shlex.split(cmd)[1].endswith(".py"):
            assert (ROOT / shlex.split(cmd)[1]).is_file(), f"{where}: no such file in: {cmd}"
        else:
            assert argv0 in ("pip", "tune", "python"), f"{where}: unexpected [long] command {cmd!r}"
        return
    if tags & {"gpu", "hub"}:
        if argv0 in ("tune", "duo-tune"):
            check_tune_config(cmd)
        elif argv0 in ("lm_eval", "duo-eval"):
            check_lm_eval(cmd)
        else:
            pytest.fail(f"{where}: don't know how to check {cmd!r}")
        return
    tiny = _tiny(cmd, workspace)
    if argv0 in ("tune", "duo-tune"):
        check_tune_config(tiny)
    _run(tiny, workspace)


def test_config_check_catches_bad_commands():
    """The validity check used for [gpu]/[hub] commands rejects what a user would see rejected."""
    from duo_plugin.training.recipe_utils import ConfigError

    check_tune_config("tune run duo_pretrain --config duo/owt_small tokenizer.path=/x")
    with pytest.raises(ConfigError, match="max_stepz"):
        check_tune_config("tune run duo_pretrain --config duo/owt_small max_stepz=3")
    with pytest.raises(AssertionError, match="unknown config"):
        check_tune_config("tune run duo_pretrain --config duo/no_such_config")
    with pytest.raises(AssertionError, match="unknown tasks"):
        check_lm_eval("lm_eval --model duo --model_args pretrained=x --tasks no_such_task")
