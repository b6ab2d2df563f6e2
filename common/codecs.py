"""Block-scaled 8-bit codecs: a flat float32 tensor as one byte an element and one scale a block.

The elements are cut into blocks of :data:`BLOCK`; each block ``b`` gets the scale
``s_b = max_j |x_j| / L`` and each element the byte ``q_j = Q(x_j / s_b)``, decoded as ``q_j·s_b``.
Two codecs (docs/ALGORITHMS.md#compressed-pushes-and-delta-pulls):

* ``int8``: ``L = 127``, ``Q`` rounds to the nearest integer (ties to even): an absolute error of
  at most ``s_b / 2`` per element;
* ``float8``: ``L = 448``, ``Q`` rounds to ``torch.float8_e4m3fn`` (3 mantissa bits): a relative
  error of at most 2⁻⁴, small elements kept better than by ``int8``, large ones worse.

Both lose what rounding drops, so both are used with a correction that carries it to the next
transfer: :class:`ErrorFeedback` for pushes (the worker adds what its last gradient lost to the
next), :func:`quantize_delta_` for pulls (the server sends the difference to the copy it keeps of
what the worker rebuilt, so nothing a pull lost is lost for good). The receiver's side of a delta,
:func:`add_dequantized_`, is the one function both ends add with: the server's copy and the
worker's parameters stay equal bit for bit.

These are pure functions on flat CPU tensors, free of the wire: the transport
(:mod:`gapaware.common.transport`) frames their output, the simulator calls them directly. They
walk the tensor in cache-sized slices, as the policies do (``server/policies/base.py``,
``CPU_CHUNK``): nothing model-sized is allocated but the bytes themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 1024
"""Elements per block, each block with a float32 scale: 0.4% more bytes than one an element."""

SLICE_BLOCKS = 256
"""Blocks per slice when a codec walks a tensor: 1 MiB of float32, in cache."""


@dataclass(frozen=True)
class Codec:
    """One way to turn a float32 block into bytes: ``largest`` is the magnitude a block's largest
    element is scaled to, ``values`` the dtype of the bytes, ``rounds`` whether they are integers."""

    name: str
    values: torch.dtype
    largest: float
    rounds: bool

    def blocks(self, numel: int) -> int:
        return -(-numel // BLOCK)

    def nbytes(self, numel: int) -> int:
        """Bytes on the wire for ``numel`` elements: one each, and 4 for each block's scale."""
        return numel * self.values.itemsize + 4 * self.blocks(numel)

    def to_float(self, values: Tensor, out: Tensor) -> Tensor:
        """``out = values`` as float32. float8 goes through a table of its 256 values (what torch's
        conversion gives), a lookup in place of torch's slower element-wise conversion on the CPU."""
        if self.values != torch.float8_e4m3fn:
            return out.copy_(values)
        index = torch.empty(values.numel(), dtype=torch.int32).copy_(values.view(torch.uint8))
        return torch.index_select(_FLOAT8_VALUES, 0, index, out=out)


_FLOAT8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()

INT8 = Codec("int8", torch.int8, 127.0, rounds=True)
FLOAT8 = Codec("float8", torch.float8_e4m3fn, 448.0, rounds=False)
CODECS = {codec.name: codec for codec in (INT8, FLOAT8)}


@dataclass(frozen=True)
class Quantized:
    """A flat tensor in a codec: ``values`` (one per element) and ``scales`` (float32, one per block)."""

    codec: Codec
    values: Tensor
    scales: Tensor

    @classmethod
    def empty(cls, codec: Codec, numel: int) -> Quantized:
        return cls(codec, torch.empty(numel, dtype=codec.values), torch.empty(codec.blocks(numel)))

    @property
    def numel(self) -> int:
        return self.values.numel()

    def slices(self, blocks: tuple[int, int] | None = None):
        """``(elements, blocks)`` slices of at most :data:`SLICE_BLOCKS` blocks covering the blocks
        ``blocks`` (first, end), every block by default."""
        first, end = blocks or (0, self.scales.numel())
        for start in range(first, end, SLICE_BLOCKS):
            stop = min(start + SLICE_BLOCKS, end)
            yield slice(start * BLOCK, min(stop * BLOCK, self.numel)), slice(start, stop)


def _rows(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """The whole blocks of a flat slice as rows, and the shorter block after them (maybe empty)."""
    whole = tensor.numel() // BLOCK * BLOCK
    return tensor[:whole].view(-1, BLOCK), tensor[whole:]


def encode_slice(codec: Codec, x: Tensor, values: Tensor, scales: Tensor, scratch: Tensor) -> None:
    """Quantizes ``x`` (float32, whole blocks but for a shorter last one) into ``values`` and ``scales``;
    ``scratch`` is a float32 tensor of ``x``'s length that the function overwrites.

    A block holding NaN or ±Inf gets a non-finite scale, so it decodes to NaN: what was not finite
    stays not finite, and a receiver that checks for NaN and Inf still finds it.
    """
    rows, tail = _rows(x)
    whole = rows.shape[0]
    if whole:
        torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_(), out=scales[:whole])
    if tail.numel():
        scales[whole] = tail.abs().max()
    scales.div_(codec.largest)
    divisor = torch.where(scales > 0, scales, 1.0)
    work_rows, work_tail = _rows(scratch)
    if whole:
        torch.div(rows, divisor[:whole, None], out=work_rows)
    if tail.numel():
        torch.div(tail, divisor[whole], out=work_tail)
    if codec.rounds:
        scratch.round_()
    scratch.clamp_(-codec.largest, codec.largest)
    if not bool(torch.isfinite(scales).all()):
        scratch.nan_to_num_(nan=0.0)  # the scale carries the NaN; the byte of a NaN is then defined
    values.copy_(scratch)


def decode_slice(codec: Codec, values: Tensor, scales: Tensor, out: Tensor) -> Tensor:
    """``out = values · scale of their block`` (float32): whole blocks but for a shorter last one."""
    codec.to_float(values, out)
    rows, tail = _rows(out)
    whole = rows.shape[0]
    if whole:
        rows.mul_(scales[:whole, None])
    if tail.numel():
        tail.mul_(scales[whole])
    return out


def add_dequantized_(codec: Codec, out: Tensor, values: Tensor, scales: Tensor, scratch: Tensor) -> None:
    """``out += values · scales``, the receiver's side of a delta: decoded into ``scratch`` (float32,
    ``out``'s length) and added, two correctly rounded float32 operations, so any two callers that
    add the same bytes to the same ``out`` get the same bits, however they cut it into slices."""
    out.add_(decode_slice(codec, values, scales, scratch))


def _scratch(numel: int) -> tuple[Tensor, Tensor]:
    size = min(numel, SLICE_BLOCKS * BLOCK)
    return torch.empty(size), torch.empty(size)


def quantize(x: Tensor, codec: Codec, out: Quantized | None = None) -> Quantized:
    """``x`` (flat float32) in ``codec``: into ``out`` when given (the same codec and size), else new."""
    out = out or Quantized.empty(codec, x.numel())
    first, _ = _scratch(x.numel())
    for elements, blocks in out.slices():
        length = elements.stop - elements.start
        encode_slice(codec, x[elements], out.values[elements], out.scales[blocks], first[:length])
    return out


def dequantize(quantized: Quantized, out: Tensor | None = None) -> Tensor:
    """The float32 tensor ``quantized`` stands for, written into ``out`` when given."""
    out = torch.empty(quantized.numel) if out is None else out
    for elements, blocks in quantized.slices():
        decode_slice(quantized.codec, quantized.values[elements], quantized.scales[blocks], out[elements])
    return out


def add_quantized_(out: Tensor, quantized: Quantized) -> Tensor:
    """``out += decode(quantized)``: a receiver adding a whole delta at once (the transport adds it chunk by
    chunk, with the same :func:`add_dequantized_`)."""
    first, _ = _scratch(quantized.numel)
    for elements, blocks in quantized.slices():
        add_dequantized_(quantized.codec, out[elements], quantized.values[elements], quantized.scales[blocks],
                         first[:elements.stop - elements.start])
    return out


def quantize_delta_(target: Tensor, copy: Tensor, codec: Codec) -> Quantized:
    """The delta pull's arithmetic: ``Q(target − copy)``, and ``copy`` moved to what the receiver rebuilds
    from it (``copy += decode(Q(target − copy))``, with :func:`add_dequantized_`, as the receiver adds).

    What rounding drops stays in ``target − copy`` and is sent with the next delta: the copy follows
    ``target`` within one rounding of the last difference, and never drifts.
    """
    out = Quantized.empty(codec, target.numel())
    first, second = _scratch(target.numel())
    for elements, blocks in out.slices():
        length = elements.stop - elements.start
        difference = torch.sub(target[elements], copy[elements], out=first[:length])
        values, scales = out.values[elements], out.scales[blocks]
        encode_slice(codec, difference, values, scales, second[:length])
        add_dequantized_(codec, copy[elements], values, scales, first[:length])
    return out


class ErrorFeedback:
    """A worker's compressed pushes with error feedback: what rounding drops from one gradient is added
    to the next (Seide et al., Interspeech 2014; Karimireddy et al., ICML 2019, Algorithm 2, EF-SGD)::

        p = g + e        the gradient, corrected by what the previous pushes lost
        send Q(p)
        e ← p − decode(Q(p))

    ``e`` starts at zero and is zeroed by :meth:`reset` (a worker that joins again starts afresh) and
    when ``p`` is not finite (a NaN gradient must not poison every later push). Not thread-safe.
    """

    def __init__(self, codec: Codec, numel: int) -> None:
        self.codec = codec
        self.residual = torch.zeros(numel)
        self._out = Quantized.empty(codec, numel)

    def reset(self) -> None:
        self.residual.zero_()

    @property
    def out(self) -> Quantized:
        """Where :meth:`quantize` writes: the same tensors every push."""
        return self._out

    def quantize(self, grad: Tensor, blocks: tuple[int, int] | None = None) -> Quantized:
        """``Q(grad + e)`` into :attr:`out`, updating ``e``; only the blocks ``blocks`` (first, end) when given
        (a sender that quantizes each chunk as it sends it)."""
        if grad.shape != self.residual.shape:
            raise ValueError(f"gradient has shape {tuple(grad.shape)}, expected {tuple(self.residual.shape)}")
        out = self._out
        first, second = _scratch(grad.numel())
        for elements, part in out.slices(blocks):
            length = elements.stop - elements.start
            residual = self.residual[elements]
            corrected = torch.add(grad[elements], residual, out=first[:length])
            values, scales = out.values[elements], out.scales[part]
            encode_slice(self.codec, corrected, values, scales, second[:length])
            torch.sub(corrected, decode_slice(self.codec, values, scales, second[:length]), out=residual)
            if not bool(torch.isfinite(scales).all()):
                self.reset()
        return out
