"""Encoder-decoder Transformer for translation (Vaswani et al. 2017), from torch.nn's layers.

    forward(src (B, S) long, tgt_in (B, T) long) -> logits (B, T, V)

`tgt_in` is BOS + target; position t predicts target token t (causal decoder self-attention).
Choices, all options of `Seq2SeqTransformer`:
- positions: sinusoidal (default, no length limit, nothing to learn) or learned (`learned_positions`,
  up to `max_positions`);
- normalization: pre-norm by default (`norm_first`, LayerNorm before each sub-layer and once more
  at the end of each stack), which trains stably without a long warm-up; `norm_first=False` is the
  original post-norm of Vaswani et al. and fairseq's default;
- `share_embeddings` (default on): one embedding matrix for source, target and the output
  projection (needs a joint vocabulary, which the translation task's tokenizer is); it is stored
  once, so exchanges move it once;
- `dropout` on embeddings, attention weights, feed-forward activations and residual branches.
Embeddings are scaled by sqrt(d_model). Models know nothing of torch.distributed.

Registered presets take the registry's (num_classes, input_shape, **options): num_classes is the
vocabulary size, input_shape is ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


def sinusoids(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, dim) sinusoidal position encodings: sin on even, cos on odd dimensions."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    inv = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(pos * inv)
    out[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return out.to(dtype)


class Seq2SeqTransformer(nn.Module):
    def __init__(self, vocab_size: int, d_model: int = 512, heads: int = 8, ffn: int = 2048,
                 encoder_layers: int = 6, decoder_layers: int = 6, dropout: float = 0.1, pad_idx: int = 0,
                 share_embeddings: bool = True, norm_first: bool = True, learned_positions: bool = False,
                 max_positions: int = 1024, activation: str = "relu"):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.vocab_size, self.d_model, self.pad_idx = vocab_size, d_model, pad_idx
        self.share_embeddings = share_embeddings
        if share_embeddings:
            self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_idx)
        else:
            self.src_embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_idx)
            self.tgt_embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_idx)
            self.output = nn.Linear(d_model, vocab_size, bias=False)
        self.positions = nn.Embedding(max_positions, d_model) if learned_positions else None
        self.max_positions = max_positions if learned_positions else None
        self.dropout = nn.Dropout(dropout)
        layer = dict(d_model=d_model, nhead=heads, dim_feedforward=ffn, dropout=dropout,
                     activation=activation, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer), encoder_layers,
            norm=nn.LayerNorm(d_model) if norm_first else None, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer), decoder_layers, norm=nn.LayerNorm(d_model) if norm_first else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, N(0, d^-1/2) embeddings (fairseq's), zero padding row."""
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name and "positions" not in name:
                nn.init.xavier_uniform_(p)
        for emb in self.embeddings():
            nn.init.normal_(emb.weight, mean=0.0, std=self.d_model ** -0.5)
            with torch.no_grad():
                emb.weight[self.pad_idx].zero_()

    def embeddings(self) -> list[nn.Embedding]:
        return [self.embed] if self.share_embeddings else [self.src_embed, self.tgt_embed]

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, d_model): the output projection (the shared embedding when tied)."""
        return self.embed.weight if self.share_embeddings else self.output.weight

    def _embed(self, tokens: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        """(B, L) -> (B, L, d): scaled token embedding plus positions, then dropout."""
        length = tokens.shape[1]
        x = table(tokens) * math.sqrt(self.d_model)
        if self.positions is not None:
            if length > self.max_positions:
                raise ValueError(f"sequence of {length} tokens exceeds max_positions {self.max_positions}")
            x = x + self.positions(torch.arange(length, device=tokens.device))
        else:
            x = x + sinusoids(length, self.d_model, tokens.device, x.dtype)
        return self.dropout(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> (memory (B, S, d), source padding mask (B, S), True at padding)."""
        src_pad = src.eq(self.pad_idx)
        table = self.embed if self.share_embeddings else self.src_embed
        memory = self.encoder(self._embed(src, table), src_key_padding_mask=src_pad)
        return memory, src_pad

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        """tgt_in (B, T) -> logits (B, T, V). Padding sits after the tokens of each row, so the causal
        mask alone keeps real positions from seeing it; padded positions' outputs are ignored."""
        length = tgt_in.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        table = self.embed if self.share_embeddings else self.tgt_embed
        h = self.decoder(self._embed(tgt_in, table), memory, tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=src_pad)
        return F.linear(h, self.output_weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)


# ---------------------------------------------------------------------------------------------
# Decoding


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor, bos: int, eos: int, max_len: int) -> torch.Tensor:
    """(B, S) sources -> (B, L) generated ids (no BOS; EOS then padding after a finished row)."""
    memory, src_pad = model.encode(src)
    batch = src.shape[0]
    out = torch.full((batch, 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(batch, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = model.decode(out, memory, src_pad)[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, model.pad_idx)
        out = torch.cat([out, nxt.unsqueeze(1)], dim=1)
        done |= nxt.eq(eos)
        if bool(done.all()):
            break
    return out[:, 1:]


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: torch.Tensor, bos: int, eos: int, max_len: int,
                beam: int = 4, length_penalty: float = 1.0) -> torch.Tensor:
    """(B, S) sources -> (B, L) best hypotheses by log-probability / length^length_penalty.

    Each step extends every live hypothesis by every token and keeps the `beam` best that do not
    end; those ending (EOS, or reaching max_len) are set aside. A sentence is done once it has
    `beam` finished hypotheses (fairseq's stopping rule). beam = 1 is greedy decoding.
    """
    if beam <= 1:
        return greedy_decode(model, src, bos, eos, max_len)
    batch, device, ninf = src.shape[0], src.device, float("-inf")
    memory, src_pad = model.encode(src)
    memory = memory.repeat_interleave(beam, dim=0)  # (B * beam, S, d)
    src_pad = src_pad.repeat_interleave(beam, dim=0)
    tokens = torch.full((batch * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = ninf  # the beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    closed = [False] * batch
    for step in range(1, max_len + 1):
        logp = F.log_softmax(model.decode(tokens, memory, src_pad)[:, -1].float(), dim=-1)  # (B*beam, V)
        vocab = logp.shape[-1]
        top, idx = (scores.view(-1, 1) + logp).view(batch, beam * vocab).topk(2 * beam, dim=-1)
        top, idx = top.tolist(), idx.tolist()
        rows, new_tokens, new_scores = [], [], [[ninf] * beam for _ in range(batch)]
        for b in range(batch):
            kept = 0
            for s, i in zip(top[b], idx[b]):
                if closed[b] or s == ninf or kept == beam:
                    break
                origin, token = divmod(i, vocab)
                if token == eos or step == max_len:
                    seq = tokens[b * beam + origin, 1:].tolist() + [token]
                    finished[b].append((s / len(seq) ** length_penalty, seq))
                    closed[b] = len(finished[b]) >= beam
                    continue
                rows.append(b * beam + origin)
                new_tokens.append(token)
                new_scores[b][kept] = s
                kept += 1
            if closed[b]:
                new_scores[b] = [ninf] * beam
            rows += [b * beam] * (beam - kept)  # dead slots: any row, score -inf
            new_tokens += [model.pad_idx] * (beam - kept)
        if all(closed):
            break
        tokens = torch.cat([tokens[torch.tensor(rows, device=device)],
                            torch.tensor(new_tokens, device=device).unsqueeze(1)], dim=1)
        scores = torch.tensor(new_scores, device=device)
    best = [max(f, key=lambda x: x[0])[1] if f else [eos] for f in finished]
    out = torch.full((batch, max(len(s) for s in best)), model.pad_idx, dtype=torch.long, device=device)
    for b, seq in enumerate(best):
        out[b, : len(seq)] = torch.tensor(seq, device=device)
    return out


# ---------------------------------------------------------------------------------------------
# Presets


def _transformer(num_classes: int, d_model: int, heads: int, ffn: int, layers: int, **options) -> nn.Module:
    options = {"encoder_layers": layers, "decoder_layers": layers, **options}
    return Seq2SeqTransformer(num_classes, d_model=d_model, heads=heads, ffn=ffn, **options)


@register_model("transformer_big")
def transformer_big(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """Transformer "big" (Vaswani et al.; the paper's WMT'16 En-De model): 6+6 layers, d 1024,
    16 heads, feed-forward 4096; about 209M parameters with a shared 32k vocabulary."""
    return _transformer(num_classes, 1024, 16, 4096, 6, **options)


@register_model("transformer_base")
def transformer_base(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """Transformer "base": 6+6 layers, d 512, 8 heads, feed-forward 2048."""
    return _transformer(num_classes, 512, 8, 2048, 6, **options)


@register_model("transformer_tiny")
def transformer_tiny(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """Test and CPU size: 2+2 layers, d 128, 4 heads, feed-forward 256."""
    return _transformer(num_classes, 128, 4, 256, 2, **options)
