"""Sites: one parametrised map inside a covered layer, and its book-keeping maths.

A site holds the map's input activations and output gradients of ONE forward/backward pass (the
gradients are those of the mean or summed batch loss; the clipper rescales). From them it computes

* each example's squared gradient norm over the site's trainable parameters, either with the ghost
  identity ``||Σ_t g_t a_tᵀ||² = Σ_{t,s} (a_t·a_s)(g_t·g_s)`` or by instantiating the per-example
  gradients, whichever costs less (Bu et al.'s mixed ghost clipping), and
* the clipped sum ``Σ_i w_i ∇_i`` (``w_i`` = clip factor × loss scale) as weighted matrix products
  written straight into views of the optimizer's flat buffer (book-keeping: no second backward).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import Tensor, nn
from torch.nn.grad import conv1d_weight, conv2d_weight

__all__ = [
    "CHUNK_BYTES",
    "ConvSite",
    "EmbeddingSite",
    "Grouping",
    "LinearSite",
    "NormKind",
    "NormSite",
    "NormStrategy",
    "Site",
]

NormStrategy = Literal["auto", "ghost", "instantiate"]
"""How sequence/convolution sites get per-example norms: by cost ("auto"), or forced (tests, benchmarks)."""

_TINY: Final = 64
"""A one-position Linear site with at most this many weights gets per-unit norms from per-record products summed
per unit (no padding); larger ones lay a unit's records out as one sequence (benchmarks/patients.py)."""

CHUNK_BYTES: Final = 4 * 2**20
"""Per-example temporaries (gradients, unfolded inputs, Gram matrices, scaled gradients) are built in
batch chunks of about this size: cache-sized, and never a fresh multi-MB allocation per step."""


def _instantiate(strategy: NormStrategy, *, steps: int, rows: int, cols: int) -> bool:
    """Per-example norms by instantiating the gradients (cost T·p·d) rather than the ghost identity (T²·(p+d))?"""
    if strategy != "auto":
        return strategy == "instantiate"
    return rows * cols < steps * (rows + cols)


def _chunks(batch: int, bytes_per_example: int) -> list[slice]:
    size = max(1, min(batch, CHUNK_BYTES // max(1, bytes_per_example)))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def _squared_row_norms(t: Tensor) -> Tensor:
    """Σ_j t[i, j...]² per row i, without materialising t² (one fused reduction)."""
    norms: Tensor = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)
    return norms.square_()


def _sequence_norms(a: Tensor, g: Tensor, *, instantiate: bool) -> Tensor:
    """||Σ_t g_t a_tᵀ||² per example for a (B, T, d), g (B, T, p), in cache-sized batch chunks."""
    batch, steps, cols = a.shape
    rows = g.shape[2]
    per_example = rows * cols if instantiate else 2 * steps * steps
    parts = []
    for chunk in _chunks(batch, per_example * a.element_size()):
        ac, gc = a[chunk], g[chunk]
        if instantiate:
            parts.append(_squared_row_norms(torch.bmm(gc.transpose(1, 2), ac)))
        else:  # Σ_{t,s} (a_t·a_s)(g_t·g_s)
            gram = torch.bmm(ac, ac.transpose(1, 2))
            gram.mul_(torch.bmm(gc, gc.transpose(1, 2)))
            parts.append(gram.sum(dim=(1, 2)))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass
class Grouping:
    """Which privacy unit each record of a micro-batch belongs to: ``groups`` (B,) in [0, ``units``), and the most
    records one unit has there."""

    groups: Tensor
    units: int
    most: int

    @classmethod
    def of(cls, groups: Tensor) -> Grouping:
        counts = torch.bincount(groups)
        return cls(groups, int(counts.shape[0]), int(counts.max()) if len(groups) else 0)

    @functools.cached_property
    def slots(self) -> Tensor:
        """Each record's place among its unit's records (0, 1, ... in batch order): computed once, for every site."""
        groups = self.groups
        counts = torch.bincount(groups, minlength=self.units)
        order = torch.argsort(groups, stable=True)
        slots = torch.empty_like(groups)
        slots[order] = (
            torch.arange(len(groups), device=groups.device) - (torch.cumsum(counts, 0) - counts)[groups[order]]
        )
        return slots


def _by_unit(t: Tensor, grouping: Grouping) -> Tensor:
    """Per-record rows (B, T, ...) → per-unit rows (U, k·T, ...), zero-padded: a unit's records one after another,
    as if they were one example's positions. Per-unit gradients are then sums over positions, which every kernel's
    maths already handles (the ghost identity and the instantiated products alike)."""
    out = t.new_zeros((grouping.units, grouping.most, *t.shape[1:]))
    out[grouping.groups, grouping.slots] = t
    return out.reshape(grouping.units, grouping.most * t.shape[1], *t.shape[2:])


def _unit_sums(t: Tensor, grouping: Grouping) -> Tensor:
    """Per-record rows (B, ...) summed per unit: (U, ...)."""
    return t.new_zeros((grouping.units, *t.shape[1:])).index_add_(0, grouping.groups, t)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _along(weights: Tensor, batch_dim: int, ndim: int) -> Tensor:
    """weights (B,) shaped to broadcast along ``batch_dim`` of an ndim-dimensional tensor."""
    shape = [1] * ndim
    shape[batch_dim] = -1
    return weights.view(shape)


def _zero_rows(t: Tensor | None, bad: Tensor, batch_dim: int = 0) -> Tensor | None:
    """``t`` with the rows of the examples in ``bad`` set to exactly 0 (a new tensor: captured ones stay intact).

    ``torch.where``, not a product: 0·NaN and 0·inf are NaN, and these rows are the non-finite ones."""
    if t is None or not t.is_floating_point():
        return t
    return torch.where(_along(bad, batch_dim, t.dim()), t.new_zeros(()), t)


class Site:
    """Captured input and output gradient of one map for one pass; subclasses implement the maths."""

    def __init__(self, label: str, *, weight: nn.Parameter | None, bias: nn.Parameter | None) -> None:
        self.label = label
        self.weight_param = weight
        self.bias_param = bias
        self.activation: Tensor | None = None
        self.grad: Tensor | None = None
        self.batch_dim = 0
        self._w: Tensor | None = None  # view of the flat clipped-sum buffer for the weight (or its rows)
        self._b: Tensor | None = None

    def bind(self, views: Mapping[int, Tensor], *, weight_rows: slice | None = None) -> None:
        """Point the site at the buffer views of its trainable parameters (keyed by id(parameter))."""
        if self.weight_param is not None:
            view = views[id(self.weight_param)]
            self._w = view[weight_rows] if weight_rows is not None else view
        if self.bias_param is not None:
            self._b = views[id(self.bias_param)]

    @property
    def dtype(self) -> torch.dtype:
        view = self._w if self._w is not None else self._b
        assert view is not None, "site bound to no parameter"
        return view.dtype

    def reset(self) -> None:
        self.activation = None
        self.grad = None

    def squared_norms(self, batch: int, grouping: Grouping | None = None) -> Tensor:
        """Per-example squared gradient norms (B,) of the raw captured gradients (no loss scaling); with a
        ``grouping`` (each record's privacy unit), the squared norms of each unit's SUMMED gradient (U,)."""
        raise NotImplementedError

    def add_clipped(self, weights: Tensor) -> None:
        """Add Σ_i weights_i ∇_i (raw captured gradients) into the bound buffer views."""
        raise NotImplementedError

    def drop(self, bad: Tensor) -> None:
        """Zero every captured and cached row of the examples in ``bad`` (B,) (after :meth:`squared_norms`), so that
        their weight-zero terms add exactly 0 in :meth:`add_clipped`."""
        self.activation = _zero_rows(self.activation, bad, self.batch_dim)
        self.grad = _zero_rows(self.grad, bad, self.batch_dim)


class LinearSite(Site):
    """y = x Wᵀ + b on inputs (B, ..., d); with ``batch_dim=1`` on (T, B, d) (attention's internal layout)."""

    def __init__(
        self,
        label: str,
        *,
        weight: nn.Parameter | None,
        bias: nn.Parameter | None,
        strategy: NormStrategy = "auto",
        weight_rows: slice | None = None,
        bias_slice: slice | None = None,
    ) -> None:
        super().__init__(label, weight=weight, bias=bias)
        self._strategy = strategy
        self._weight_rows = weight_rows
        self._bias_slice = bias_slice
        self._a: Tensor | None = None  # batch-major (B, T, d) and (B, T, p)
        self._g: Tensor | None = None
        self._bias_per_example: Tensor | None = None

    def bind(self, views: Mapping[int, Tensor], *, weight_rows: slice | None = None) -> None:
        super().bind(views, weight_rows=self._weight_rows)
        if self._b is not None and self._bias_slice is not None:
            self._b = self._b[self._bias_slice]

    def reset(self) -> None:
        super().reset()
        self._a = self._g = self._bias_per_example = None

    def drop(self, bad: Tensor) -> None:
        super().drop(bad)
        self._a, self._g = _zero_rows(self._a, bad), _zero_rows(self._g, bad)
        self._bias_per_example = _zero_rows(self._bias_per_example, bad)

    def squared_norms(self, batch: int, grouping: Grouping | None = None) -> Tensor:
        assert self.activation is not None
        assert self.grad is not None
        a, g = _cast(self.activation, self.dtype), _cast(self.grad, self.dtype)
        if self.batch_dim:
            a, g = a.movedim(self.batch_dim, 0), g.movedim(self.batch_dim, 0)
        a = self._a = a.reshape(batch, -1, a.shape[-1])
        g = self._g = g.reshape(batch, -1, g.shape[-1])
        if grouping is not None:
            if self._b is not None and a.shape[1] > 1:
                self._bias_per_example = g.sum(dim=1)  # add_clipped weights the records
            return self._unit_norms(a, g, grouping)
        return self._norms(a, g, batch)

    def _norms(self, a: Tensor, g: Tensor, batch: int) -> Tensor:
        """||Σ_t g_t a_tᵀ||² (+ ||Σ_t g_t||² for the bias) per row of (batch, T, d) and (batch, T, p)."""
        steps, cols, rows = a.shape[1], a.shape[2], g.shape[2]
        if steps == 1:  # one position per example: ||g aᵀ||² = ||a||²·||g||²
            g_squared = _squared_row_norms(g)
            if self._w is None:
                return g_squared
            norms = _squared_row_norms(a).mul_(g_squared)
            return norms.add_(g_squared) if self._b is not None else norms
        norms = torch.zeros(batch, dtype=a.dtype, device=a.device)
        if self._w is not None:
            instantiate = _instantiate(self._strategy, steps=steps, rows=rows, cols=cols)
            norms.add_(_sequence_norms(a, g, instantiate=instantiate))
        if self._b is not None:
            self._bias_per_example = g.sum(dim=1)
            norms.add_(_squared_row_norms(self._bias_per_example))
        return norms

    def _unit_norms(self, a: Tensor, g: Tensor, grouping: Grouping) -> Tensor:
        """||Σ_{i∈u} Σ_t g_it a_itᵀ||² (+ the bias's) per unit: a unit's records laid out as one example's positions
        (zero-padded), then the sequence maths (instantiated or ghost, by cost)."""
        if a.shape[1] == 1 and g.shape[2] * (a.shape[2] + 1) <= _TINY:  # e.g. a logistic head: per record is cheaper
            if self._b is not None:  # the bias as a weight column on a constant 1: one product, one sum
                a = torch.cat([a, a.new_ones((*a.shape[:2], 1))], dim=2)
            return _squared_row_norms(_unit_sums(g[:, 0, :, None] * a[:, 0, None, :], grouping))
        a, g = _by_unit(a, grouping), _by_unit(g, grouping)
        steps, cols, rows = a.shape[1], a.shape[2], g.shape[2]
        norms = torch.zeros(grouping.units, dtype=a.dtype, device=a.device)
        if self._w is not None:
            instantiate = _instantiate(self._strategy, steps=steps, rows=rows, cols=cols)
            norms.add_(_sequence_norms(a, g, instantiate=instantiate))
        if self._b is not None:
            norms.add_(_squared_row_norms(g.sum(dim=1)))
        return norms

    def add_clipped(self, weights: Tensor) -> None:
        assert self._a is not None
        assert self._g is not None
        if self.batch_dim:  # rows in the captured layout: no batch-major copy of a strided tensor
            assert self.activation is not None
            assert self.grad is not None
            a, g = _cast(self.activation, self.dtype), _cast(self.grad, self.dtype)
            along = _along(weights, self.batch_dim, a.dim())
        else:
            a, g, along = self._a, self._g, weights.view(-1, 1, 1)
        if self._w is not None:  # Σ_{i,t} w_i g_it a_itᵀ: one weight-gradient matmul
            rows, cols = g.shape[-1], a.shape[-1]
            if rows <= cols:  # scale the narrower factor (the product is also the one copy a strided grad needs)
                self._w.addmm_((g * along).reshape(-1, rows).t(), a.reshape(-1, cols))
            else:
                self._w.addmm_(g.reshape(-1, rows).t(), (a * along).reshape(-1, cols))
        if self._b is not None:
            bias_grads = self._bias_per_example if self._bias_per_example is not None else self._g[:, 0]
            self._b.addmv_(bias_grads.t(), weights)


class ConvSite(Site):
    """nn.Conv1d / nn.Conv2d, any stride, padding (numeric, "same", "valid"), dilation, groups and padding mode."""

    def __init__(
        self,
        label: str,
        module: nn.Conv1d | nn.Conv2d,
        *,
        weight: nn.Parameter | None,
        bias: nn.Parameter | None,
        strategy: NormStrategy = "auto",
    ) -> None:
        super().__init__(label, weight=weight, bias=bias)
        self._module = module
        self._strategy = strategy
        self._bias_per_example: Tensor | None = None
        self._padded: tuple[Tensor, tuple[int, ...]] | None = None

    def reset(self) -> None:
        super().reset()
        self._bias_per_example = self._padded = None

    def drop(self, bad: Tensor) -> None:
        super().drop(bad)
        self._padded = None  # rebuilt from the zeroed input
        self._bias_per_example = _zero_rows(self._bias_per_example, bad)

    def _padded_input(self) -> tuple[Tensor, tuple[int, ...]]:
        """The input with any padding the unfold/weight-gradient ops cannot express applied, and the rest."""
        if self._padded is not None:
            return self._padded
        assert self.activation is not None
        m = self._module
        x = self.activation.to(self.dtype)
        spatial = len(m.kernel_size)
        reversed_pads = [int(p) for p in m._reversed_padding_repeated_twice]
        if m.padding_mode != "zeros":
            x = F.pad(x, reversed_pads, mode=m.padding_mode)
            padding: tuple[int, ...] = (0,) * spatial
        elif isinstance(m.padding, str):  # "same"/"valid": the module's own per-side amounts
            lefts, rights = reversed_pads[0::2], reversed_pads[1::2]
            if lefts == rights:
                padding = tuple(reversed(lefts))
            else:
                x = F.pad(x, reversed_pads)
                padding = (0,) * spatial
        else:
            padding = tuple(int(p) for p in m.padding)
        self._padded = (x, padding)
        return self._padded

    def _unfold(self, x: Tensor, padding: tuple[int, ...]) -> Tensor:
        """F.unfold's (B, C·K, L) patches, by a strided view and one copy (several times faster than im2col)."""
        m = self._module
        if any(padding):
            x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
        spatial = len(m.kernel_size)
        out = [
            (size - dilation * (kernel - 1) - 1) // stride + 1
            for size, kernel, stride, dilation in zip(x.shape[2:], m.kernel_size, m.stride, m.dilation, strict=True)
        ]
        strides = x.stride()
        view = x.as_strided(
            (*x.shape[:2], *m.kernel_size, *out),
            (
                *strides[:2],
                *(st * d for st, d in zip(strides[2:], m.dilation, strict=True)),
                *(st * s for st, s in zip(strides[2:], m.stride, strict=True)),
            ),
            x.storage_offset(),
        )
        return view.reshape(x.shape[0], x.shape[1] * math.prod(m.kernel_size), math.prod(out[:spatial]))

    def squared_norms(self, batch: int, grouping: Grouping | None = None) -> Tensor:
        assert self.grad is not None
        m = self._module
        g = self.grad.to(self.dtype).reshape(batch, m.out_channels, -1)
        norms = torch.zeros(batch if grouping is None else grouping.units, dtype=g.dtype, device=g.device)
        if self._w is not None:
            norms.add_(self._weight_norms(g) if grouping is None else self._unit_weight_norms(g, grouping))
        if self._b is not None:
            self._bias_per_example = g.sum(dim=2)
            bias = self._bias_per_example if grouping is None else _unit_sums(self._bias_per_example, grouping)
            norms.add_(_squared_row_norms(bias))
        return norms

    def _shape(self, positions: int) -> tuple[int, int, int, bool]:
        """(groups, rows, cols) of the per-group weight gradient, and whether to instantiate it (by cost)."""
        m = self._module
        rows = m.out_channels // m.groups
        cols = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        return m.groups, rows, cols, _instantiate(self._strategy, steps=positions, rows=rows, cols=cols)

    @staticmethod
    def _norms_of(g4: Tensor, a4: Tensor, *, instantiate: bool) -> Tensor:
        """||Σ_l g_l a_lᵀ||² per row of g4 (B, G, rows, L) and a4 (B, G, cols, L), summed over the groups."""
        if instantiate:
            return _squared_row_norms(torch.matmul(g4, a4.transpose(2, 3)))
        gram = torch.matmul(a4.transpose(2, 3), a4)
        gram.mul_(torch.matmul(g4.transpose(2, 3), g4))
        return gram.sum(dim=(1, 2, 3))

    def _weight_norms(self, g: Tensor) -> Tensor:
        """Per-example ||∇W||² from the unfolded input, per group, in cache-sized batch chunks."""
        x, padding = self._padded_input()
        batch, positions = g.shape[0], g.shape[2]
        groups, rows, cols, instantiate = self._shape(positions)
        temporary = groups * (rows * cols if instantiate else 2 * positions * positions) + groups * cols * positions
        g4 = g.view(batch, groups, rows, positions)
        parts = [
            self._norms_of(
                g4[chunk], self._unfold(x[chunk], padding).view(-1, groups, cols, positions), instantiate=instantiate
            )
            for chunk in _chunks(batch, temporary * g.element_size())
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _unit_weight_norms(self, g: Tensor, grouping: Grouping) -> Tensor:
        """Per-unit ||Σ_{records} ∇W||²: a unit's records' positions one after another, as one example's."""
        x, padding = self._padded_input()
        batch, positions = g.shape[0], g.shape[2]
        kernel_groups, rows, cols, _ = self._shape(positions)
        a4 = self._unfold(x, padding).view(batch, kernel_groups, cols, positions)
        g4 = g.view(batch, kernel_groups, rows, positions)
        by_unit = [_by_unit(t.permute(0, 3, 1, 2), grouping).permute(0, 2, 3, 1) for t in (g4, a4)]
        _, _, _, instantiate = self._shape(by_unit[0].shape[3])
        return self._norms_of(by_unit[0], by_unit[1], instantiate=instantiate)

    def add_clipped(self, weights: Tensor) -> None:
        if self._w is not None:  # the native weight gradient of the weighted output gradients
            assert self.grad is not None
            m = self._module
            x, padding = self._padded_input()
            g = self.grad.to(self.dtype)
            weight_grad = conv1d_weight if len(m.kernel_size) == 1 else conv2d_weight
            for chunk in _chunks(g.shape[0], g[0].numel() * g.element_size()):
                gc = g[chunk] * _along(weights[chunk], 0, g.dim())
                self._w.add_(weight_grad(x[chunk], m.weight.shape, gc, m.stride, padding, m.dilation, m.groups))  # type: ignore[no-untyped-call]
        if self._b is not None:
            assert self._bias_per_example is not None
            self._b.addmv_(self._bias_per_example.t(), weights)


class EmbeddingSite(Site):
    """nn.Embedding on ids (B, ...): per-example gradients are sparse row sums, so norms cost O(tokens·d)."""

    def __init__(self, label: str, module: nn.Embedding, *, weight: nn.Parameter | None) -> None:
        super().__init__(label, weight=weight, bias=None)
        self._module = module
        self._rows: Tensor | None = None  # per (example, id) summed output gradients
        self._ids: Tensor | None = None
        self._owner: Tensor | None = None  # example index of each row

    def reset(self) -> None:
        super().reset()
        self._rows = self._ids = self._owner = None

    def drop(self, bad: Tensor) -> None:
        super().drop(bad)
        if self._rows is not None and self._owner is not None:
            self._rows = _zero_rows(self._rows, bad[self._owner])

    def squared_norms(self, batch: int, grouping: Grouping | None = None) -> Tensor:
        assert self.activation is not None
        assert self.grad is not None
        m = self._module
        ids = self.activation.reshape(batch, -1)
        g = self.grad.to(self.dtype).reshape(-1, m.embedding_dim)
        owner = torch.arange(batch, device=ids.device).repeat_interleave(ids.shape[1])
        flat_ids = ids.reshape(-1)
        if m.padding_idx is not None:  # the padding row gets no gradient
            keep = flat_ids != m.padding_idx
            flat_ids, owner, g = flat_ids[keep], owner[keep], g[keep]
        if ids.shape[1] == 1:
            self._rows, self._ids, self._owner = g, flat_ids, owner
        else:  # sum the gradients of repeated ids within an example
            keys, inverse = torch.unique(owner * m.num_embeddings + flat_ids, return_inverse=True)
            self._rows = torch.zeros(keys.shape[0], m.embedding_dim, dtype=g.dtype, device=g.device)
            self._rows.index_add_(0, inverse, g)
            self._ids, self._owner = keys % m.num_embeddings, keys // m.num_embeddings
        if grouping is None:
            norms = torch.zeros(batch, dtype=g.dtype, device=g.device)
            return norms.index_add_(0, self._owner, _squared_row_norms(self._rows))
        # per unit: the rows of one id summed over the unit's records (add_clipped keeps the per-record rows)
        unit_ids = grouping.groups[self._owner] * m.num_embeddings + self._ids
        keys, inverse = torch.unique(unit_ids, return_inverse=True)
        rows = self._rows.new_zeros((keys.shape[0], m.embedding_dim)).index_add_(0, inverse, self._rows)
        norms = torch.zeros(grouping.units, dtype=g.dtype, device=g.device)
        return norms.index_add_(0, keys // m.num_embeddings, _squared_row_norms(rows))

    def add_clipped(self, weights: Tensor) -> None:
        assert self._w is not None
        assert self._rows is not None
        assert self._ids is not None
        assert self._owner is not None
        self._w.index_add_(0, self._ids, self._rows * weights[self._owner, None])


NormKind = Literal["layer", "group", "rms"]


class NormSite(Site):
    """nn.LayerNorm / nn.GroupNorm / nn.RMSNorm affine parameters: ∇γ_i = Σ g ⊙ x̂, ∇β_i = Σ g (instantiated)."""

    def __init__(
        self,
        label: str,
        module: nn.LayerNorm | nn.GroupNorm | nn.RMSNorm,
        *,
        kind: NormKind,
        weight: nn.Parameter | None,
        bias: nn.Parameter | None,
    ) -> None:
        super().__init__(label, weight=weight, bias=bias)
        self._module = module
        self._kind = kind
        self._weight_per_example: Tensor | None = None
        self._bias_per_example: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._weight_per_example = self._bias_per_example = None

    def drop(self, bad: Tensor) -> None:
        super().drop(bad)
        self._weight_per_example = _zero_rows(self._weight_per_example, bad)
        self._bias_per_example = _zero_rows(self._bias_per_example, bad)

    def _normalised(self, x: Tensor) -> Tensor:
        m = self._module
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return F.rms_norm(x, m.normalized_shape, None, m.eps)

    def _per_example_sums(self, t: Tensor, batch: int) -> Tensor:
        if self._kind == "group":  # (B, C, *) → per channel
            return t.reshape(batch, t.shape[1], -1).sum(dim=2)
        features = self._w.numel() if self._w is not None else self._b.numel() if self._b is not None else 0
        return t.reshape(batch, -1, features).sum(dim=1)

    def squared_norms(self, batch: int, grouping: Grouping | None = None) -> Tensor:
        assert self.activation is not None
        assert self.grad is not None
        g = self.grad.to(self.dtype)
        norms = torch.zeros(batch if grouping is None else grouping.units, dtype=g.dtype, device=g.device)

        def per_norm(per_example: Tensor) -> Tensor:
            return _squared_row_norms(per_example if grouping is None else _unit_sums(per_example, grouping))

        if self._w is not None:
            x_hat = self._normalised(self.activation.to(self.dtype))
            self._weight_per_example = self._per_example_sums(x_hat.mul_(g), batch)
            norms.add_(per_norm(self._weight_per_example))
        if self._b is not None:
            self._bias_per_example = self._per_example_sums(g, batch)
            norms.add_(per_norm(self._bias_per_example))
        return norms

    def add_clipped(self, weights: Tensor) -> None:
        if self._w is not None:
            assert self._weight_per_example is not None
            self._w.view(-1).addmv_(self._weight_per_example.t(), weights)
        if self._b is not None:
            assert self._bias_per_example is not None
            self._b.view(-1).addmv_(self._bias_per_example.t(), weights)
