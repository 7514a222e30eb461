"""nn.MultiheadAttention under book-keeping: the same forward, with its projections observed.

``F.multi_head_attention_forward`` applies ``in_proj_weight`` and ``out_proj.weight`` with F.linear
internally, where no hook can see the inputs and output gradients. The kernel therefore replaces
the module instance's ``forward`` (parameters, names and state_dict unchanged) with a copy of
PyTorch's training path (nn.MultiheadAttention.forward + F.multi_head_attention_forward, torch 2.x)
in which each projection is an observed linear map. Self-attention keeps PyTorch's single packed
q/k/v projection (one site over ``in_proj_weight``); cross-attention uses row slices of it.
Evaluation (no grad) runs PyTorch's own forward, fast path included. ``add_bias_kv`` and
``add_zero_attn`` are refused (extra sequence positions with their own parameters).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dptrain.clipping._layers import LayerKernel, Recorder, Refusal
from dptrain.clipping._sites import LinearSite, NormStrategy, Site
from dptrain.errors import ClippingProtocolError

__all__ = ["AttentionKernel", "attention_kernel"]

_ORDER = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")


def attention_kernel(
    name: str, m: nn.MultiheadAttention, names: set[str], strategy: NormStrategy
) -> AttentionKernel | Refusal:
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True appends learned key/value positions (no kernel); use add_bias_kv=False"
    if m.add_zero_attn:
        return "add_zero_attn=True is not supported by the book-keeping attention kernel"
    return AttentionKernel(name, m, names, strategy)


def _site(label: str, strategy: NormStrategy, weight: Any, bias: Any, **slices: slice) -> LinearSite | None:
    if weight is None and bias is None:
        return None  # nothing trainable here: plain F.linear
    return LinearSite(label, weight=weight, bias=bias, strategy=strategy, **slices)


class AttentionKernel(LayerKernel):
    """Sites for the packed/sliced/separate in-projections and the out-projection of one attention module."""

    def __init__(self, name: str, m: nn.MultiheadAttention, names: set[str], strategy: NormStrategy) -> None:
        def trainable(attribute: str, holder: nn.Module = m, prefix: str = "") -> nn.Parameter | None:
            parameter = getattr(holder, attribute, None)
            return parameter if prefix + attribute in names and isinstance(parameter, nn.Parameter) else None

        e = m.embed_dim
        bias = trainable("in_proj_bias")
        self.packed: LinearSite | None = None
        if m._qkv_same_embed_dim:
            w = trainable("in_proj_weight")
            self.packed = _site(f"{name} (q/k/v projection)", strategy, w, bias)
            kv_rows = {"weight_rows": slice(e, 3 * e), "bias_slice": slice(e, 3 * e)}
            self.kv = _site(f"{name} (k/v projection)", strategy, w, bias, **kv_rows)
            weights = (w, w, w)
        else:
            self.kv = None
            weights = (trainable("q_proj_weight"), trainable("k_proj_weight"), trainable("v_proj_weight"))
        self.q, self.k, self.v = (
            _site(
                f"{name} ({part} projection)",
                strategy,
                weight,
                bias,
                **({"weight_rows": slice(i * e, (i + 1) * e)} if m._qkv_same_embed_dim else {}),
                bias_slice=slice(i * e, (i + 1) * e),
            )
            for i, (part, weight) in enumerate(zip("qkv", weights, strict=True))
        )
        self.out = _site(
            f"{name} (out_proj)",
            strategy,
            trainable("weight", m.out_proj, "out_proj."),
            trainable("bias", m.out_proj, "out_proj."),
        )
        owned = [(attribute, p) for attribute in _ORDER if (p := trainable(attribute)) is not None]
        for attribute in ("weight", "bias"):
            if (p := trainable(attribute, m.out_proj, "out_proj.")) is not None:
                owned.append((f"out_proj.{attribute}", p))
        sites: list[Site] = [s for s in (self.packed, self.kv, self.q, self.k, self.v, self.out) if s is not None]
        super().__init__(name, m, owned, sites)
        self.attention = m

    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        m = self.attention

        def forward(  # noqa: PLR0917 - nn.MultiheadAttention.forward's own signature
            query: Tensor,
            key: Tensor,
            value: Tensor,
            key_padding_mask: Tensor | None = None,
            need_weights: bool = True,
            attn_mask: Tensor | None = None,
            average_attn_weights: bool = True,
            is_causal: bool = False,
        ) -> tuple[Tensor, Tensor | None]:
            arguments = (key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
            if not torch.is_grad_enabled():
                return nn.MultiheadAttention.forward(m, query, key, value, *arguments)
            if query.dim() != 3:
                raise ClippingProtocolError(
                    f"{self.name}: unbatched attention input of shape {tuple(query.shape)}; book-keeping clipping "
                    "needs a batch dimension"
                )
            recorder.enter(self)
            return self._forward(
                recorder,
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )

        m.__dict__["forward"] = forward  # instance attribute: nn.Module.__call__ calls it; state_dict unchanged
        return []

    def uninstall(self) -> None:
        self.attention.__dict__.pop("forward", None)

    def _linear(self, recorder: Recorder, site: LinearSite | None, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        # A strided 3-D input with no operand requiring grad would make F.linear broadcast the weight into a
        # slow batched matmul: give it a contiguous input (same values).
        x = x.contiguous()
        out = F.linear(x, w, b)
        return out if site is None else recorder.record(site, x, out, batch_dim=1)  # (T, B, E) layout

    def _project(self, recorder: Recorder, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As F._in_projection_packed / F._in_projection, each F.linear observed."""
        m = self.attention
        e = m.embed_dim
        b = m.in_proj_bias
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            if key is value and query is key:  # self-attention: one packed projection
                proj = self._linear(recorder, self.packed, query, w, b)
                proj = proj.view(*proj.shape[:-1], 3, e).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
                return proj[0], proj[1], proj[2]
            if key is value:  # encoder-decoder attention
                w_q, w_kv = w[:e], w[e:]
                b_q, b_kv = (None, None) if b is None else (b[:e], b[e:])
                q = self._linear(recorder, self.q, query, w_q, b_q)
                kv = self._linear(recorder, self.kv, key, w_kv, b_kv)
                kv = kv.view(*kv.shape[:-1], 2, e).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
                return q, kv[0], kv[1]
            w_q, w_k, w_v = w.chunk(3)
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return (
            self._linear(recorder, self.q, query, w_q, b_q),
            self._linear(recorder, self.k, key, w_k, b_k),
            self._linear(recorder, self.v, value, w_v, b_v),
        )

    def _forward(
        self,
        recorder: Recorder,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """nn.MultiheadAttention.forward's non-fast path down to the in-projection (then _attend)."""
        m = self.attention
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if m.batch_first:  # the same identity-preserving transposes as nn.MultiheadAttention
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        shape_check = F._mha_shape_check  # type: ignore[attr-defined]
        shape_check(query, key, value, key_padding_mask, attn_mask, m.num_heads)
        if query.shape[2] != m.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {query.shape[2]}")
        if m._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not m._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match {value.shape[:2]}")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA's own causal masking
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        q, k, v = self._project(recorder, query, key, value)
        out, weights = self._attend(
            recorder,
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=need_weights,
            is_causal=is_causal,
        )
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return (out.transpose(1, 0) if m.batch_first else out), weights

    def _attend(  # noqa: C901, PLR0912 - one branch per attention variant (mask, causal, dropout, GQA) of one fused kernel
        self,
        recorder: Recorder,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        need_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """F.multi_head_attention_forward after the in-projection (no bias_k/v, no zero attention)."""
        m = self.attention
        tgt_len, bsz, e = q.shape
        heads, head_dim = m.num_heads, e // m.num_heads
        src_len = k.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    expected: tuple[int, ...] = (tgt_len, src_len)
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {expected}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * heads, tgt_len, src_len):
                    expected = (bsz * heads, tgt_len, src_len)
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {expected}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.view(src_len, bsz * heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, src_len, bsz)  # type: ignore[attr-defined]
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = m.dropout if m.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            scores = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                scores = F.dropout(scores, p=dropout_p)
            attended = torch.bmm(scores, v).transpose(0, 1).reshape(tgt_len, bsz, e)
            weights = scores.view(bsz, heads, tgt_len, src_len)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            attended = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim),
                k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim),
                attn_mask,
                dropout_p,
                is_causal,
            )
            attended = attended.permute(2, 0, 1, 3).reshape(tgt_len, bsz, e)
        out = self._linear(recorder, self.out, attended, m.out_proj.weight, m.out_proj.bias)
        return out, weights
