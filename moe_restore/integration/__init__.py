"""Drop the library's MoE layers into existing models.

* ``replace_moe(model)``: swap the sparse MoE blocks of transformers models (Mixtral, Qwen2-MoE,
  Qwen3-MoE, OLMoE) for blocks that run ``topk_route`` and, through the experts module, ``moe_mlp``
  on the same weights; rebuild Llama 4's, DBRX's, JetMoE's and Switch Transformers' MoE blocks (outside
  the experts hook) on ``moe_mlp``; switch the experts of every other block that uses the hook to "moe_restore".
* ``upcycle_ffn(model, num_experts=, top_k=)``: turn dense feed-forward modules (diffusers
  ``FeedForward``, timm-style ``Mlp`` and ``GluMlp``, Llama-style gated MLPs, transformers'
  ``fc1``/``activation_fn``/``fc2`` MLPs such as ``ViTMLP`` and split ``*Intermediate`` + ``output``
  MLPs such as BERT's, any two-Linear MLP a ``match`` selects) into ``TopKMoE``
  or ``NestedMoE`` layers whose experts start as copies of the dense MLP.

* ``register()``: register ``experts_implementation="moe_restore"`` with transformers' experts hook
  (``import moe_restore`` calls it when transformers is installed): ``from_pretrained(...,
  experts_implementation="moe_restore")`` or ``model.set_experts_implementation("moe_restore")``
  runs ``moe_mlp`` on the experts of every family that uses the hook (see ``experts``), and a config
  that selects it saves it in config.json.

``from_pretrained(model_class, path)`` loads a model saved after ``replace_moe`` and replaces it again.

``replace_moe`` and ``upcycle_ffn`` change the model in place and return an ``IntegrationReport`` (``.model``, ``.replaced``,
``.skipped``, ``.note``). See docs/integration.md.
"""
from .experts import register
from .hf_blocks import KernelDbrxFFN, KernelJetMoeMoE, KernelLlama4TextMoe, KernelSparseMoeBlock
from .replace import from_pretrained, replace_moe
from .report import Change, IntegrationReport, Skip
from .upcycle import upcycle_ffn

__all__ = ["Change", "IntegrationReport", "KernelDbrxFFN", "KernelJetMoeMoE", "KernelLlama4TextMoe", "KernelSparseMoeBlock",
           "Skip", "from_pretrained", "register", "replace_moe", "upcycle_ffn"]
