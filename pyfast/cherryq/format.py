"""CherryQ storage format: the packed codes, their bit layout and the container.

A CherryQ weight W [N, K] (N output rows, K input columns) is stored as

    qweight     int32   [N, K // 32 * bits]   packed b-bit codes, 32 codes per `bits` words
    scales      float16 [N, K // group_size]  grid step of each group
    zeros       float16 [N, K // group_size]  grid origin (value of code 0) of each group
    cherry_idx  int32   [N, C]                columns of the C cherries of each row, ascending
    cherry_val  float16 [N, C]                the cherry weights themselves

and dequantizes as

    W[n, k] = zeros[n, g] + code[n, k] * scales[n, g]        g = k // group_size
    W[n, cherry_idx[n, c]] = cherry_val[n, c]                (the packed code there is 0)

Because the code under a cherry is 0, a kernel adds a cherry as a rank-1 fix-up of
`x[col] * (cherry_val - zeros[n, col // group_size])` on top of the dense dequantized
product, in the same pass (no second pass over the output).

Bit layout. K is split into "packs" of 32 consecutive columns; pack p of row n
occupies words qweight[n, p*bits : (p+1)*bits]. Code i (0..31) of a pack sits at:

    bits = 4   word j = i // 8, bits [4*(i%8), 4*(i%8)+4)
        word0: | c7 | c6 | c5 | c4 | c3 | c2 | c1 | c0 |   (c0 in the lowest nibble)
        word1: | c15| ...                      ... | c8 |
        word2, word3: c16..c23, c24..c31

    bits = 2   word j = i // 16, bits [2*(i%16), 2*(i%16)+2)
        word0: | c15| c14| ... | c1 | c0 |                 (16 x 2 bits)
        word1: | c31| c30| ... | c17| c16|

    bits = 3   split into a 2-bit plane and a 1-bit plane:
        word0: low 2 bits of c0..c15   (as bits = 2, word0)
        word1: low 2 bits of c16..c31  (as bits = 2, word1)
        word2: | h31| h30| ... | h1 | h0 |   h_i = bit 2 of c_i, at bit i

So every code is recovered with shifts and masks only (no code straddles a word):
    4-bit: (w[i>>3] >> 4*(i&7)) & 15
    2-bit: (w[i>>4] >> 2*(i&15)) & 3
    3-bit: ((w[i>>4] >> 2*(i&15)) & 3) | (((w[2] >> i) & 1) << 2)
Words are stored as int32 (two's complement of the uint32 bit pattern).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

PACK = 32  # codes per pack: every supported bit width packs 32 codes into `bits` int32 words
SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


@dataclasses.dataclass
class CherryQWeight:
    """A quantized weight: packed codes + per-group grid + per-row fp16 cherries.

    Shapes (N out_features, K in_features, C cherries per row):
    qweight int32 [N, K//32*bits], scales/zeros float16 [N, K//group_size],
    cherry_idx int32 [N, C] (ascending), cherry_val float16 [N, C].
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    cherry_idx: torch.Tensor
    cherry_val: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.scales.shape[1] * self.group_size)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The five tensors in the order the `torch.ops.pyfast.cherryq_*` ops take them."""
        return (self.qweight, self.scales, self.zeros, self.cherry_idx, self.cherry_val)

    def to(self, device) -> "CherryQWeight":
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in TENSOR_FIELDS})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bits_per_weight(self) -> float:
        n, k = self.shape
        return 8.0 * self.nbytes() / (n * k)


TENSOR_FIELDS = ("qweight", "scales", "zeros", "cherry_idx", "cherry_val")


def packed_layout(n: int, k: int, cherries: int, bits: int, group_size: int) -> dict[str, tuple[torch.dtype, tuple]]:
    """{field: (dtype, shape)} of the five tensors of an [n, k] weight with `cherries` per row, in
    TENSOR_FIELDS order: the table above as data (the op's rules, the module's buffers and the
    file loader all read it from here)."""
    g = k // group_size
    return {"qweight": (torch.int32, (n, k // PACK * bits)), "scales": (torch.float16, (n, g)),
            "zeros": (torch.float16, (n, g)), "cherry_idx": (torch.int32, (n, cherries)),
            "cherry_val": (torch.float16, (n, cherries))}


# The op's rules read the layout on every call: remembered per size (plain ints only; torch.compile
# traces with symbolic sizes, which are not hashable). Shared: never mutate what it returns.
packed_layout_cached = functools.lru_cache(maxsize=1024)(packed_layout)


def _plane_shifts(width: int, device) -> torch.Tensor:
    per_word = 32 // width
    return torch.arange(per_word, device=device, dtype=torch.int64) * width


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """codes int64 [..., 32] with values < 2**width -> int64 words [..., width] (uint32 patterns)."""
    per_word = 32 // width
    c = codes.reshape(*codes.shape[:-1], width, per_word)
    return (c << _plane_shifts(width, codes.device)).sum(-1)


def _unpack_plane(words: torch.Tensor, width: int) -> torch.Tensor:
    """int64 words [..., width] (uint32 patterns) -> codes int64 [..., 32]."""
    mask = (1 << width) - 1
    c = (words.unsqueeze(-1) >> _plane_shifts(width, words.device)) & mask
    return c.reshape(*words.shape[:-1], PACK)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [N, K] (0 <= code < 2**bits, K % 32 == 0) into int32 [N, K//32*bits]."""
    n, k = codes.shape
    c = codes.to(torch.int64).reshape(n, k // PACK, PACK)
    if bits == 3:
        words = torch.cat([_pack_plane(c & 3, 2), _pack_plane(c >> 2, 1)], dim=-1)
    else:
        words = _pack_plane(c, bits)
    words = torch.where(words >= 2**31, words - 2**32, words)  # uint32 pattern -> int32
    return words.to(torch.int32).reshape(n, k // PACK * bits)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: int32 [N, K//32*bits] -> int64 codes [N, K]."""
    n = qweight.shape[0]
    w = qweight.to(torch.int64).reshape(n, -1, bits) & 0xFFFFFFFF
    if bits == 3:
        codes = _unpack_plane(w[..., :2], 2) | (_unpack_plane(w[..., 2:], 1) << 2)
    else:
        codes = _unpack_plane(w, bits)
    return codes.reshape(n, -1)


def codes_at(qweight: torch.Tensor, bits: int, cols: torch.Tensor) -> torch.Tensor:
    """The codes of row n at columns cols[n, :] (int64 [N, C]), read straight from the bit layout
    above without unpacking the whole row."""
    cols = cols.to(torch.int64)
    pack, i = cols // PACK, cols % PACK
    per_word = 32 // (2 if bits == 3 else bits)  # codes per word of the low plane
    width = 2 if bits == 3 else bits

    def word(j: torch.Tensor) -> torch.Tensor:
        return torch.gather(qweight, 1, j).to(torch.int64) & 0xFFFFFFFF

    code = (word(pack * bits + i // per_word) >> (width * (i % per_word))) & ((1 << width) - 1)
    if bits == 3:
        code |= ((word(pack * bits + 2) >> i) & 1) << 2
    return code
