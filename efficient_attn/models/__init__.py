"""Flax NNX Transformers over any attention variant: classifier, dual-encoder pair classifier, causal LM.

    model = create_model(config.model, config.attention, kind='classify', vocab_size=256,
                         num_classes=2, max_length=1024,
                         rngs=nnx.Rngs(params=0, dropout=1, attention=2))
    logits = model(inputs, mask, train=True)   # float32 [batch, num_classes]

See `model_config_defaults` and `attention_config_defaults` for every option.
"""
from efficient_attn.models.config import (attention_config_defaults, describe_options,
                                          layer_override_specs, model_config_defaults,
                                          parse_layer_overrides, require_causal,
                                          resolve_layer_attentions, resolve_model_config,
                                          variant_option_defaults, variant_spec)
from efficient_attn.models.pretraining import create_pretraining_model
from efficient_attn.models.transformer import KINDS, count_params, create_model

__all__ = [
    'KINDS', 'attention_config_defaults', 'count_params', 'create_model', 'create_pretraining_model',
    'describe_options', 'layer_override_specs', 'model_config_defaults', 'parse_layer_overrides',
    'require_causal', 'resolve_layer_attentions', 'resolve_model_config', 'variant_option_defaults',
    'variant_spec',
]
