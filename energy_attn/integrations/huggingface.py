"""Energy attention for Hugging Face ``transformers`` models (optional extra ``[hf]``).

The energy options belong to the model: :func:`set_energy_attention` writes them into the
model's config as one attribute,

    config.energy_attention = {"num_steps": 3, "step_size": 0.5, "optimizer": "nesterov",
                               "momentum": 0.5, "scale": None}

(or a list with one such dict per layer) and switches the model to the ``"energy"``
``attn_implementation``. The attention function reads the options from the config of the
module it runs in, so ``save_pretrained`` stores them in ``config.json``, a reloaded model
(``register()`` then ``from_pretrained(path, attn_implementation="energy")``) computes the
same logits, and differently configured models live side by side in one process.

:func:`register` adds the attention function to ``transformers``' ``AttentionInterface`` and a
mask function to its ``AttentionMaskInterface`` under one name, so any model that dispatches
through them (Llama, Mistral, Qwen2, GPT-2, ...) can run energy attention with

    AutoModelForCausalLM.from_config(cfg, attn_implementation="energy")
    model.set_attn_implementation("energy")

Options given to :func:`register` are the defaults for models whose config has no
``energy_attention`` attribute.

The attention function takes the model's own projected ``query [B, H, N, D]`` and cached
``key/value [B, Hk, M, D]`` (grouped-query heads are descended natively, no copy), runs
``num_steps − 1`` Hopfield descent steps of the queries on the keys and reads out the values
(``num_steps=1`` is the ``sdpa`` implementation). The mask function always materialises the
boolean mask (True = may attend) instead of returning None for a plain causal mask and
relying on SDPA's ``is_causal`` flag: the descent then sees the causal mask too, with or
without a KV cache, padding or a static cache.

Importing :mod:`energy_attn` never imports ``transformers``; this module does, and without it
raises ``ImportError`` saying ``pip install "energy-attn[hf]"``.
"""

from __future__ import annotations

import functools

import torch

try:
    from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
    from transformers.masking_utils import sdpa_mask
except ImportError as err:  # transformers missing, or older than 4.56 (no AttentionMaskInterface)
    raise ImportError(
        "energy_attn.integrations.huggingface needs transformers>=4.56 (AttentionInterface, "
        f"AttentionMaskInterface): pip install \"energy-attn[hf]\" ({err})"
    ) from err

from .. import masks
from .._utils import check_float_tensor, exists
from ._energy_attention import descend_and_read_out
from .torch_mha import _check_energy_options

__all__ = ["energy_mask", "energy_options", "make_attention_function", "register",
           "set_energy_attention"]

# The config attribute holding the options (a dict, or a list of dicts: one per layer).
CONFIG_ATTRIBUTE = "energy_attention"
_OPTION_KEYS = ("num_steps", "step_size", "optimizer", "momentum", "scale")

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


def _check_options(options, where: str) -> dict:
    """One options dict -> the full, checked options; ValueError naming ``where`` and the key."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a dict of energy options, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in _OPTION_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown option(s) {unknown}; known: {list(_OPTION_KEYS)}")
    try:
        return _check_energy_options(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


@functools.lru_cache(maxsize=256)
def _checked(items: tuple, where: str) -> dict:
    # keyed with each value's type too: 1, 1.0 and True are equal as keys but not as options
    return _check_options({k: v for k, _, v in items}, where)


def _layer_options(value, layer_idx, where: str) -> dict:
    """The checked options of one layer from a config's ``energy_attention`` value."""
    if isinstance(value, (list, tuple)):
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(value):
            raise ValueError(f"{where} lists options for {len(value)} layers, but the attention "
                             f"module's layer_idx is {layer_idx!r}")
        value, where = value[layer_idx], f"{where}[{layer_idx}]"
    # torch.compile traces the check itself (and guards on the config's values): it warns
    # about an lru_cache-wrapped call, so the cache serves eager calls only.
    if isinstance(value, dict) and not torch.compiler.is_compiling():
        try:
            key = tuple(sorted((k, type(v), v) for k, v in value.items() if isinstance(k, str)))
            if len(key) == len(value):
                return dict(_checked(key, where))
        except TypeError:  # an unhashable value: check without the cache
            pass
    return _check_options(value, where)


def energy_options(config, layer_idx: int | None = None) -> dict | None:
    """The checked energy options a model's config carries for one layer, or None.

    Args:
        config: a ``transformers`` config (any object with attributes).
        layer_idx: the layer (the attention module's ``layer_idx``); needed when
            ``config.energy_attention`` is a per-layer list.

    Returns:
        ``{"num_steps", "step_size", "optimizer", "momentum", "scale"}`` with the package
        defaults (2, 1.0, ``"gd"``, 0.0, None = the model's own scaling) for keys the config
        leaves out, or None when the config has no ``energy_attention`` attribute.

    Raises:
        ValueError: unknown keys or bad values, naming them.
    """
    value = getattr(config, CONFIG_ATTRIBUTE, None)
    if value is None:
        return None
    return _layer_options(value, layer_idx, f"config.{CONFIG_ATTRIBUTE}")


def make_attention_function(num_steps=2, step_size=1.0, optimizer="gd", momentum=0.0,
                            scale=None):
    """An ``AttentionInterface`` function; these options apply to models whose config has no
    ``energy_attention`` attribute (see :func:`register`)."""
    default_opts = _check_energy_options(num_steps, step_size, optimizer, momentum, scale)

    def energy_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                 scaling=None, is_causal=None, **kwargs):
        """``query [B, H, N, D]``, ``key/value [B, Hk, M, D]``, ``attention_mask`` boolean
        (True = may attend) or additive float ``[B, 1|H, N, M]`` -> ``([B, N, H, D], weights)``.
        An additive mask is a logit bias of the energy: it acts in every descent step and in
        the read-out (``−inf`` / ``<= finfo.min`` blocks). The options come from
        ``module.config.energy_attention`` (at ``module.layer_idx`` for a per-layer list), else
        from the defaults this function was made with."""
        opts = energy_options(getattr(module, "config", None), getattr(module, "layer_idx", None))
        opts = dict(default_opts if opts is None else opts)
        fixed_scale = opts.pop("scale")
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
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            causal = bool(is_causal)
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
        **options: the defaults for models whose config carries no ``energy_attention``
            options (see :func:`set_energy_attention`): ``num_steps`` (``T >= 1``, default 2),
            ``step_size`` (``η``, 1.0), ``optimizer`` (``"gd"``), ``momentum`` (0.0), ``scale``
            (``β``; default the model's own ``scaling``, e.g. ``head_dim ** -0.5``).
            Registering a name again replaces its defaults.

    Raises:
        TypeError: ``name`` is not a non-empty str. ValueError/TypeError: a bad option.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    fn = make_attention_function(**options)
    fn._energy_attn = True  # marks our functions, see set_energy_attention
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, energy_mask)
    return name


def set_energy_attention(model, options=None, *, attn_implementation: str = "energy",
                         **kwargs):
    """Switch a ``transformers`` model to energy attention with options stored in its config.

    Writes ``model.config.energy_attention`` (and the same attribute on every config its
    modules hold, e.g. a multimodal model's ``text_config`` and ``vision_config``), registers
    ``attn_implementation`` with :func:`register` if it is not registered yet, and calls
    ``model.set_attn_implementation``. ``save_pretrained`` then saves the options in
    ``config.json``; to load the model elsewhere::

        register()  # once per process: makes "energy" known to transformers
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="energy")

    Args:
        model: a ``transformers.PreTrainedModel``.
        options: a dict of options, or a list of dicts with one per layer
            (``len == config.num_hidden_layers``); or give one dict's keys as ``**kwargs``.
            Keys: ``num_steps`` (``T >= 1``), ``step_size`` (``η``), ``optimizer``
            (``"gd"``, ``"momentum"``, ``"nesterov"``, ...), ``momentum``, ``scale`` (``β``;
            None = the model's own scaling). Missing keys take the package defaults (2, 1.0,
            ``"gd"``, 0.0, None), never :func:`register`'s, so a saved model means the same in
            every process; the stored dicts hold all five keys.
        attn_implementation: the registered name to switch to (default ``"energy"``).

    Returns:
        ``model`` (switched in place).

    Raises:
        ValueError: unknown option keys, bad values, a per-layer list of the wrong length, or
            ``attn_implementation`` registered to something other than energy attention.
        TypeError: ``model`` has no config, or both ``options`` and ``**kwargs`` are given.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if options is not None and kwargs:
        raise TypeError("give the options either as one dict/list or as keyword arguments, "
                        "not both")
    options = kwargs if options is None else options
    where = f"config.{CONFIG_ATTRIBUTE}"
    if isinstance(options, (list, tuple)):
        layers = getattr(config, "num_hidden_layers", None)
        if layers is not None and len(options) != layers:
            raise ValueError(f"{where}: a per-layer list needs one dict per layer "
                             f"(num_hidden_layers={layers}), got {len(options)}")
        value = [_check_options(o, f"{where}[{i}]") for i, o in enumerate(options)]
    else:
        value = _check_options(options, where)
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise TypeError(f"attn_implementation must be a non-empty str, got {attn_implementation!r}")
    registered = AttentionInterface()
    if attn_implementation not in registered:
        register(attn_implementation)
    elif not getattr(registered[attn_implementation], "_energy_attn", False):
        raise ValueError(f"attn_implementation {attn_implementation!r} is registered to another "
                         "attention function; it would ignore the energy options")
    # The attention function reads its module's config: write every config a module holds
    # (sub-configs such as CLIP's text_config/vision_config, whose modules have no layer_idx).
    configs = {id(config): config}
    for module in model.modules():
        sub = getattr(module, "config", None)
        if isinstance(sub, PretrainedConfig):
            configs.setdefault(id(sub), sub)
    for c in configs.values():
        setattr(c, CONFIG_ATTRIBUTE, value)
    model.set_attn_implementation(attn_implementation)
    return model
