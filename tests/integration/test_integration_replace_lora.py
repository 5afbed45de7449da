"""replace_moe with what wraps or persists a transformers model: PEFT LoRA on the experts'
Parameters (``target_parameters``) trains the same adapters as on the stock model, and a model
saved after replace_moe comes back replaced from ``integration.from_pretrained``, running the
kernels and computing what it computed before the save."""
from __future__ import annotations

import json

import pytest
import torch

from moe_restore.integration import KernelSparseMoeBlock, from_pretrained, replace_moe
from hf_tiny_models import count_moe_mlp, lm_loss, replace_model, replace_tokens  # noqa: F401 - a fixture
from utils import DEVICE, assert_close

tf = pytest.importorskip("transformers")
TOL = 1e-5


def _lora_config():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=2, target_modules=[], init_lora_weights=False,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


def _adapter_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out, loss = lm_loss(model, ids)
    loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("family, lora_first", [("mixtral", False), ("qwen3_moe", False), ("qwen3_moe", True)])
def test_lora_on_the_experts_of_a_replaced_model(family, lora_first, count_moe_mlp):
    """Adapters on both expert Parameters, added after replace_moe (or before it): logits and every
    adapter's gradient equal those of the same LoRA model without replace_moe ("eager" experts);
    the adapters change the output (so the LoRA'd weights reach moe_mlp) and an SGD step on them
    lowers the loss."""
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(replace_model(family), _lora_config())
    reference.base_model.model.set_experts_implementation("eager")
    if lora_first:
        model = peft.get_peft_model(replace_model(family), _lora_config())
        report = replace_moe(model, backend="torch")
    else:
        report = replace_moe(replace_model(family), backend="torch")
        model = peft.get_peft_model(report.model, _lora_config())
    assert len(report.replaced) == 2 and not report.skipped
    assert isinstance(model.base_model.model.model.layers[0].mlp, KernelSparseMoeBlock)
    wanted = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(wanted[name])  # the same (random, non-zero) adapters on the same weights
    ids = replace_tokens()
    y_ref, g_ref = _adapter_grads(reference, ids)
    count_moe_mlp.clear()
    y, g = _adapter_grads(model, ids)
    assert count_moe_mlp == ["torch"] * 2
    assert len(g) == 8 and set(g) == set(g_ref)  # lora_A and lora_B of 2 Parameters x 2 layers
    assert_close(y, y_ref, torch.float32, what="logits")
    for name in g_ref:
        assert g[name] is not None and g[name].abs().sum() > 0, f"no gradient reached {name}"
        err = ((g[name] - g_ref[name]).norm() / g_ref[name].norm()).item()
        assert err <= TOL, f"grad {name}: relative error {err:.1e}"
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(model(ids).logits, y, atol=1e-4)
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.05)
    before = lm_loss(model, ids)[1]
    before.backward()
    optimizer.step()
    assert lm_loss(model, ids)[1].item() < before.item()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_saved_replaced_model_comes_back_replaced(family, tmp_path, count_moe_mlp):
    model = replace_model(family).cpu()
    replace_moe(model, backend="torch")
    ids = replace_tokens().cpu()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["moe_restore"] == {"replace_moe": {"backend": "torch"}}
    reloaded = from_pretrained(tf.AutoModelForCausalLM, tmp_path)
    blocks = [m for m in reloaded.modules() if isinstance(m, KernelSparseMoeBlock)]
    assert len(blocks) == 2 and all(b.backend == "torch" for b in blocks)
    count_moe_mlp.clear()
    with torch.no_grad():
        got = reloaded.eval()(ids).logits
    assert count_moe_mlp == ["torch"] * 2
    err = ((got - want).norm() / want.norm()).item()
    assert err <= TOL, f"logits after the reload: relative error {err:.1e}"  # float32; attention may differ
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers alone: the stock blocks
    assert not any(isinstance(m, KernelSparseMoeBlock) for m in stock.modules())


def test_from_pretrained_refuses_a_non_model_class():
    with pytest.raises(TypeError, match="model_class must have a from_pretrained"):
        from_pretrained("AutoModelForCausalLM", "some/path")


def test_nothing_found_says_what_was_looked_for():
    report = replace_moe(torch.nn.Sequential(torch.nn.Linear(4, 4)).to(DEVICE))
    assert report.replaced == [] and report.skipped == []
    assert "no MoE block found" in str(report) and "Mixtral" in report.note
