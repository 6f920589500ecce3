"""transformers' AutoModelForMaskedLM loads converted / exported Duo and MDLM folders through our registered classes,
with trust_remote_code off, and gives load_pretrained's log-probabilities."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from duo_plugin.convert.official import convert_official, to_official  # noqa: E402
from duo_plugin.models.checkpoint import load_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT.parent / "shared" / "fixtures" / "official"
pytestmark = pytest.mark.skipif(not FIX.is_dir(), reason="official fixtures not found")


@pytest.mark.parametrize("kind", ["duo", "mdlm"])
def test_auto_model_equals_load_pretrained(tmp_path, kind):
    import duo_plugin  # noqa: F401  (installs the hook; transformers may already be imported by other tests)
    from duo_plugin.integrations.transformers import register
    from transformers import AutoModelForMaskedLM

    register()
    folder = convert_official(FIX / f"{kind}_dit_tiny" / "lightning.ckpt", tmp_path / "m")
    exported = to_official(folder, tmp_path / "hf")
    ref_model = load_pretrained(folder)
    io = torch.load(FIX / f"{kind}_dit_tiny" / "io.pt", weights_only=True)
    x, sigma = io["input_ids"], io["sigma"]
    with torch.no_grad():
        ref = ref_model(x, sigma)
        for d in (folder, exported, FIX / f"{kind}_dit_tiny" / "hf"):
            m = AutoModelForMaskedLM.from_pretrained(str(d), trust_remote_code=False)
            assert type(m).__module__ == "duo_plugin.integrations.transformers"
            logits = m(x, sigma)
            assert torch.equal(torch.log_softmax(logits, -1), ref), d
            assert torch.equal(m(x, sigma, return_dict=True).logits, logits)


def test_registration_after_import_duo_plugin_in_a_fresh_interpreter(tmp_path):
    """A fresh interpreter: ``import duo_plugin`` then the auto class; nothing from the folder's code is used."""
    folder = convert_official(FIX / "duo_dit_tiny" / "hf", tmp_path / "m")
    exported = to_official(folder, tmp_path / "hf")
    (exported / "modeling_mdlm.py").write_text("raise SystemExit('remote code ran')\n")
    (exported / "configuration_mdlm.py").write_text("raise SystemExit('remote code ran')\n")
    code = ("import duo_plugin, sys\n"
            "assert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForMaskedLM\n"
            f"m = AutoModelForMaskedLM.from_pretrained({str(exported)!r})\n"
            "print(type(m).__name__)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("MDLMForMaskedLM")
    assert "remote code ran" not in r.stderr + r.stdout
