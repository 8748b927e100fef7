"""swattn as a Hugging Face transformers attention implementation.

    import swattn.integrations.transformers as swattn_hf

    swattn_hf.register()  # "swattn"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="swattn")
    # or: model.set_attn_implementation("swattn")

``register()`` adds ``attention_forward`` to transformers' ``AttentionInterface`` and
``attention_mask`` to its ``AttentionMaskInterface``. The mask function is
flash_attention_2's: the model hands the attention function the 2-D padding mask
(batch, kv_len) of 0/1, or None when nothing is padded, never a 4-D mask; the
window, causality, softcap and sinks come from the layer instead.

Conventions (transformers -> swattn.flash_attn_func):
- q, k, v arrive as (batch, heads, seq, head_dim) and are viewed as (batch, seq,
  heads, head_dim); the output is (batch, seq, q_heads, head_dim), weights None.
- ``sliding_window=W`` (the kwarg, else ``module.sliding_window``) lets query q see
  keys q - W < j <= q: ``window_size=(W - 1, 0)`` with causal; a bidirectional
  layer (``is_causal`` False, e.g. Gemma 3 with ``use_bidirectional_attention``)
  sees |q - j| < W: ``(W - 1, W - 1)`` (flash_attention_2's mapping; ModernBERT passes
  W = its half-window + 1 for exactly this). No window: full (causal) attention.
- ``scaling`` is the softmax scale, ``softcap`` (Gemma 2's attn_logit_softcapping)
  caps the scaled scores, ``s_aux`` (gpt-oss; else ``module.sinks``) are the sinks.
- A KV cache makes q shorter than k: queries sit bottom-right, so query i is key
  position i + seq_k - seq_q, right for a full cache and for transformers' sliding
  caches (which return the last W - 1 cached keys plus the new ones).
- A padding mask goes through ``flash_attn_varlen_func``: unpad (queries are the
  last seq_q positions of each row, as flash_attention_2 assumes), attend, pad back
  with zeros at padded query rows. So do packed rows: ``cu_seq_lens_q/k`` with
  ``max_length_q/k`` kwargs, or ``position_ids`` that restart within a row (no mask,
  no cache).

Raises (ValueError / NotImplementedError / TypeError) instead of computing
something else: a 4-D or other non-2-D mask, mask overlays the model adds on top
of the causal/sliding pattern (chunked attention past one chunk, image-token
blocks, custom or/and mask functions), a padding mask with holes under a sliding
window, dropout > 0, float32 inputs on CUDA (the kernels take float16/bfloat16:
load the model in one, or run under ``torch.autocast``).
"""

from __future__ import annotations

import torch

from ..api import flash_attn_func, flash_attn_varlen_func

__all__ = ["NAME", "attention_forward", "attention_mask", "register"]

NAME = "swattn"

_UNSET = object()  # tells "the model passed sliding_window=None" from "it passed nothing"

# Mask pieces of transformers.masking_utils that the attention function applies itself
# (causal, window, padding, packing) versus ones it cannot express.
_INEXPRESSIBLE_OVERLAYS = ("chunked_overlay", "blockwise_overlay")


def register(name: str = NAME) -> str:
    """Register swattn with transformers under ``name`` (idempotent); returns ``name``.

    Afterwards ``attn_implementation=name`` works in ``from_pretrained`` /
    ``from_config`` and ``model.set_attn_implementation(name)``.
    """
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # transformers < 4.53 built masks by name, not through an interface
        raise ImportError("swattn's transformers integration needs transformers >= 4.56") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


# ---- the mask function: the 2-D padding mask or None, as flash_attention_2 gets ------


def _mask_pieces(fn, seen=None):
    """Qualified names of the functions a transformers mask function is built from
    (``and_masks`` / ``or_masks`` keep their parts in closure cells)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    names = [getattr(fn, "__qualname__", type(fn).__name__)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(inner):
            names += _mask_pieces(inner, seen)
        elif isinstance(inner, (tuple, list)):
            for item in inner:
                if callable(item):
                    names += _mask_pieces(item, seen)
    return names


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    config=None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask function for swattn: the boolean (batch, kv_length) padding
    mask, sliced to the keys this layer sees, or None when nothing is padded (as
    ``flash_attention_mask``). Raises on a mask pattern swattn cannot express."""
    pieces = _mask_pieces(mask_function) if mask_function is not None else []
    chunk = getattr(config, "attention_chunk_size", None)
    for piece in pieces:
        if piece.startswith("chunked_overlay") and chunk is not None and kv_length + kv_offset <= chunk:
            continue  # every key is in the first chunk: plain causal
        if piece.startswith(_INEXPRESSIBLE_OVERLAYS):
            raise NotImplementedError(
                f"swattn cannot express the mask piece {piece!r} (chunked attention past one chunk, or "
                "bidirectional blocks such as image tokens): use attn_implementation='sdpa' or 'eager'"
            )
    # Custom or/and mask functions from the model: only Gemma 3's bidirectional overlay is
    # known to match what the attention function does from module.is_causal.
    if use_vmap and not getattr(config, "use_bidirectional_attention", False):
        raise NotImplementedError(
            f"this model adds a custom mask overlay ({', '.join(pieces) or 'unknown'}) that swattn cannot "
            "express: use attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"swattn takes a 2-D (batch, seq) padding mask, got shape {tuple(attention_mask.shape)}")
    # Slice from the right for sliding / cached layers (a no-op for full attention).
    attention_mask = attention_mask[:, -kv_length:]
    # A full mask of the keys' length is no mask; a shorter one (a StaticCache's unused
    # tail) still tells the attention function how many keys are real.
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# ---- the attention function ----------------------------------------------------------


def _window(sliding_window, causal: bool) -> tuple[int, int]:
    """transformers' ``sliding_window=W`` (keys q - W < j <= q; |q - j| < W without
    causality) as FlashAttention's (left, right)."""
    if sliding_window is None or isinstance(sliding_window, bool):
        return (-1, -1)
    w = int(sliding_window)
    if w <= 0:
        return (-1, -1)
    return (w - 1, 0) if causal else (w - 1, w - 1)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, **flash):
    cu_q, cu_k = (x.to(device=q.device, dtype=torch.int32) for x in (cu_q, cu_k))
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **flash)


def _lengths(mask: torch.Tensor):
    """(flat indices of the kept rows, int32 cu_seqlens, max length) of a (batch, seq) mask."""
    lens = mask.sum(-1, dtype=torch.int32)
    idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
    return idx, cu, int(lens.max()) if lens.numel() else 0


def _padded(q, k, v, mask: torch.Tensor, windowed: bool, **flash):
    """Attention of a padded batch: unpad q, k, v by the 2-D mask, attend, pad back."""
    b, sq, hq, d = q.shape
    mask = mask.to(device=q.device, dtype=torch.bool)
    if mask.shape[1] > k.shape[1]:
        mask = mask[:, -k.shape[1] :]
    elif mask.shape[1] < k.shape[1]:  # a static cache: keys past the mask were never written
        k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
    if sq > mask.shape[1]:
        raise ValueError(f"the padding mask covers {mask.shape[1]} keys, fewer than the {sq} queries")
    if windowed:
        # Unpadding closes holes, which would pull keys into a window: only one block per row.
        starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
        if bool((starts.sum(-1) > 1).any()):
            raise ValueError(
                "swattn takes padding only at the ends of a row under a sliding window (unpadding a hole "
                "would move keys into the window): this padding mask has holes"
            )
    idx_k, cu_k, max_k = _lengths(mask)
    idx_q, cu_q, max_q = _lengths(mask[:, -sq:])  # queries are each row's last sq positions
    qu = q.reshape(b * sq, hq, d).index_select(0, idx_q)
    ku, vu = (x.reshape(-1, *x.shape[2:]).index_select(0, idx_k) for x in (k, v))
    out = flash_attn_varlen_func(qu, ku, vu, cu_q, cu_k, max_q, max_k, **flash)
    return out.new_zeros(b * sq, hq, out.shape[-1]).index_copy(0, idx_q, out).view(b, sq, hq, -1)


def _packed_starts(position_ids, b: int, s: int):
    """Where each packed sequence starts in the flattened (b * s) rows, or None when
    every row holds one: a sequence starts at a row's first token and wherever the
    position does not go up by one (transformers' ``find_packed_sequence_indices``)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != s or s < 2:
        return None
    if position_ids.shape[0] not in (1, b):
        return None
    pos = position_ids.expand(b, s)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(starts[:, 1:].any()):
        return None
    return torch.nonzero(starts.flatten(), as_tuple=False).flatten()


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window=_UNSET,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature on swattn's kernels.

    Args:
        module: the attention layer (``is_causal``, ``sliding_window``, ``sinks`` read
            from it when the call does not pass them).
        query: (batch, q_heads, seq_q, head_dim); key, value: (batch, kv_heads, seq_k,
            head_dim), q_heads a multiple of kv_heads; seq_q <= seq_k (bottom-right).
        attention_mask: None, or the (batch, L) 0/1 padding mask from ``attention_mask``.
        dropout: must be 0 (swattn has no attention dropout).
        scaling: softmax scale (default 1 / sqrt(head_dim)); softcap: None/0 or c > 0.
        sliding_window: W, keys q - W < j <= q; None: no window.
        s_aux: (q_heads,) sink logits.
        kwargs: ``position_ids`` (packing), ``cu_seq_lens_q/k`` + ``max_length_q/k``
            (packed rows), anything else is ignored.
    Returns:
        (out (batch, seq_q, q_heads, head_dim) in the input dtype, None).
    """
    if dropout:
        raise NotImplementedError(
            f"swattn has no attention dropout (got p={dropout}): set the config's attention_dropout to 0 to train"
        )
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(
            f"swattn takes only a 2-D (batch, seq) 0/1 padding mask, got {shape}: an arbitrary (e.g. 4-D) mask "
            "cannot be expressed as a window; build the model with attn_implementation='swattn' after "
            "swattn.integrations.transformers.register() so transformers passes the padding mask, or use 'sdpa'"
        )
    if any(n == 0 for n in query.shape):
        raise ValueError(f"swattn got an empty query of shape {tuple(query.shape)}")
    if sliding_window is _UNSET:
        sliding_window = getattr(module, "sliding_window", None)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if s_aux is None:
        s_aux = getattr(module, "sinks", None)
        s_aux = s_aux if isinstance(s_aux, torch.Tensor) and s_aux.shape == (query.shape[1],) else None

    # (batch, heads, seq, dim) -> (batch, seq, heads, dim), FlashAttention's layout.
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if q.is_cuda and q.dtype == torch.float32:
        if torch.is_autocast_enabled("cuda"):
            q, k, v = (x.to(torch.get_autocast_dtype("cuda")) for x in (q, k, v))
        else:
            raise TypeError(
                "swattn's CUDA kernels take float16/bfloat16, got float32 q/k/v: load the model with "
                "dtype=torch.bfloat16 (or float16), or run it under torch.autocast('cuda', dtype=torch.bfloat16)"
            )
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:  # a smaller value head (MLA-style): pad it and crop the output, as flash_attention_2 does
        v = torch.nn.functional.pad(v, (0, d - dv))
    elif dv > d:
        raise ValueError(f"swattn needs value head_dim <= query head_dim, got {dv} > {d}")
    if s_aux is not None and s_aux.dtype not in (torch.float32, q.dtype):
        s_aux = s_aux.float()
    window = _window(sliding_window, causal)
    flash = dict(
        softmax_scale=None if scaling is None else float(scaling),
        causal=causal,
        window_size=window,
        softcap=float(softcap) if softcap else 0.0,
        sinks=s_aux,
    )

    b, sq, hq, _ = q.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask, window != (-1, -1), **flash)
    elif all(x is not None for x in (cu_q, cu_k, max_q, max_k)):  # packed rows, the offsets given
        q2, k2, v2 = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
        out = _varlen(q2, k2, v2, cu_q, cu_k, max_q, max_k, **flash).view(b, sq, hq, -1)
    elif sq == k.shape[1] and (starts := _packed_starts(kwargs.get("position_ids"), b, sq)) is not None:
        cu = torch.cat([starts, starts.new_tensor([b * sq])]).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        q2, k2, v2 = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
        out = flash_attn_varlen_func(q2, k2, v2, cu, cu, longest, longest, **flash).view(b, sq, hq, -1)
    else:
        out = flash_attn_func(q, k, v, **flash)
    if dv < d:
        out = out[..., :dv]
    return out, None
