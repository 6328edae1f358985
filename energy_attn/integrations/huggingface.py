"""Energy attention for Hugging Face ``transformers`` models (optional extra ``[hf]``).

:func:`register` adds an attention function to ``transformers``' ``AttentionInterface`` and a
mask function to its ``AttentionMaskInterface`` under one name, so any model that dispatches
through them (Llama, Mistral, Qwen2, GPT-2, ...) runs energy attention with

    AutoModelForCausalLM.from_config(cfg, attn_implementation="energy")
    model.set_attn_implementation("energy")

The attention function takes the model's own projected ``query [B, H, N, D]`` and cached
``key/value [B, Hk, M, D]`` (grouped-query heads are descended natively, no copy), runs
``num_steps − 1`` Hopfield descent steps of the queries on the keys and reads out the values
(``num_steps=1`` is the ``sdpa`` implementation). The mask function always materialises the
boolean mask (True = may attend) instead of returning None for a plain causal mask and
relying on SDPA's ``is_causal`` flag: the descent then sees the causal mask too, with or
without a KV cache, padding or a static cache.

Importing :mod:`energy_attn` never imports ``transformers``; this module does.
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from .. import masks
from .._utils import check_float_tensor, exists
from ._energy_attention import descend_and_read_out
from .torch_mha import _check_energy_options

__all__ = ["energy_mask", "make_attention_function", "register"]

# Extra logit terms some models pass to their attention function: logit soft-capping (Gemma 2),
# additive position biases (T5-style), attention sinks (gpt-oss). Not part of the energy.
_UNSUPPORTED = ("softcap", "position_bias", "s_aux")


def energy_mask(*args, **kwargs):
    """``AttentionMaskInterface`` function: ``sdpa_mask`` that never skips the causal mask.

    Returns a boolean ``[B, 1, N, M]`` mask (True = may attend), or None only where every
    query may attend every key (a bidirectional mask with no padding).
    """
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def make_attention_function(num_steps=2, step_size=1.0, optimizer="gd", momentum=0.0,
                            scale=None):
    """An ``AttentionInterface`` function with these energy options (see :func:`register`)."""
    opts = _check_energy_options(num_steps, step_size, optimizer, momentum, scale)
    fixed_scale = opts.pop("scale")

    def energy_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                 scaling=None, is_causal=None, **kwargs):
        """``query [B, H, N, D]``, ``key/value [B, Hk, M, D]``, ``attention_mask`` boolean
        (True = may attend) or additive float ``[B, 1|H, N, M]`` -> ``([B, N, H, D], weights)``.
        An additive mask is a logit bias of the energy: it acts in every descent step and in
        the read-out (``−inf`` / ``<= finfo.min`` blocks)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_float_tensor(name, t, ndim=4)
        for name in _UNSUPPORTED:
            if kwargs.get(name) is not None:
                raise ValueError(f"energy attention does not support the model's {name!r} "
                                 "(it would be silently ignored); use another attn_implementation")
        N, M = query.shape[2], key.shape[2]
        if exists(attention_mask):  # bool (True = may attend) or additive float (user 4-D masks)
            mask = masks.from_user("attention_mask", attention_mask)
        else:
            # No mask: full attention, or a causal model whose mask function skipped it. Follow
            # sdpa's rule (causal unless decoding a single token), top-left aligned.
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
            causal = causal and N > 1
            mask = masks.from_allowed(None, causal)
            if causal and N != M:
                mask = masks.from_allowed(masks.causal(N, M, query.device))
        scale = fixed_scale if exists(fixed_scale) else scaling
        if scale is None:
            scale = query.shape[-1] ** -0.5
        out, weights = descend_and_read_out(
            query, key, value, scale=scale,
            mask=mask, dropout_p=dropout,
            need_weights=bool(kwargs.get("output_attentions", False)), **opts,
        )
        return out.transpose(1, 2).contiguous(), weights  # [B, H, N, D] -> [B, N, H, D]

    return energy_attention_forward


def register(name: str = "energy", **options) -> str:
    """Register energy attention with ``transformers`` under ``name``; returns ``name``.

    Args:
        name: the ``attn_implementation`` string to use afterwards.
        **options: ``num_steps`` (``T >= 1``, default 2), ``step_size`` (``η``, 1.0),
            ``optimizer`` (``"gd"``), ``momentum`` (0.0), ``scale`` (``β``; default the model's
            own ``scaling``, e.g. ``head_dim ** -0.5``). Registering a name again replaces its
            options.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    AttentionInterface.register(name, make_attention_function(**options))
    AttentionMaskInterface.register(name, energy_mask)
    return name
