"""The lazy checkpointer's cached state-dict capture returns exactly what DCP's API returns."""

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from meshweave.checkpoint import ModelState, OptimizerState
from meshweave.models.llama.config import LlamaConfig
from meshweave.models.llama.model import Transformer

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)


def _train_step(model, opt, scheduler=None):
    model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    if scheduler is not None:
        scheduler.step()


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_cached_capture_equals_fresh_dcp_state_every_step():
    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))  # lr changes every step
    ms, os_ = ModelState([model]), OptimizerState([model], [opt])
    for _ in range(4):
        _train_step(model, opt, scheduler)
        assert _same(ms.state_dict(), get_model_state_dict(model))
        fresh = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        assert _same(os_.state_dict(), fresh)
    assert ms.cache.hits >= 3 and os_.cache.hits >= 2  # the first optimizer step creates new state tensors


def test_replaced_parameter_invalidates_the_model_cache():
    model = Transformer(CFG)
    ms = ModelState([model])
    ms.state_dict()
    model.output.weight = torch.nn.Parameter(torch.zeros_like(model.output.weight))  # a new tensor object
    assert torch.equal(ms.state_dict()["output.weight"], torch.zeros_like(model.output.weight))
    assert ms.cache.hits == 0


def test_replaced_optimizer_state_invalidates_the_optimizer_cache():
    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt)
    os_ = OptimizerState([model], [opt])
    os_.state_dict(), os_.state_dict()
    assert os_.cache.hits == 1
    for st in opt.state.values():
        st["exp_avg"] = st["exp_avg"].clone()  # new tensor objects, new storage
    state = os_.state_dict()
    assert os_.cache.hits == 1  # recomputed, not served from the cache
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key.endswith(".exp_avg"):
            live = opt.state[params[key.removeprefix("state.").removesuffix(".exp_avg")]]["exp_avg"]
            assert value.data_ptr() == live.data_ptr()
