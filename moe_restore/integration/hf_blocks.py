"""The sparse MoE blocks of ``transformers`` that ``replace_moe`` knows, and the block that replaces them.

Each known block routes tokens x [T, D] (hidden states flattened) as

    logits = x W_r^T                                (the model's own router module)
    p      = softmax(logits) in float32             (softmax before top-k)
    w, e   = top-k of p;  w /= sum_j w_j            (Mixtral always; Qwen2/3-MoE, OLMoE when
                                                    ``norm_topk_prob``)
    y      = sum_j w_j * down_e(silu(gate_e x) * up_e x)
           + sigmoid(x W_sg^T) * Shared(x)          (Qwen2-MoE only)

Qwen2/3-MoE and OLMoE round w to the logits dtype before use; Mixtral keeps it float32. The experts
are stored fused, ``gate_up_proj`` [E, 2H, D] (gate rows first) and ``down_proj`` [E, D, H], in an
experts class that uses transformers' experts hook. The replaced block calls that experts module
(``experts(x, e, w)``, the hook's contract) with ``experts_implementation="moe_restore"`` set on its
config, so ``moe_mlp`` runs on transposed views of the same Parameters (no copy, see ``experts``),
and whatever wraps the experts module applies as it does in the stock model: PEFT LoRA on the
expert Parameters (``target_parameters``: a parametrisation active inside the wrapper's forward),
accelerate's offload hooks (weights brought to the execution device around the forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_restore.kernels import topk_route
from moe_restore.kernels.moe_mlp import moe_mlp_topk

from .experts import _FLOAT_DTYPES, _GATED_KIND, IMPLEMENTATION, _activation_name, eager_forward
from .report import NotConvertible


@dataclass(frozen=True)
class BlockRule:
    """How one transformers block class routes (see the module docstring)."""

    always_renormalize: bool  # else the router's ``norm_topk_prob`` decides
    weights_in_logits_dtype: bool
    shared_expert: bool


_MODELS = "transformers.models."
KNOWN_BLOCKS: dict[str, BlockRule] = {
    _MODELS + "mixtral.modeling_mixtral.MixtralSparseMoeBlock": BlockRule(True, False, False),
    _MODELS + "qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock": BlockRule(False, True, True),
    _MODELS + "qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock": BlockRule(False, True, False),
    _MODELS + "olmoe.modeling_olmoe.OlmoeSparseMoeBlock": BlockRule(False, True, False),
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _uses_silu(experts: nn.Module) -> bool:
    config = getattr(experts, "config", None)
    act = getattr(config, "hidden_act", None)
    if act is not None:
        return act in ("silu", "swish")
    return type(experts.act_fn).__name__ in ("SiLU", "SiLUActivation")


def unwrapped(experts: nn.Module) -> nn.Module:
    """The experts module inside wrappers that keep it as their base layer (PEFT's ``ParamWrapper``,
    nested once per targeted Parameter)."""
    get_base_layer = getattr(experts, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else experts


def _check_experts(experts: nn.Module) -> None:
    """Raise NotConvertible unless ``experts`` holds fused swiglu experts without biases behind
    transformers' experts hook."""
    experts = unwrapped(experts)
    for name in ("gate_up_proj", "down_proj", "act_fn"):
        if not hasattr(experts, name):
            raise NotConvertible(f"its experts module has no {name!r} (not the fused expert layout)")
    # Feature detection, not private attributes (transformers 5.17 has no ``_is_expert_parallel``):
    # the block calls the experts module, whose hooked forward dispatches on the config's
    # ``_experts_implementation``, so both the hook (found in the MRO) and that attribute must be there.
    if not hasattr(getattr(experts, "config", None), "_experts_implementation"):
        raise NotConvertible("its experts module has no config with `_experts_implementation`, so transformers' "
                             "experts hook cannot dispatch to the kernels")
    try:
        eager_forward(experts)
    except RuntimeError:
        raise NotConvertible("its experts class does not use transformers' experts hook "
                             "(@use_experts_implementation)") from None
    if experts.gate_up_proj.dim() != 3 or experts.down_proj.dim() != 3:
        raise NotConvertible("its expert weights are not [E, ., .] tensors (e.g. sharded or packed)")
    if experts.gate_up_proj.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NotConvertible(f"its expert weights are {experts.gate_up_proj.dtype} (quantised); moe_mlp needs the "
                             "activations' float dtype")
    if getattr(experts, "has_bias", False):
        raise NotConvertible("its experts have biases, which this release does not map")
    if getattr(experts, "is_transposed", False):
        raise NotConvertible("its expert weights are stored transposed ([E, D, 2H]), not as these blocks store them")
    if not getattr(experts, "is_concatenated", True):
        raise NotConvertible("its gate and up projections are interleaved, not concatenated")
    if not _uses_silu(experts):
        raise NotConvertible("its experts' activation is not SiLU, so the expert MLP is not swiglu")


def implementation_name(backend: str | None) -> str:
    """The registered experts implementation that runs the kernels on ``backend``."""
    return IMPLEMENTATION if backend is None else f"{IMPLEMENTATION}_{backend}"


class KernelSparseMoeBlock(nn.Module):
    """A transformers sparse MoE block running ``topk_route`` and, through its experts module,
    ``moe_mlp`` (swiglu) on the original block's own modules.

    It keeps the original ``gate`` (router), ``experts`` and, for Qwen2-MoE, ``shared_expert`` and
    ``shared_expert_gate`` as its children, so the parameters, their names in the state dict and
    the model's router-logits recording are unchanged. The router module is called for its logits
    (its own top-k result is discarded: an O(T*E) extra, small next to the experts); the routing
    itself is ``topk_route``'s, handed to the experts module as (expert ids [T, k], weights [T, k]).
    Building the block sets the experts' config (the model's, shared by all its experts modules) to
    ``experts_implementation="moe_restore"`` (``"moe_restore_<backend>"`` for a pinned backend); a
    later ``model.set_experts_implementation(...)`` changes what computes the experts, not the
    routing. Returns what the original block returns: the hidden states, in the input's shape and
    dtype.
    """

    def __init__(self, block: nn.Module, rule: BlockRule, backend: str | None = None):
        super().__init__()
        _check_experts(block.experts)
        # The children in the original block's order, so that named_parameters() (hence an
        # optimizer's state, which is keyed by position) keeps its order.
        kept = ("gate", "experts") + (("shared_expert", "shared_expert_gate") if rule.shared_expert else ())
        for name in sorted(kept, key=list(block._modules).index):
            setattr(self, name, getattr(block, name))
        self.top_k = block.gate.top_k
        self.renormalize = rule.always_renormalize or bool(getattr(block.gate, "norm_topk_prob", False))
        self.weights_in_logits_dtype = rule.weights_in_logits_dtype
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0))
        if not rule.shared_expert:
            self.shared_expert = self.shared_expert_gate = None
        self.backend = backend
        self.source = type(block).__name__

    @property
    def backend(self) -> str | None:
        """The kernels' backend (None: by device), for ``topk_route`` and, through the experts'
        config, ``moe_mlp``."""
        return self._backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        self._backend = backend
        unwrapped(self.experts).config._experts_implementation = implementation_name(backend)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative router jitter
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = self.gate(x)[0]
        routing = topk_route(logits, self.top_k, renormalize=self.renormalize, backend=self.backend)
        weights = routing.weights
        if self.weights_in_logits_dtype and logits.dtype != torch.float32:
            weights = weights.to(logits.dtype).float()
        y = self.experts(x, routing.experts, weights)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return (f"source={self.source}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"shared_expert={self.shared_expert is not None}, backend={self.backend}")


def describe(block: KernelSparseMoeBlock) -> str:
    """The report's line for a replaced block."""
    experts = unwrapped(block.experts)
    shared = "; shared expert: the model's own MLP with its sigmoid gate" if block.shared_expert is not None else ""
    return (f"{experts.gate_up_proj.shape[0]} experts, swiglu, views of gate_up_proj/down_proj (no copy) through "
            f'the experts module (experts_implementation="{implementation_name(block.backend)}"); '
            f"softmax, top-{block.top_k}, {'renormalised' if block.renormalize else 'not renormalised'}{shared}")


def _gated_activation(act_fn: object) -> str:
    """moe_mlp's gated kind of ``act_fn(gate) * up`` (SiLU, GELU or tanh-GELU), else NotConvertible."""
    kind = _GATED_KIND.get(_activation_name(act_fn))
    if kind is None:
        raise NotConvertible(f"its experts' activation {type(act_fn).__name__} is not SiLU, GELU or tanh-GELU, so "
                             "the expert MLP is none of moe_mlp's gated kinds")
    return kind


def _check_float(*weights: torch.Tensor) -> None:
    if not all(isinstance(w, torch.Tensor) and w.dtype in _FLOAT_DTYPES and w.device.type != "meta"
               for w in weights):
        raise NotConvertible("its expert weights are not float tensors in memory (quantised or offloaded)")


class KernelLlama4TextMoe(nn.Module):
    """Llama 4's ``Llama4TextMoe`` (its experts are outside transformers' experts hook) on ``moe_mlp``.

    The stock block computes, for x [T, D], router logits l = x W_r^T and its top-k experts e_j:

        y = Shared(x) + sum_j down_{e_j}(act(gate_{e_j}(s_j x)) * up_{e_j}(s_j x)),  s_j = sigmoid(l_{e_j})

    (it runs every expert on every token, the unchosen ones on s x = 0). The router score scales the
    expert's input, not its output, so each (token, choice) pair is one row s_j x of a [T*k, D]
    input, routed to expert e_j with weight 1, and the k rows of a token are summed. The weights are
    the experts' own Parameters: ``gate_up_proj`` [E, D, 2I] (gate columns first) is moe_mlp's w1
    and ``down_proj`` [E, I, D] its w2, no copy. Children (``experts``, ``router``,
    ``shared_expert``) and their order are the stock block's, so the state dict is unchanged;
    returns (hidden states [T, D], router logits), as the stock block.
    """

    def __init__(self, block: nn.Module, backend: str | None = None):
        super().__init__()
        experts = block.experts
        for name in ("gate_up_proj", "down_proj", "act_fn"):
            if not hasattr(experts, name):
                raise NotConvertible(f"its experts module has no {name!r} (not Llama 4's fused expert layout)")
        _check_float(experts.gate_up_proj, experts.down_proj)
        self.activation = _gated_activation(experts.act_fn)
        for name in list(block._modules):
            setattr(self, name, getattr(block, name))
        self.top_k = block.router.top_k
        self.backend = backend
        self.source = type(block).__name__

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores, logits = self.router(x)  # scores: sigmoid of the top-k logits, 0 elsewhere
        experts = torch.topk(logits, self.top_k, dim=1).indices  # the router's own choice
        T, k = experts.shape
        rows = (x[:, None, :] * scores.gather(1, experts)[..., None]).reshape(T * k, -1)
        routed = moe_mlp_topk(rows, experts.reshape(-1, 1), rows.new_ones(T * k, 1, dtype=torch.float32),
                              self.experts.gate_up_proj, self.experts.down_proj, activation=self.activation,
                              backend=self.backend)
        return self.shared_expert(x) + routed.reshape(T, k, -1).sum(1).to(x.dtype), logits

    def extra_repr(self) -> str:
        return f"source={self.source}, top_k={self.top_k}, activation={self.activation}, backend={self.backend}"


class KernelDbrxFFN(nn.Module):
    """DBRX's ``DbrxFFN`` (its experts are outside transformers' experts hook) on ``moe_mlp``.

    Routing as the stock block: logits from its router module (with the router's own training
    jitter), p = softmax(logits) in the logits' dtype, top-k of p, divided by their
    ``moe_normalize_expert_weights``-norm when that is set. The experts store gate ``w1``, up ``v1``
    and down ``w2`` as [E*I, D] each; moe_mlp's w2 [E, I, D] is a view of ``w2``, its w1 [E, D, 2I]
    a concatenation of ``w1`` and ``v1`` (a copy of the first layer's weights per call: they are
    two Parameters). Children (``router``, ``experts``) are the stock block's, so the state dict
    is unchanged; returns the hidden states [B, S, D], as the stock block.
    """

    def __init__(self, block: nn.Module, backend: str | None = None):
        super().__init__()
        mlp = getattr(block.experts, "mlp", None)
        for name in ("w1", "v1", "w2", "activation_fn"):
            if not hasattr(mlp, name):
                raise NotConvertible(f"its experts have no mlp.{name} (not DBRX's expert layout)")
        _check_float(mlp.w1, mlp.v1, mlp.w2)
        self.activation = _gated_activation(mlp.activation_fn)
        for name in list(block._modules):
            setattr(self, name, getattr(block, name))
        self.top_k = block.top_k
        self.norm_p = block.moe_normalize_expert_weights
        self.num_experts = block.experts.num_experts
        self.backend = backend
        self.source = type(block).__name__

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.router(hidden_states)
        probs = torch.softmax(logits, dim=1, dtype=logits.dtype)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_p is not None:
            weights = weights / torch.norm(weights, p=self.norm_p, dim=-1, keepdim=True)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        mlp, E = self.experts.mlp, self.num_experts
        w1 = torch.cat([mlp.w1.view(E, -1, x.shape[1]), mlp.v1.view(E, -1, x.shape[1])], dim=1).transpose(1, 2)
        y = moe_mlp_topk(x, experts, weights, w1, mlp.w2.view(E, -1, x.shape[1]), activation=self.activation,
                         backend=self.backend)
        return y.to(x.dtype).view(hidden_states.shape[0], -1, x.shape[1])

    def extra_repr(self) -> str:
        return (f"source={self.source}, top_k={self.top_k}, normalise={self.norm_p}, activation={self.activation}, "
                f"backend={self.backend}")


class KernelJetMoeMoE(nn.Module):
    """JetMoE's ``JetMoeMoE`` (its experts are outside transformers' experts hook) on ``moe_mlp``.

    Routing as the stock block: float32 logits from its router module, their top-k, softmax over
    those k logits in the hidden states' dtype. The experts store ``input_linear.weight`` [E, 2I, D]
    (gate rows first) and ``output_linear.weight`` [E, D, I]: moe_mlp's w1 and w2 are their
    transposes, views, no copy; the block's output bias [D] is added after the sum over experts.
    The router module is called (its logits are what the model records as router logits; it also
    reads the expert sizes back to the host, as in the stock block). Children are the stock
    block's; returns the hidden states [B, S, D].
    """

    def __init__(self, block: nn.Module, backend: str | None = None):
        super().__init__()
        w1, w2 = getattr(block.input_linear, "weight", None), getattr(block.output_linear, "weight", None)
        _check_float(w1, w2)
        if w1.dim() != 3 or w2.dim() != 3 or w1.shape[1] != 2 * w2.shape[2]:
            raise NotConvertible("its experts are not gated [E, 2I, D] and [E, D, I] weights")
        self.expert_activation = _gated_activation(block.activation)
        for name in list(block._parameters) + list(block._modules):  # "activation" is the stock module
            setattr(self, name, getattr(block, name))
        self.top_k = block.router.top_k
        self.backend = backend
        self.source = type(block).__name__

    def forward(self, layer_input: torch.Tensor) -> torch.Tensor:
        x = layer_input.reshape(-1, layer_input.shape[-1])
        logits = self.router(x)[4]
        top_logits, experts = logits.topk(self.top_k, dim=1)
        weights = torch.softmax(top_logits, dim=1).type_as(x)
        y = moe_mlp_topk(x, experts, weights, self.input_linear.weight.transpose(1, 2),
                         self.output_linear.weight.transpose(1, 2),
                    activation=self.expert_activation, backend=self.backend)
        return y.to(x.dtype).view(layer_input.shape) + self.bias

    def extra_repr(self) -> str:
        return f"source={self.source}, top_k={self.top_k}, activation={self.expert_activation}, backend={self.backend}"


class KernelSwitchTransformersSparseMLP(nn.Module):
    """Switch Transformers' ``SwitchTransformersSparseMLP`` (experts outside transformers' experts
    hook) on ``moe_mlp``.

    Routing is the stock router module's own call (its float32 softmax, training jitter and expert
    capacity), made as the stock block makes it: it returns, per token, a one-hot row of the top-1
    expert with the tokens past an expert's capacity zeroed, and p, the top-1 probability. The
    router's interface changed between the supported transformers releases (5.17: ``(p, one-hot,
    max p)`` from the flattened tokens, where the capacity count runs over a single choice and drops
    nothing; 5.25: ``(one-hot, p, logits)`` from [B, S, D], the capacity counted per sequence); a
    probe call on one zero token at construction tells which. The stock block
    adds p * Expert_e(x) for the kept tokens and nothing for the dropped ones, so here every token
    is one assignment to its argmax expert with weight p * kept (kept = the row's sum, 0 or 1): a
    dropped token's expert output is multiplied by 0, and p's gradient there is 0, as in the stock
    block. Each expert is a ``DenseActDense`` (``wi`` [H, D], ``wo`` [D, H], no bias, ``act``
    between them): moe_mlp's w1 [E, D, H] and w2 [E, H, D] are the stacked transposes (a copy of
    the expert weights per call: they are 2E Parameters). The experts' dropout between ``act`` and
    ``wo`` has no kernel counterpart: while training with dropout on, the block calls the stock
    experts module instead. Children (``router``, ``experts``) are the stock block's, so the state
    dict is unchanged; returns the hidden states [B, S, D], as the stock block.
    """

    def __init__(self, block: nn.Module, backend: str | None = None):
        super().__init__()
        experts = list(block.experts.values())
        for name in ("wi", "wo", "act", "dropout"):
            if not all(hasattr(expert, name) for expert in experts):
                raise NotConvertible(f"its experts have no {name!r} (not Switch Transformers' DenseActDense)")
        _check_float(*(expert.wi.weight for expert in experts), *(expert.wo.weight for expert in experts))
        if any(expert.wi.bias is not None or expert.wo.bias is not None for expert in experts):
            raise NotConvertible("its experts have biases, which this release does not map")
        activation = _activation_name(experts[0].act)
        if activation is None or activation in _GATED_KIND.values():
            raise NotConvertible(f"its experts' activation {type(experts[0].act).__name__} is not one of moe_mlp's")
        self.activation = activation
        for name in list(block._modules):
            setattr(self, name, getattr(block, name))
        with torch.no_grad():
            probe = self.router(experts[0].wi.weight.new_zeros(1, 1, experts[0].wi.weight.shape[1]))
        self.routes_flat_tokens = probe[0].is_floating_point()
        self.backend = backend
        self.source = type(block).__name__

    def _dropout_active(self) -> bool:
        return self.training and any(expert.dropout.p > 0 for expert in self.experts.values())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.routes_flat_tokens:
            probs, selected, _ = self.router(x)
        else:
            selected, probs, _ = self.router(hidden_states)
        selected, probs = selected.reshape(x.shape[0], 1, -1), probs.reshape(-1, 1)  # capacity-masked one-hot, p
        if self._dropout_active():
            return self.experts(x, selected, probs).reshape(hidden_states.shape)
        experts = list(self.experts.values())
        w1 = torch.stack([expert.wi.weight for expert in experts]).transpose(1, 2)
        w2 = torch.stack([expert.wo.weight for expert in experts]).transpose(1, 2)
        weights = probs.float() * selected.sum(-1)
        y = moe_mlp_topk(x, selected.argmax(-1), weights, w1, w2, activation=self.activation, backend=self.backend)
        return y.to(x.dtype).reshape(hidden_states.shape)

    def extra_repr(self) -> str:
        return f"source={self.source}, activation={self.activation}, backend={self.backend}"


# Blocks whose experts are outside transformers' experts hook, each with its own replacement.
OTHER_BLOCKS: dict[str, type[nn.Module]] = {
    _MODELS + "llama4.modeling_llama4.Llama4TextMoe": KernelLlama4TextMoe,
    _MODELS + "dbrx.modeling_dbrx.DbrxFFN": KernelDbrxFFN,
    _MODELS + "jetmoe.modeling_jetmoe.JetMoeMoE": KernelJetMoeMoE,
    _MODELS + "switch_transformers.modeling_switch_transformers.SwitchTransformersSparseMLP":
        KernelSwitchTransformersSparseMLP,
}


# MoE-like blocks that are no routed expert MLPs for moe_mlp, each with the reason the report gives.
LEFT_ALONE: dict[str, str] = {
    _MODELS + "nllb_moe.modeling_nllb_moe.NllbMoeSparseMLP": (
        "NLLB-MoE's experts module one-hot encodes the router's mask, which is one-hot already, so every "
        "token's first choice runs expert_1 and its second expert_0 whatever the router chose (checked on "
        "transformers 5.25: the other experts never get a gradient); a kernel block equal to it would not be "
        "an MoE of the router's choices, and one that followed the router would change the model's outputs"),
    _MODELS + "doge.modeling_doge.DogeCDMoE": (
        "Doge's experts are single neurons (rows of two embeddings) retrieved by product keys, not expert "
        "MLPs"),
    _MODELS + "vitpose_backbone.modeling_vitpose_backbone.VitPoseBackboneMoeMLP": (
        "VitPose picks one expert Linear per image by its dataset index: nothing is routed"),
}


def describe_other(block: nn.Module) -> str:
    """The report's line for a block of ``OTHER_BLOCKS`` replaced."""
    if isinstance(block, KernelLlama4TextMoe):
        return (f"{block.experts.gate_up_proj.shape[0]} experts, {block.activation}, views of gate_up_proj/down_proj "
                f"(no copy); the router's top-{block.top_k}, sigmoid score scaling each expert's input; shared "
                "expert: the model's own MLP")
    if isinstance(block, KernelSwitchTransformersSparseMLP):
        return (f"{len(block.experts)} experts, {block.activation}, w1/w2 stacked from each expert's wi/wo per call; "
                "the router's top-1 with its expert capacity (dropped tokens weigh 0); the stock experts while "
                "training with expert dropout")
    if isinstance(block, KernelJetMoeMoE):
        return (f"{block.input_linear.weight.shape[0]} experts, {block.expert_activation}, views of input_linear/"
                f"output_linear (no copy); top-{block.top_k} logits, softmax over them; the block's bias after the sum")
    return (f"{block.num_experts} experts, {block.activation}, w1 = [w1 | v1] concatenated per call, w2 a view; "
            f"softmax, top-{block.top_k}, "
            f"{'not normalised' if block.norm_p is None else f'normalised by the {block.norm_p}-norm'}")
