"""The language model: embedding -> blocks (x + mixer(norm x), x + mlp(norm x)) -> norm -> head."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from rnnscale.kernels.common.recompute import recompute_allowed, with_recipes
from rnnscale.parallel.sequence import group_sum
from rnnscale.train.model import flops
from rnnscale.train.model.layers import RMSNorm, SwiGLU, mlp_hidden_size
from rnnscale.train.model.loss import IGNORE_INDEX, chunked_cross_entropy, chunked_token_scores


@contextlib.contextmanager
def _whole(params):
    """Parameters whole inside the block. Under DeepSpeed's `zero.Init` (ZeRO-3 builds the model
    already partitioned) each module's parameters are sharded once its constructor returns, so
    initialising them afterwards gathers them first and lets rank 0's values win; otherwise
    nothing to do."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, x, *, cu_seqlens=None, state=None, shard=None):
        """The projections that read a normalised x keep the recipe of it, not the rows
        (`rnnscale.kernels.common.recompute`)."""
        kwargs = {} if shard is None else {"shard": shard}
        h, again = self.mixer_norm(x, with_recipe=True)
        y, state = with_recipes({h: again}, self.mixer, h, cu_seqlens=cu_seqlens, state=state,
                                **kwargs)  # fmt: skip
        x = x + y
        h, again = self.mlp_norm(x, with_recipe=True)
        return x + with_recipes({h: again}, self.mlp, h), state


class LanguageModel(nn.Module):
    """A causal language model over a stack of token mixers (see `build_model`).

    `forward(input_ids [B, T], *, cu_seqlens=None, state=None) -> (logits [B, T, vocab], state)`,
    where state is a list with one entry per layer (the recurrent state or the attention cache);
    feeding it back continues the sequences exactly where they stopped.
    """

    def __init__(self, cfg, mixers: list[nn.Module], layer_types: list[str],
                 loss_chunk_tokens: int = 4096, recompute_activations: bool = True):  # fmt: skip
        super().__init__()
        self.cfg = cfg
        self.loss_chunk_tokens = loss_chunk_tokens  # kernels.loss_chunk_tokens
        self.layer_types = layer_types
        self.activation_checkpointing = False  # per block; the trainer sets it from the config
        self.recompute_activations = recompute_activations  # kernels.recompute_activations
        self.compiled = False  # compile_blocks: inductor chooses what to recompute
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        hidden = mlp_hidden_size(cfg.d_model, cfg.mlp_hidden)
        self.blocks = nn.ModuleList(Block(m, cfg.d_model, hidden, cfg.norm_eps) for m in mixers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_module)
        for mixer in mixers:  # a mixer's own parameterisation (decay ranges, dt, ...) comes last
            if hasattr(mixer, "init_weights"):
                with _whole(mixer.parameters()):
                    mixer.init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_module(self, module: nn.Module) -> None:
        with _whole(module.parameters(recurse=False)):
            self._init_weights(module)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, *, labels=None, cu_seqlens=None, state=None,
                shard=None, scores: bool = False):  # fmt: skip
        """With `labels`: the loss (see `loss`), as the DeepSpeed engine calls it; else
        `(logits, state)`. With `labels` and `scores` (evaluation, no shard): `((nll, right),
        state)`, each `[B, T]`: every label's cross-entropy and whether it is the most likely
        token, computed `kernels.loss_chunk_tokens` tokens at a time (no whole logits; under
        ZeRO-3 the head is whole only inside this forward).

        shard: under sequence parallelism, the `rnnscale.parallel.sequence.Shard` this rank
            holds; input_ids and labels are then its slice, cu_seqlens the slice's own (its
            `shard.cu_seqlens`), and the loss is the slice's share of the whole rows' mean
            (the shares of a sequence group add up to it)."""
        hidden, state = self.hidden_states(
            input_ids, cu_seqlens=cu_seqlens, state=state, shard=shard
        )
        if labels is not None and scores:
            nll, right = chunked_token_scores(hidden.flatten(0, 1), self.head.weight,
                                              labels.flatten(), self.loss_chunk_tokens)  # fmt: skip
            return (nll.view(labels.shape), right.view(labels.shape)), state
        if labels is not None:
            labels = labels.flatten()
            count = None
            if shard is not None:  # the token count of the whole rows
                count = group_sum(shard, (labels != IGNORE_INDEX).sum())
            return chunked_cross_entropy(
                hidden.flatten(0, 1), self.head.weight, labels, self.loss_chunk_tokens, count
            )
        return self.head(hidden), state  # (B, T, vocab)

    def hidden_states(self, input_ids: torch.Tensor, *, cu_seqlens=None, state=None, shard=None):
        """The normalised last hidden states `[B, T, d_model]` (before the head) and the state."""
        if shard is not None and state is not None:
            raise ValueError(
                "sequence parallelism runs whole sequences from their start (training, "
                "evaluation): pass state=None, or run generation without a shard"
            )
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(
                "cu_seqlens needs input_ids packed into one row, got shape "
                f"{tuple(input_ids.shape)}"
            )
        state = [None] * len(self.blocks) if state is None else state
        x = self.embed(input_ids)  # (B, T, d_model)
        new_state = []
        whole = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block, s in zip(self.blocks, state, strict=True):
            if whole and s is None:  # keep only the block's input; redo it in the backward
                x, s = checkpoint(
                    block, x, cu_seqlens=cu_seqlens, state=None, shard=shard, use_reentrant=False
                )
            else:
                with recompute_allowed(self.recompute_activations and not self.compiled):
                    x, s = block(x, cu_seqlens=cu_seqlens, state=s, shard=shard)
            new_state.append(s)
        return self.norm(x), new_state

    def compile_blocks(self) -> None:
        """`torch.compile` every block in place (`Module.compile`: the state dict keeps its
        keys), as torchtitan compiles each transformer block. The scan dispatcher is outside
        every graph (`rnnscale.train.model.scan.scan` is `torch.compiler.disable`d): our
        chunkwise and Triton kernels run as they are, and inductor fuses what is around them.
        Our recomputed activations step aside: inductor's partitioner chooses what to recompute."""
        self.compiled = True
        for block in self.blocks:
            block.compile()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *, cu_seqlens=None):
        """Mean next-token cross-entropy against `labels [B, T]` (-100: ignored), computed
        `kernels.loss_chunk_tokens` tokens at a time without the whole logits tensor."""
        return self(input_ids, labels=labels, cu_seqlens=cu_seqlens)

    def num_params(self) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at sequence length `seq_len`: every mixer's own count (its
        projections and its scan or attention), the SwiGLU MLPs and the output head. A training
        step costs 3x this per token (train/model/flops.py)."""
        d, hidden = self.cfg.d_model, self.blocks[0].mlp.up.out_features if self.blocks else 0
        mlp = 2 * flops.linear(d, hidden) + flops.linear(hidden, d)
        mixers = sum(block.mixer.flops_per_token(seq_len) for block in self.blocks)
        return mixers + len(self.blocks) * mlp + flops.linear(d, self.cfg.vocab_size)
