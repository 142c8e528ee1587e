"""Decoder-only Transformer language model (GPT-2's shape), from torch.nn's layers.

    forward(tokens (B, T) long) -> logits (B, T, V);  position t predicts token t + 1

- causal self-attention: `nn.TransformerEncoderLayer` given a causal mask with `is_causal=True`
  (its fast path runs `F.scaled_dot_product_attention(is_causal=True)`);
- pre-norm (LayerNorm before each sub-layer and once after the stack), GELU feed-forward;
- learned positions, up to `context` tokens (the model's maximum; longer inputs are an error);
- tied embeddings: the output projection is the token embedding matrix, stored once.
Models know nothing of torch.distributed. Registered presets take the registry's
(num_classes, input_shape, **options): num_classes is the vocabulary size, input_shape is ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class DecoderLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int = 768, heads: int = 12, layers: int = 12,
                 ffn: int | None = None, context: int = 1024, dropout: float = 0.1):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.vocab_size, self.context = vocab_size, context
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn or 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialization: N(0, 0.02) for embeddings and matrices, zero biases."""
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context {self.context}")
        pos = torch.arange(t, device=tokens.device)
        x = self.dropout(self.embed(tokens) + self.positions(pos))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=x.dtype)
        h = self.blocks(x, mask=mask, is_causal=True)
        return F.linear(h, self.embed.weight)  # tied output projection

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at `seq_len` tokens per block (PaLM's and
        nanoGPT's estimate): 6 N + 12 L d T, N the parameters doing matrix products (all but the
        position table; the tied embedding counts once, as the output projection), L layers, d the
        width; 12 L d T is attention's scores and weighted sum (causal masking not discounted)."""
        n = sum(p.numel() for p in self.parameters()) - self.positions.weight.numel()
        d, layers = self.embed.embedding_dim, len(self.blocks.layers)
        return 6 * n + 12 * layers * d * seq_len

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, top_k: int = 40,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """prompt (B, T0) -> (B, T0 + new_tokens): top-k sampling (top_k=1 is greedy), seeded by
        `generator`; the model sees at most its last `context` tokens."""
        out = prompt
        for _ in range(new_tokens):
            logits = self(out[:, -self.context:])[:, -1].float()
            top, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            choice = torch.multinomial(F.softmax(top, dim=-1).cpu(), 1, generator=generator).to(idx.device)
            out = torch.cat([out, idx.gather(1, choice)], dim=1)
        return out


def _gpt(vocab: int, options: dict, **shape) -> DecoderLM:
    """The preset's shape (d_model, heads, layers, context); model.options may change any of it
    (a narrower gpt2_small for a quick benchmark)."""
    return DecoderLM(vocab, **{**shape, **options})


@register_model("gpt_tiny", kind="lm")
def gpt_tiny(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """CPU size: 4 layers, d 128, 4 heads, feed-forward 512, context 256; about 1.3 M parameters
    with a 4k vocabulary (0.8 M in the blocks, 0.5 M in embeddings)."""
    return _gpt(num_classes, options, d_model=128, heads=4, layers=4, context=256)


@register_model("gpt2_small", kind="lm")
def gpt2_small(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """GPT-2 small: 12 layers, d 768, 12 heads, feed-forward 3072, context 1024; 124 M parameters
    with GPT-2's 50,257-token vocabulary (85 M in the blocks)."""
    return _gpt(num_classes, options, d_model=768, heads=12, layers=12, context=1024)
