"""An rnnscale language model for transformers: `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` on a directory `rnnscale export --format hf` wrote. Plain PyTorch (the
chunkwise and one-step forms of `layers_rnnscale.py`), on CPU or GPU, without rnnscale.

The module tree and the parameter names are rnnscale's own (`embed`, `blocks.<i>.mixer_norm`,
`blocks.<i>.mixer.*`, `blocks.<i>.mlp_norm`, `blocks.<i>.mlp.{gate,up,down}`, `norm`, `head`), so
the weights load in both directions unchanged. `generate()` carries a recurrent cache: one state
per layer (the recurrent state and convolution tails; keys and values for attention, the last
window - 1 of them for sliding-window attention), so a recurrent layer costs O(1) per new token.
Padding must be on the left (the tokenizer pads there); a padded position is invisible to every
layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_rnnscale import RnnscaleConfig
from .layers_rnnscale import rms_norm
from .mixers_rnnscale import MIXERS


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: RnnscaleConfig, layer_idx: int):
        super().__init__()
        name, d, eps = config.layer_types[layer_idx], config.d_model, config.norm_eps
        self.mixer_norm, self.mlp_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.mixer = MIXERS[name](config.mixers[name], d, config.num_heads, eps, layer_idx,
                                  config.chunk_sizes)  # fmt: skip
        self.mlp = SwiGLU(d, config.mlp_hidden)

    def forward(self, x, state, mask):
        y, state = self.mixer(self.mixer_norm(x), state, mask)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state


class RnnscaleCache:
    """The state of every layer after the tokens seen so far (`past_key_values`)."""

    def __init__(self, states: list):
        self.states = states

    def __len__(self) -> int:
        return len(self.states)

    def select(self, rows: torch.Tensor) -> RnnscaleCache:
        """The cache of `rows` (beam search reorders its beams with it)."""

        def pick(s):
            if isinstance(s, torch.Tensor):
                return s.index_select(0, rows.to(s.device))
            if isinstance(s, (tuple, list)):
                return type(s)(pick(x) for x in s)
            return s

        return RnnscaleCache([pick(s) for s in self.states])


class RnnscalePreTrainedModel(PreTrainedModel):
    config_class = RnnscaleConfig
    base_model_prefix = "rnnscale"
    _no_split_modules = ["Block"]
    _is_stateful = True  # its own cache; no DynamicCache, no assisted decoding

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()


def _left_padding(attention_mask, T: int, cached: bool):
    """The mask of the new tokens `[B, T]` as booleans, or None when every token is real. Only
    left padding is allowed, and only before any token has been cached."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -T:].bool()
    if bool(mask.all()):
        return None
    grows = (mask[:, 1:].long() - mask[:, :-1].long()) >= 0
    if cached or not bool(grows.all()):
        raise ValueError(
            "rnnscale models take left padding only (zeros before a row's first token, in the "
            "first call): pad on the left (tokenizer.padding_side = 'left'), or run one row at "
            "a time"
        )
    return mask


class RnnscaleForCausalLM(RnnscalePreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["head.weight"]

    def __init__(self, config: RnnscaleConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None,
                use_cache=None, inputs_embeds=None, return_dict=None, **kwargs):  # fmt: skip
        """`CausalLMOutputWithPast`: logits `[B, T, vocab]`, the loss against `labels` (shifted
        here, -100 ignored), and the cache after these tokens in `past_key_values`."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values
        states = cache.states if cache is not None else [None] * len(self.blocks)
        mask = _left_padding(attention_mask, x.shape[1], cache is not None)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state, mask)
            new_states.append(state)
        logits = self.head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device))  # fmt: skip
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = RnnscaleCache(new_states) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):  # fmt: skip
        """The whole prompt first, then only the newest token with the cache."""
        if past_key_values is not None:
            input_ids, inputs_embeds = input_ids[:, -1:], None
        return {
            "input_ids": None if inputs_embeds is not None else input_ids,
            "inputs_embeds": inputs_embeds,
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }

    def _reorder_cache(self, past_key_values: RnnscaleCache, beam_idx: torch.Tensor):
        return past_key_values.select(beam_idx)
