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
from collections.abc import Callable

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
        """Xavier-uniform matrices; N(0, d^-1/2) token and position embeddings (fairseq's), with a
        zero padding row."""
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name and "positions" not in name:
                nn.init.xavier_uniform_(p)
        for emb in self.embeddings():
            nn.init.normal_(emb.weight, mean=0.0, std=self.d_model ** -0.5)
            with torch.no_grad():
                emb.weight[self.pad_idx].zero_()
        if self.positions is not None:
            nn.init.normal_(self.positions.weight, mean=0.0, std=self.d_model ** -0.5)

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

    def decoder_states(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        """tgt_in (B, T) -> final decoder states (B, T, d). Padding sits after the tokens of each row,
        so the causal mask alone keeps real positions from seeing it; padded outputs are ignored."""
        length = tgt_in.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tgt_in.device), diagonal=1)
        table = self.embed if self.share_embeddings else self.tgt_embed
        return self.decoder(self._embed(tgt_in, table), memory, tgt_mask=causal, tgt_is_causal=True,
                            memory_key_padding_mask=src_pad)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        """tgt_in (B, T) -> logits (B, T, V)."""
        return F.linear(self.decoder_states(tgt_in, memory, src_pad), self.output_weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per target token when source and target are `seq_len`
        tokens long (one source token per target token): 6 N + 12 d T (L_enc + 2 L_dec), N the
        encoder's, decoder's and output projection's parameters (embedding lookups and positions
        are not matrix products), 12 d T per attention (the decoder has self and cross)."""
        n = sum(p.numel() for p in (*self.encoder.parameters(), *self.decoder.parameters()))
        n += self.output_weight.numel()
        attention = len(self.encoder.layers) + 2 * len(self.decoder.layers)
        return 6 * n + 12 * self.d_model * seq_len * attention


# ---------------------------------------------------------------------------------------------
# Decoding


class DecoderState:
    """Incremental decoding: one new target token per step, attention keys and values cached.

    Recomputing the whole prefix at every step costs O(L^2) decoder passes for L tokens; this
    computes each position once, with the same weights and the same arithmetic as
    `Seq2SeqTransformer.decode` in eval mode (no dropout). Rows can be reordered (beam search).
    """

    def __init__(self, model: Seq2SeqTransformer, memory: torch.Tensor, src_pad: torch.Tensor):
        self.model, self.length = model, 0
        self.layers = list(model.decoder.layers)
        self.heads = self.layers[0].self_attn.num_heads
        self.attend_src = ~src_pad[:, None, None, :]  # (B, 1, 1, S), True where a key may be attended
        # Cross-attention keys and values depend on the source only: project them once.
        self.memory_kv = [self._project(layer.multihead_attn, memory, 1, 3) for layer in self.layers]
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, H, L, d / H)."""
        b, length, d = x.shape
        return x.view(b, length, self.heads, d // self.heads).transpose(1, 2)

    def _project(self, mha: nn.MultiheadAttention, x: torch.Tensor, first: int, last: int):
        """Rows first..last-1 of q, k, v of `mha`'s packed input projection applied to x, split by heads."""
        d = x.shape[-1]
        w = mha.in_proj_weight[first * d:last * d]
        b = mha.in_proj_bias[first * d:last * d] if mha.in_proj_bias is not None else None
        return tuple(self._heads(t) for t in F.linear(x, w, b).chunk(last - first, dim=-1))

    def _attention(self, mha: nn.MultiheadAttention, q, k, v, mask=None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, d / H)
        return mha.out_proj(out.transpose(1, 2).flatten(2))

    def _self_attention(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._project(layer.self_attn, x, 0, 3)
        if self.self_kv[i] is not None:  # the new position attends to every earlier one and itself
            k, v = torch.cat([self.self_kv[i][0], k], dim=2), torch.cat([self.self_kv[i][1], v], dim=2)
        self.self_kv[i] = (k, v)
        return self._attention(layer.self_attn, q, k, v)

    def _cross_attention(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        (q,) = self._project(layer.multihead_attn, x, 0, 1)
        k, v = self.memory_kv[i]
        return self._attention(layer.multihead_attn, q, k, v, self.attend_src)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at the next position -> logits (B, V) of the token after them."""
        m = self.model
        table = m.embed if m.share_embeddings else m.tgt_embed
        x = table(tokens.unsqueeze(1)) * math.sqrt(m.d_model)  # (B, 1, d)
        if m.positions is not None:
            x = x + m.positions.weight[self.length]
        else:
            x = x + sinusoids(self.length + 1, m.d_model, x.device, x.dtype)[-1]
        for i, layer in enumerate(self.layers):
            ff = lambda h: layer.linear2(layer.activation(layer.linear1(h)))  # noqa: E731
            if layer.norm_first:
                x = x + self._self_attention(i, layer, layer.norm1(x))
                x = x + self._cross_attention(i, layer, layer.norm2(x))
                x = x + ff(layer.norm3(x))
            else:
                x = layer.norm1(x + self._self_attention(i, layer, x))
                x = layer.norm2(x + self._cross_attention(i, layer, x))
                x = layer.norm3(x + ff(x))
        if m.decoder.norm is not None:
            x = m.decoder.norm(x)
        self.length += 1
        return F.linear(x[:, 0], m.output_weight)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (B',) of the batch, in that order (beam search's surviving hypotheses)."""
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]
        self.memory_kv = [(k[rows], v[rows]) for k, v in self.memory_kv]
        self.attend_src = self.attend_src[rows]


def _never(logits: torch.Tensor, *ids: int) -> torch.Tensor:
    """Logits with the given tokens (padding, BOS) made impossible to generate."""
    logits[:, list(ids)] = float("-inf")
    return logits


def _limits(max_len: int | torch.Tensor, batch: int) -> list[int]:
    """Per-sentence length limits: one int for all, or one per row (so that a sentence's output
    does not depend on which other sentences share its batch)."""
    if isinstance(max_len, torch.Tensor):
        return [int(v) for v in max_len.tolist()]
    return [int(max_len)] * batch


Combine = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor, bos: int, eos: int,
                  max_len: int | torch.Tensor, combine: Combine | None = None) -> torch.Tensor:
    """(B, S) sources -> (B, L) generated ids (no BOS; after EOS or the row's max_len: padding).

    max_len: the longest output, for all rows or per row (B,). combine: as in `beam_search`.
    """
    state = DecoderState(model, *model.encode(src))
    batch, device = src.shape[0], src.device
    limits = torch.tensor(_limits(max_len, batch), device=device)
    nxt = torch.full((batch,), bos, dtype=torch.long, device=device)
    done = limits.le(0)
    out = []
    for step in range(int(limits.max())):
        logits = _never(state.step(nxt).float(), model.pad_idx, bos)
        if combine is not None:
            logits = combine(F.log_softmax(logits, dim=-1))
        nxt = logits.argmax(-1).masked_fill(done, model.pad_idx)
        out.append(nxt)
        done |= nxt.eq(eos) | limits.le(step + 1)
        if bool(done.all()):
            break
    return torch.stack(out, dim=1) if out else torch.full((batch, 1), model.pad_idx, device=device)


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: torch.Tensor, bos: int, eos: int,
                max_len: int | torch.Tensor, beam: int = 4, length_penalty: float = 1.0,
                combine: Combine | None = None) -> torch.Tensor:
    """(B, S) sources -> (B, L) best hypotheses by log-probability / length^length_penalty.

    Each step extends every live hypothesis by every token and keeps the `beam` best that do not
    end; those ending (EOS, or reaching max_len) are set aside. A sentence is done once it has
    `beam` finished hypotheses (fairseq's stopping rule). beam = 1 is greedy decoding. max_len: the
    longest output, for all sentences or per sentence (B,).

    combine: maps each step's log-probabilities (rows, V) to the ones hypotheses are chosen by; an
    ensemble whose models live in other processes passes the log of their mean probability. Every
    process decoding together must get the same result back, so that their hypotheses stay in step.
    """
    if beam <= 1:
        return greedy_decode(model, src, bos, eos, max_len, combine)
    batch, device, ninf = src.shape[0], src.device, float("-inf")
    memory, src_pad = model.encode(src)
    state = DecoderState(model, memory.repeat_interleave(beam, dim=0), src_pad.repeat_interleave(beam, dim=0))
    tokens = torch.full((batch * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = ninf  # the beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    limits = _limits(max_len, batch)
    closed = [limit <= 0 for limit in limits]
    for step in range(1, max(limits) + 1):
        logp = F.log_softmax(_never(state.step(tokens[:, -1]).float(), model.pad_idx, bos), dim=-1)  # (B*beam, V)
        if combine is not None:
            logp = combine(logp)
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
                if token == eos or step >= limits[b]:
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
        rows_t = torch.tensor(rows, device=device)
        state.reorder(rows_t)
        tokens = torch.cat([tokens[rows_t], torch.tensor(new_tokens, device=device).unsqueeze(1)], dim=1)
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


@register_model("transformer_big", kind="seq2seq")
def transformer_big(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """Transformer "big" (Vaswani et al.; the paper's WMT'16 En-De model): 6+6 layers, d 1024,
    16 heads, feed-forward 4096; about 209M parameters with a shared 32k vocabulary."""
    return _transformer(num_classes, 1024, 16, 4096, 6, **options)


@register_model("transformer_base", kind="seq2seq")
def transformer_base(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """Transformer "base": 6+6 layers, d 512, 8 heads, feed-forward 2048."""
    return _transformer(num_classes, 512, 8, 2048, 6, **options)


@register_model("transformer_tiny", kind="seq2seq")
def transformer_tiny(num_classes: int, input_shape: tuple[int, ...] = (), **options) -> nn.Module:
    """Test and CPU size: 2+2 layers, d 128, 4 heads, feed-forward 256."""
    return _transformer(num_classes, 128, 4, 256, 2, **options)
