"""One call that puts these kernels into a Hugging Face GPT-2, for training and inference.

    model = gpt2kernels.patch_hf_gpt2(GPT2LMHeadModel.from_pretrained(...))

What it swaps, on this model instance only (a freshly loaded model is unpatched):
- every LayerNorm's forward: ``layer_norm``;
- every ``GPT2MLP``'s forward (tanh-GELU configs): ``gelu_mlp`` on the Conv1D weights as
  ``weight.t()`` (no copy), then the module's own dropout;
- every other Conv1D's forward (the attention's c_attn and c_proj): ``linear``;
- the attention core: ``flash_attention``, registered with transformers' ``AttentionInterface``
  under the name "gpt2kernels" and selected with ``set_attn_implementation``. A padding mask or
  attention dropout (``attn_pdrop > 0`` while training) is not something the kernel does: those
  calls go to transformers' SDPA attention (a warning says so, once);
- with ``labels=``, ``GPT2LMHeadModel``'s loss: ``linear_cross_entropy`` on the final hidden states
  and the tied ``wte``, so the (B, T, 50257) logits are never made; the output's ``logits`` is then
  None. Without labels the model's own forward runs, logits included.

Under ``torch.autocast`` the linears, the MLP and the attention compute in the autocast dtype, as
PyTorch's own would; LayerNorm and the loss compute in fp32 as autocast runs them.
``transformers`` is imported only when this is called.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import Tensor, nn

from .attention import flash_attention
from .layernorm import layer_norm
from .linear import gelu_mlp, linear
from .loss import linear_cross_entropy

ATTENTION_NAME = "gpt2kernels"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # transformers' names of GPT-2's tanh GELU
IGNORE_INDEX = -100  # transformers' label for "no loss here"


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` in the autocast dtype when autocast is on for their device (as F.linear would take them)."""
    x = tensors[0]
    if not torch.is_autocast_enabled(x.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _layer_norm_forward(self: nn.LayerNorm, x: Tensor) -> Tensor:
    return layer_norm(x, self.weight, self.bias, self.eps)


def _conv1d_forward(self, x: Tensor) -> Tensor:
    x, weight, bias = _autocast(x, self.weight, self.bias)
    return linear(x, weight.t(), bias)  # Conv1D keeps its weight as [in, out]


def _mlp_forward(self, x: Tensor) -> Tensor:
    fc, proj = self.c_fc, self.c_proj
    x, fc_w, fc_b, proj_w, proj_b = _autocast(x, fc.weight, fc.bias, proj.weight, proj.bias)
    return self.dropout(gelu_mlp(x, fc_w.t(), fc_b, proj_w.t(), proj_b))


_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"gpt2kernels: {reason}: this attention runs transformers' SDPA instead of flash_attention",
                      stacklevel=3)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-interface function: q (B, H, Tq, D), k and v (B, H, Tk, D) in,
    (B, Tq, H, D) out. ``flash_attention`` (causal, bottom-right aligned, as a cache continuation
    needs) when there is no mask and no dropout; SDPA otherwise."""
    causal = getattr(module, "is_causal", True)
    reason = ("a padding mask was given" if attention_mask is not None
              else f"attention dropout {dropout} is on" if dropout > 0
              else "more queries than keys" if causal and query.shape[2] > key.shape[2]
              else f"head dim {query.shape[-1]} > 128" if query.shape[-1] > 128 else None)
    if reason is None:
        q, k, v = _autocast(query, key, value)
        return flash_attention(q, k, v, causal=causal, scale=scaling).transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _fallback(reason)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _lm_forward(self, input_ids: Tensor | None = None, *args, labels: Tensor | None = None, **kwargs):
    """GPT2LMHeadModel.forward with the loss from ``linear_cross_entropy`` when labels are given."""
    if labels is None or args:
        return self._gpt2kernels_forward(input_ids, *args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    return_dict = kwargs.pop("return_dict", None)
    out = self.transformer(input_ids, return_dict=True, **kwargs)
    hidden = out.last_hidden_state
    c = hidden.shape[-1]
    # transformers' causal-LM loss: position t predicts label t + 1, the last position nothing
    h = hidden[..., :-1, :].reshape(-1, c)
    targets = labels[..., 1:].reshape(-1).to(hidden.device)
    head = self.lm_head
    weight, bias = head.weight, head.bias
    h, weight, bias = _autocast(h, weight, bias)
    h = h.to(weight.dtype)
    if num_items is None:
        loss = linear_cross_entropy(h, weight, targets, bias, IGNORE_INDEX, "mean")
    else:  # transformers' gradient-accumulation convention: the sum over the whole batch's count
        loss = linear_cross_entropy(h, weight, targets, bias, IGNORE_INDEX, "sum") / num_items
    rest = {k: v for k, v in out.items() if k != "last_hidden_state"}
    result = CausalLMOutputWithCrossAttentions(loss=loss, logits=None, **rest)
    return result.to_tuple() if return_dict is False else result


def patch_hf_gpt2(model: nn.Module) -> nn.Module:
    """Swap this HF GPT-2's LayerNorms, MLPs, attention projections, attention core and (with
    ``labels=``) loss for gpt2kernels' ops, in place; see the module docstring for each. Works for
    ``GPT2LMHeadModel``, ``GPT2Model`` and the other GPT-2 heads (their own heads stay as they are),
    in training and inference, on CUDA (or on CPU under ``TRITON_INTERPRET=1``, for tests).

    Args:
        model: a transformers GPT-2 model (``model.config.model_type == "gpt2"``).
    Returns:
        model, patched. Patching twice is harmless; reloading the model undoes it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.pytorch_utils import Conv1D

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(f"patch_hf_gpt2 takes a transformers GPT-2 model, got {type(model).__name__} "
                         f"(model_type {getattr(config, 'model_type', None)!r})")
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # None unless padding: then a boolean mask
    model.set_attn_implementation(ATTENTION_NAME)

    in_mlp: set[int] = set()
    if config.activation_function in TANH_GELUS:
        for module in model.modules():
            if type(module).__name__ == "GPT2MLP":
                module.forward = types.MethodType(_mlp_forward, module)
                in_mlp.update((id(module.c_fc), id(module.c_proj)))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None and module.bias is not None:
            module.forward = types.MethodType(_layer_norm_forward, module)
        elif isinstance(module, Conv1D) and id(module) not in in_mlp:
            module.forward = types.MethodType(_conv1d_forward, module)
    if type(model).__name__ == "GPT2LMHeadModel" and not hasattr(model, "_gpt2kernels_forward"):
        model._gpt2kernels_forward = model.forward
        model.forward = types.MethodType(_lm_forward, model)
    return model
