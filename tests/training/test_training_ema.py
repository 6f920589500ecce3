"""EMA against a hand-computed recurrence; fp32 shadow for bf16 models; swap/restore; state; DTensor shards."""

import pytest
import torch
from torch import nn

from duo_plugin.training.ema import EMA


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(dtype)


def _perturb(model, g):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("use_warmup", [True, False])
def test_ema_matches_recurrence(use_warmup):
    model = _model()
    ema = EMA(model, decay=0.9, use_warmup=use_warmup)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for n in range(1, 30):
        _perturb(model, g)
        d = min(0.9, (1 + n) / (10 + n)) if use_warmup else 0.9
        used = ema.update(model)
        assert used == pytest.approx(d)
        for name, p in model.named_parameters():
            ref[name] = d * ref[name] + (1 - d) * p.detach().double()
    assert ema.num_updates == 29
    for name in ref:
        torch.testing.assert_close(ema.shadow[name].double(), ref[name], rtol=1e-6, atol=1e-6)
    # with warm-up the early decays are the published (1+n)/(10+n): 2/11, 3/12, ...
    assert EMA(model, 0.9999).current_decay(1) == pytest.approx(2 / 11)
    assert EMA(model, 0.9999).current_decay(10**6) == pytest.approx(0.9999)


def test_bf16_model_keeps_fp32_shadow():
    model = _model(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    for n in range(1, 6):
        _perturb(model, g)
        ema.update(model)
        d = min(0.999, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            ref[name] = d * ref[name] + (1 - d) * p.detach().float()
    for name in ref:
        torch.testing.assert_close(ema.shadow[name], ref[name], rtol=1e-6, atol=1e-6)


def test_swap_into_and_copy_to_restore():
    model = _model()
    ema = EMA(model, decay=0.5, use_warmup=False)
    _perturb(model, torch.Generator().manual_seed(3))
    ema.update(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 3)
    with ema.swap_into(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n])
        y_ema = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    with pytest.raises(RuntimeError):
        with ema.swap_into(model):
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])  # restored on exceptions too
    ema.copy_to(model)
    torch.testing.assert_close(model(x), y_ema)


def test_state_dict_round_trip():
    model = _model()
    ema = EMA(model, decay=0.99)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        _perturb(model, g)
        ema.update(model)
    other = EMA(_model(), decay=0.5, use_warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3 and other.decay == 0.99 and other.use_warmup
    _perturb(model, g)
    assert ema.update(model) == other.update(model)
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], other.shadow[n])
    with pytest.raises(KeyError, match="missing"):
        EMA(nn.Linear(3, 4)).load_state_dict(ema.state_dict())


def test_dtensor_local_shards(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = _model()
        for mod in model:
            mod.weight = nn.Parameter(distribute_tensor(mod.weight.detach(), mesh, [Shard(0)]))
        assert isinstance(model[0].weight, DTensor)
        ema = EMA(model, decay=0.5, use_warmup=False)
        assert not isinstance(ema.shadow["0.weight"], DTensor)
        before = {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
                  for n, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if isinstance(p, DTensor) else p).add_(1.0)
        ema.update(model)
        for n, b in before.items():
            torch.testing.assert_close(ema.shadow[n], b + 0.5)
        with ema.swap_into(model):
            torch.testing.assert_close(model[0].weight.to_local(), before["0.weight"] + 0.5)
        torch.testing.assert_close(model[0].weight.to_local(), before["0.weight"] + 1.0)
    finally:
        dist.destroy_process_group()
