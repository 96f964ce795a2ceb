"""The vector dot products of the CPU kernels (compute/quant_kernels.py), written in LLVM IR
through Numba intrinsics: raw addresses, fp16 bits, a prefetch hint, 64-weight dots and the
whole-row dots the kernels call for the default group of 64.

Numba's scalar loops over codes read through raw pointers vectorize poorly (4-7 GB/s of weights,
1.6 for int8 times floats, against ~13-17 GB/s of memory read on the development machine).
Written as vector loads, widens, multiply-adds and reductions, LLVM emits AVX-512 (or whatever the
host has) for them. Every intrinsic takes addresses: the caller owns the memory and keeps it alive
for the call; nothing here allocates or checks bounds."""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# ---- raw addresses and fp16 bits in Numba ---------------------------------------------------


def _pointer_intrinsic(element):
    @intrinsic
    def to_pointer(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None
        sig = types.CPointer(element)(addr)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(element)))
        return sig, codegen
    return to_pointer


_i8_ptr = _pointer_intrinsic(types.int8)
_u8_ptr = _pointer_intrinsic(types.uint8)
_u16_ptr = _pointer_intrinsic(types.uint16)
_f32_ptr = _pointer_intrinsic(types.float32)


@intrinsic
def _bits_to_f32(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32
                               else builder.zext(args[0], ir.IntType(32)) if bits.bitwidth < 32 else args[0],
                               ir.FloatType())
    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    if not isinstance(value, types.Float) or value.bitwidth != 32:
        return None
    sig = types.uint32(value)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return sig, codegen


@njit(inline="always")
def _bf16_rne(f):
    """float32 -> bf16 bits, rounded to nearest even as torch rounds, branch-free (so loops of it
    vectorize); a NaN's payload may round into infinity: callers that can meet NaN check first."""
    b = _f32_to_bits(f)
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(inline="always")
def _fp8_f32(b, kind):
    """One float8 byte (kind 3: E4M3FN, 4: E5M2) -> float32, branch-free but for the sign: the 7
    bits below the sign land in float32's exponent and mantissa (shifted 20 places for E4M3, 21 for
    E5M2), and one multiply moves the exponent bias (7 -> 127: 2**120; 15 -> 127: 2**112);
    subnormal codes come out right the same way. NaN codes are refused when a checkpoint is converted."""
    if kind == 3:
        mag = _bits_to_f32((np.uint32(b) & np.uint32(0x7F)) << np.uint32(20)) * np.float32(2.0 ** 120)
    else:
        mag = _bits_to_f32((np.uint32(b) & np.uint32(0x7F)) << np.uint32(21)) * np.float32(2.0 ** 112)
    return -mag if np.uint32(b) & np.uint32(0x80) else mag


@njit(inline="always")
def _f16(h):
    """fp16 bit pattern -> float32, branch-free for finite values (subnormals included): the
    exponent and mantissa shifted into float32's place and rebiased by a multiply by 2**112."""
    mag = _bits_to_f32((np.uint32(h) & np.uint32(0x7FFF)) << np.uint32(13)) * np.float32(5.192296858534828e33)
    return -mag if np.uint32(h) & np.uint32(0x8000) else mag


# ---- 64-element dot products in LLVM vector IR ---------------------------------------------------
# Numba's scalar loops over codes read through raw pointers vectorize poorly (4-7 GB/s of weights,
# 1.6 for int8 times floats, against ~13-17 GB/s of memory read on the development machine).
# Written as one vector load, widen, multiply and horizontal add, LLVM vectorizes them anywhere;
# for int4 on a CPU with AVX512-VNNI (or AVX512BW) the nibbles and the int8 activations go to
# vpdpbusd (vpmaddubsw), unsigned codes times signed activations, 64 at a time
# (bench/quant_kernels.py).
DOT_CHUNK = 64


def _declare(builder, name: str, ret, params):
    mod = builder.module
    fn = mod.globals.get(name)
    return fn if fn is not None else ir.Function(mod, ir.FunctionType(ret, params), name)


def _load(builder, addr, n: int):
    return _at(builder, addr, ir.VectorType(ir.IntType(8), n), 1)


def _reduce_add(builder, v, n: int):
    return builder.call(_declare(builder, f"llvm.vector.reduce.add.v{n}i32", ir.IntType(32),
                                 [ir.VectorType(ir.IntType(32), n)]), [v])


def _float_dot_intrinsic(widen):
    """An intrinsic (w_addr, x_addr) -> Σ w[j]·x[j] over 64 weights and 64 float32 activations at
    two addresses (float32; the sum in any order), the weights loaded and widened to float32 by
    widen(builder, w_addr, <64 x float>)."""
    @intrinsic
    def dot(typingctx, w_addr, x_addr):
        sig = types.float32(types.intp, types.intp)

        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            vf = ir.VectorType(f32, DOT_CHUNK)
            x = builder.load(builder.inttoptr(args[1], vf.as_pointer()), align=4)
            p = builder.fmul(widen(builder, args[0], vf), x, flags=("fast",))
            red = _declare(builder, f"llvm.vector.reduce.fadd.v{DOT_CHUNK}f32", f32, [f32, vf])
            return builder.call(red, [ir.Constant(f32, 0.0), p], fastmath=("reassoc",))
        return sig, codegen
    return dot


def _widen_s8(builder, addr, vf):
    return builder.sitofp(_load(builder, addr, DOT_CHUNK), vf)


def _widen_bf16(builder, addr, vf):
    # a bf16 is the top half of a float32: widening is a shift
    v16, v32 = ir.VectorType(ir.IntType(16), DOT_CHUNK), ir.VectorType(ir.IntType(32), DOT_CHUNK)
    bits = builder.load(builder.inttoptr(addr, v16.as_pointer()), align=2)
    return builder.bitcast(builder.shl(builder.zext(bits, v32), ir.Constant(v32, [16] * DOT_CHUNK)), vf)


#: int8 weights times float32 activations: 64 at a time
_dot_s8_f32 = _float_dot_intrinsic(_widen_s8)


def _widen_float8(builder, kind: int, addr):
    """64 float8 bytes of `kind` (3: E4M3FN, 4: E5M2) at addr -> <64 x float>, E4M3 at 2^-8 of its
    value. The codes become fp16 bit patterns in 16-bit lanes, widened by the fp16 conversion
    (vcvtph2ps): an E5M2 byte is the top half of its fp16; an E4M3 one's 7 bits below the sign are
    an fp16 exponent and mantissa at 2^-8 of its value (subnormals too), so callers scale the sum
    by 2^8 once, not each weight."""
    vh = ir.VectorType(_I16, DOT_CHUNK)
    b = builder.zext(_load(builder, addr, DOT_CHUNK), vh)
    if kind == 4:
        h = builder.shl(b, ir.Constant(vh, [8] * DOT_CHUNK))
    else:
        mag = builder.shl(builder.and_(b, ir.Constant(vh, [0x7F] * DOT_CHUNK)), ir.Constant(vh, [7] * DOT_CHUNK))
        sign = builder.shl(builder.and_(b, ir.Constant(vh, [0x80] * DOT_CHUNK)), ir.Constant(vh, [8] * DOT_CHUNK))
        h = builder.or_(mag, sign)
    return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), DOT_CHUNK)), _V64F)


def _row_float8_intrinsic(kind: int):
    @intrinsic
    def row_dot_float8(typingctx, w_addr, scales_addr, x_addr, ng, chunks, pf):
        """Σ_g scale[g] · Σ_{j in g} w[j]·x[j] over one row of ng groups of `chunks` 64-weight
        chunks: float8 codes at w_addr, float32 scales at scales_addr, float32 activations at
        x_addr; the weights `pf` bytes ahead prefetched. Each group's products stay in a 64-lane
        vector times its scale: one horizontal sum a row (a sum per chunk cost as much as the
        chunk's weights). float32."""
        sig = types.float32(*([types.intp] * 6))

        def codegen(context, builder, signature, args):
            w, sc, x, ng, chunks, pf = args
            loop, c, acc = _loop_head(builder, "chunk", _V64F)
            off = builder.mul(c, _const(DOT_CHUNK))
            wa = builder.add(w, off)
            _prefetch_ir(builder, builder.add(wa, pf))
            s = _at(builder, builder.add(sc, builder.mul(builder.sdiv(c, chunks), _const(4))), _F32, 4)
            p = builder.fmul(_widen_float8(builder, kind, wa), _at(builder, builder.add(x, builder.mul(off, _const(4))),
                                                                   _V64F, 4), flags=_FAST)
            acc1 = builder.fadd(acc, builder.fmul(p, _splat(builder, s, DOT_CHUNK), flags=_FAST), flags=_FAST)
            _loop_tail(builder, loop, c, acc, acc1, builder.mul(ng, chunks), "chunks_end")
            total = _sum_lanes(builder, acc1, DOT_CHUNK)
            return total if kind == 4 else builder.fmul(total, ir.Constant(_F32, 256.0), flags=_FAST)
        return sig, codegen
    return row_dot_float8


#: the whole-row float8 dots (groups a multiple of 64): E4M3FN, E5M2
ROW_FLOAT8 = {3: _row_float8_intrinsic(3), 4: _row_float8_intrinsic(4)}


def _u4_intrinsic(isa: str):
    """Σ lo(c[j])·e[j] + hi(c[j])·o[j] over 32 bytes of int4 codes c (element 2j in the low nibble)
    and the 32 even (e) and odd (o) int8 activations: 64 weights, int32 (the whole-row dots'
    _u4_unit on the 32 bytes and 32 zeros)."""
    @intrinsic
    def dot(typingctx, c_addr, e_addr, o_addr):
        sig = types.int32(types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            half = DOT_CHUNK // 2
            zeros = ir.Constant(ir.VectorType(ir.IntType(8), half), None)
            widen = ir.Constant(ir.VectorType(ir.IntType(32), DOT_CHUNK), list(range(DOT_CHUNK)))
            c, e, o = (builder.shuffle_vector(_load(builder, a, half), zeros, widen) for a in args)
            return _reduce_add(builder, _u4_unit(builder, isa, c, e, o), 16)
        return sig, codegen
    return dot


@intrinsic
def _prefetch(typingctx, addr):
    """A read prefetch of the cache line at `addr` into all cache levels (llvm.prefetch)."""
    sig = types.void(types.intp)

    def codegen(context, builder, signature, args):
        _prefetch_ir(builder, args[0])
        return context.get_dummy_value()
    return sig, codegen


#: the instruction sets the int4 dots are written for, best first ("generic": plain LLVM vector IR)
U4_ISAS = ("avx512vnni", "avx512bw", "avx2", "generic")
#: the int4 dot of each instruction set; U4_ISA is the one this process's kernels use: the host's
#: best, "generic" where Numba compiles for a named CPU (NUMBA_CPU_NAME, e.g. a portable cache)
U4_DOTS = {isa: _u4_intrinsic(isa) for isa in U4_ISAS}


def _host_u4_isa() -> str:
    import numba
    from llvmlite import binding
    if numba.config.CPU_NAME:
        return "generic"
    try:
        features = binding.get_host_cpu_features()
    except RuntimeError:
        return "generic"
    for isa in ("avx512vnni", "avx512bw"):
        if features.get(isa) and features.get("avx512f"):
            return isa
    return "avx2" if features.get("avx2") else "generic"


U4_ISA = _host_u4_isa()
_dot_u4 = U4_DOTS[U4_ISA]


# ---- whole-row dots for groups of 32 and 64 -----------------------------------------------------
# A row's dot product group by group, as the 64-weight dots above do it, spends more on each group's
# ending than on its weights: a horizontal reduction of the partial sums to one number, then the
# group's fp16 scale (and int4's minimum) converted and applied in scalar code, ~25 instructions
# against the 8-12 that multiply the 64 weights. These dots keep each group's partial sums in a
# run of lanes of a 16-lane vector, reduce 16 groups' vectors at once into one vector whose lane g
# holds group g's sum (a tree of shuffle-and-add pairs), and apply 16 groups' scales with vector
# loads and multiplies. They read the codes 64 bytes at a time (a "unit": 1 or 2 groups of int8,
# 2 or 4 of int4), so groups of 32 (GGUF's Q8_0 and Q4_0 blocks) cost no more loads than groups
# of 64. A row whose last unit or block is partial reads it with masked loads: nothing past the
# row's end is read. The two-thread layer kernels read 1.7-2x faster this way on the development
# machine than with the 64-weight dots (bench/quant_kernels.py).

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16F, _V16I = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)
_V64F, _V64B = ir.VectorType(_F32, DOT_CHUNK), ir.VectorType(_I8, DOT_CHUNK)
_FAST = ("fast",)
#: the groups one block reduces into a vector (its lanes)
BLOCK_GROUPS = 16
#: the group sizes the whole-row dots take (others: quant_kernels' 64-weight dots or scalar loop)
ROW_DOT_GROUPS = (32, 64)


def _at(builder, addr, ty, align):
    return builder.load(builder.inttoptr(addr, ty.as_pointer()), align=align)


def _const(n: int):
    return ir.Constant(_I64, n)


def _splat(builder, s, n: int):
    vt = ir.VectorType(s.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _prefetch_ir(builder, addr):
    i8p = _I8.as_pointer()
    f = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), [i8p, _I32, _I32, _I32])
    builder.call(f, [builder.inttoptr(addr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _masked_load(builder, addr, vt, align: int, mask):
    """vt at addr, the lanes off in mask read as 0 and not touched."""
    tag = f"v{vt.count}" + ("f32" if isinstance(vt.element, ir.FloatType) else f"i{vt.element.width}")
    f = _declare(builder, f"llvm.masked.load.{tag}.p0{tag}", vt, [vt.as_pointer(), _I32, mask.type, vt])
    return builder.call(f, [builder.inttoptr(addr, vt.as_pointer()), ir.Constant(_I32, align), mask,
                            ir.Constant(vt, None)])


def _first(builder, n, count: int):
    """The mask of the first n (runtime) of `count` lanes."""
    lanes = ir.Constant(ir.VectorType(_I64, count), list(range(count)))
    return builder.icmp_signed("<", lanes, _splat(builder, n, count))


def _load_first(builder, addr, vt, align: int, n=None):
    """vt at addr, or (n given) only its first n lanes."""
    return _at(builder, addr, vt, align) if n is None else _masked_load(builder, addr, vt, align,
                                                                         _first(builder, n, vt.count))


def _f16_lanes(builder, addr, mask):
    """16 fp16 bit patterns at addr -> <16 x float>, the same branch-free rebias as _f16 (no F16C
    needed: a portable build has none)."""
    v16i16 = ir.VectorType(_I16, 16)
    b = builder.zext(_masked_load(builder, addr, v16i16, 2, mask), _V16I)
    mag = builder.shl(builder.and_(b, ir.Constant(_V16I, [0x7FFF] * 16)), ir.Constant(_V16I, [13] * 16))
    mag = builder.fmul(builder.bitcast(mag, _V16F), ir.Constant(_V16F, [5.192296858534828e33] * 16))
    sign = builder.shl(builder.and_(b, ir.Constant(_V16I, [0x8000] * 16)), ir.Constant(_V16I, [16] * 16))
    return builder.bitcast(builder.or_(builder.bitcast(mag, _V16I), sign), _V16F)


def _f16_block(builder, isa: str, addr, left, mask):
    """The fp16 scales of a block's groups at addr -> <16 x float>: the first min(left, 16) of them
    (left: a runtime count >= 1, mask: its lanes), the rest 0 and not read. AVX2 has no masked
    load of 16-bit lanes: LLVM emitted a test, a branch and an insert for each of the 16, and with
    the integer rebias of _f16_lanes that was a third of an int4 row's time or more (a row of 2048
    weights from the L1 cache, its units' lanes merged: 100-159 ns, 68-91 this way;
    bench/row_dot_parts.py). There the scales are read as 32-bit pairs (vpmaskmovd), an odd last
    one on its own (it always exists), and widened by F16C's vcvtph2ps, which every AVX2 CPU has.
    Other instruction sets: _f16_lanes."""
    if isa != "avx2":
        return _f16_lanes(builder, addr, mask)
    v8i, v16s = ir.VectorType(_I32, 8), ir.VectorType(_I16, 16)
    n = builder.trunc(builder.select(builder.icmp_signed("<", left, _const(16)), left, _const(16)), _I32)
    half = builder.ashr(n, ir.Constant(_I32, 1))
    pairs = builder.icmp_signed("<", ir.Constant(v8i, list(range(8))), _splat(builder, half, 8))
    v = builder.bitcast(_masked_load(builder, addr, v8i, 2, pairs), v16s)
    last = builder.sub(n, ir.Constant(_I32, 1))
    one = _at(builder, builder.add(addr, builder.mul(builder.sext(last, _I64), _const(2))), _I16, 2)
    at_last = builder.icmp_signed("==", ir.Constant(v16s, list(range(16))),
                                  _splat(builder, builder.trunc(last, _I16), 16))
    v = builder.select(at_last, _splat(builder, one, 16), v)
    return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 16)), _V16F)


def _merge_runs(builder, vs, run: int, add):
    """Vectors of 16 lanes whose groups' partial sums lie in runs of `run` lanes -> one vector of
    runs of run / len(vs) lanes, the groups in order (len(vs) a power of two, at most run). Each
    level adds the first and second halves of every run of a pair (x, y), x's runs first: the order
    of the groups is kept, so no permutation at the end."""
    while len(vs) > 1:
        half = run // 2
        firsts = [r * run + j for r in range(16 // run) for j in range(half)]
        ma = ir.Constant(_V16I, firsts + [16 + m for m in firsts])
        mb = ir.Constant(_V16I, [m + half for m in firsts] + [16 + m + half for m in firsts])
        vs = [add(builder.shuffle_vector(x, y, ma), builder.shuffle_vector(x, y, mb)) for x, y in zip(vs[0::2], vs[1::2])]
        run = half
    return vs[0]


def _loop_head(builder, name: str, acc_type):
    """Open a counted loop at a new block `name`: (the block, its counter and its accumulator),
    both starting at 0; _loop_tail closes it."""
    entry = builder.block
    loop = builder.append_basic_block(name)
    builder.branch(loop)
    builder.position_at_end(loop)
    i, acc = builder.phi(_I64), builder.phi(acc_type)
    i.add_incoming(_const(0), entry)
    acc.add_incoming(ir.Constant(acc_type, None), entry)
    return loop, i, acc


def _loop_tail(builder, loop, i, acc, acc1, count, name: str) -> None:
    """Close _loop_head's loop: the accumulator's next value acc1, run while i + 1 < count; the
    builder continues in a new block `name` after it."""
    i1 = builder.add(i, _const(1))
    i.add_incoming(i1, builder.block)
    acc.add_incoming(acc1, builder.block)
    out = builder.append_basic_block(name)
    builder.cbranch(builder.icmp_signed("<", i1, count), loop, out)
    builder.position_at_end(out)


def _group_blocks(builder, ng, per: int, unit_vector, block_end, acc_type, add):
    """The loop over a row's blocks of up to 16 groups, `per` (1, 2 or 4) groups a unit:
    unit_vector(g, n) emits the 16-lane partial sums of groups g..g+per-1 in runs of 16/per lanes,
    n None when all exist, else the runtime count of those that do (nothing past them may be
    read); units past the row's end are 0. The units' vectors are merged (_merge_runs with `add`)
    as they come, pairs as soon as both exist: held to the end, 16 of them took 32 of AVX2's 16
    vector registers, and the spills were a third of an int8 row's instructions. block_end(base,
    mask, sums, acc) adds the block's group sums (lane g: group base+g; mask: the groups that
    exist) to the accumulator. Returns the final accumulator."""
    nblocks = builder.sdiv(builder.add(ng, _const(BLOCK_GROUPS - 1)), _const(BLOCK_GROUPS))
    loop, b, acc = _loop_head(builder, "block", acc_type)
    base = builder.mul(b, _const(BLOCK_GROUPS))
    left = builder.sub(ng, base)
    pending = []        # (vector, its run of lanes a group): a binary counter of merged units
    for i in range(0, BLOCK_GROUPS, per):
        have, join = builder.append_basic_block(f"unit{i}"), builder.append_basic_block(f"unit{i}_end")
        before = builder.block
        builder.cbranch(builder.icmp_signed("<", _const(i), left), have, join)
        builder.position_at_end(have)
        g = builder.add(base, _const(i))
        whole, part, merged = (builder.append_basic_block(f"unit{i}_{k}") for k in ("whole", "part", "merged"))
        builder.cbranch(builder.icmp_signed("<", _const(i + per - 1), left), whole, part)
        builder.position_at_end(whole)
        vw = unit_vector(g, None)
        from_whole = builder.block
        builder.branch(merged)
        builder.position_at_end(part)
        vp = unit_vector(g, builder.sub(left, _const(i)))
        from_part = builder.block
        builder.branch(merged)
        builder.position_at_end(merged)
        v = builder.phi(vw.type)
        v.add_incoming(vw, from_whole)
        v.add_incoming(vp, from_part)
        done = builder.block
        builder.branch(join)
        builder.position_at_end(join)
        p = builder.phi(v.type)
        p.add_incoming(v, done)
        p.add_incoming(ir.Constant(v.type, None), before)
        item = (p, 16 // per)
        while pending and pending[-1][1] == item[1]:
            # the same pairs, in the same order, as _merge_runs over all of them at the end
            first, run = pending.pop()
            item = (_merge_runs(builder, [first, item[0]], run, add), run // 2)
        pending.append(item)
    assert len(pending) == 1 and pending[0][1] == 1
    lanes = ir.Constant(ir.VectorType(_I64, BLOCK_GROUPS), list(range(BLOCK_GROUPS)))
    mask = builder.icmp_signed("<", lanes, _splat(builder, left, BLOCK_GROUPS))
    acc1 = block_end(base, mask, pending[0][0], acc)
    _loop_tail(builder, loop, b, acc, acc1, nblocks, "blocks_end")
    return acc1


def _scaled_blocks(builder, ng, per: int, unit_vector, block_scales):
    """A row's sum for AVX2 hosts, over blocks of up to 16 groups as _group_blocks but with no
    merges: block_scales(base, left, mask) gives the float factor of each of the 16 groups from
    base on (lane g: group base+g; left of them exist, mask their lanes; 0 past them) for their
    integer sums, and a float vector added as it is (int4's minimums' share; None for none); each
    unit's 16 lanes of integer sums (unit_vector as in _group_blocks, groups in runs of 16/per
    lanes) are converted, multiplied by their groups' factors and added to one float accumulator.
    Merging the units' lanes into one lane a group took shuffles that on AVX2 (a 16-lane vector is
    two registers) cost more than this convert and multiply-add: an int4 row from the L1 cache
    68-91 -> 57-71 ns (2048 weights), 31-45 -> 27-35 (768; bench/row_dot_parts.py). A row whose
    groups do not fill its last unit reads that unit after the loop, on its own: inside it, the
    masked loads' path cost the whole units half their speed. Returns the row's float32 sum."""
    run = BLOCK_GROUPS // per
    lanes = ir.Constant(ir.VectorType(_I64, BLOCK_GROUPS), list(range(BLOCK_GROUPS)))

    def scaled(v, factors, first: int, acc):
        f = builder.shuffle_vector(factors, factors, ir.Constant(_V16I, [first + lane // run for lane in range(16)]))
        return builder.fadd(acc, builder.fmul(builder.sitofp(v, _V16F), f, flags=_FAST), flags=_FAST)

    def where(cond, then, acc, name: str):
        # then() (the accumulator with a unit added) where cond holds, else acc unchanged
        have, join = builder.append_basic_block(name), builder.append_basic_block(f"{name}_end")
        before = builder.block
        builder.cbranch(cond, have, join)
        builder.position_at_end(have)
        added = then()
        done = builder.block
        builder.branch(join)
        builder.position_at_end(join)
        p = builder.phi(_V16F)
        p.add_incoming(added, done)
        p.add_incoming(acc, before)
        return p

    nblocks = builder.sdiv(builder.add(ng, _const(BLOCK_GROUPS - 1)), _const(BLOCK_GROUPS))
    entry = builder.block
    loop = builder.append_basic_block("block")
    builder.branch(loop)
    builder.position_at_end(loop)
    b, acc, extra = builder.phi(_I64), builder.phi(_V16F), builder.phi(_V16F)
    b.add_incoming(_const(0), entry)
    acc.add_incoming(ir.Constant(_V16F, None), entry)
    extra.add_incoming(ir.Constant(_V16F, None), entry)
    base = builder.mul(b, _const(BLOCK_GROUPS))
    left = builder.sub(ng, base)
    factors, added = block_scales(base, left, builder.icmp_signed("<", lanes, _splat(builder, left, BLOCK_GROUPS)))
    extra1 = extra if added is None else builder.fadd(extra, added, flags=_FAST)
    cur = acc
    for i in range(0, BLOCK_GROUPS, per):      # the whole units
        cur = where(builder.icmp_signed("<", _const(i + per - 1), left),
                    lambda: scaled(unit_vector(builder.add(base, _const(i)), None), factors, i, cur), cur, f"unit{i}")
    b1 = builder.add(b, _const(1))
    b.add_incoming(b1, builder.block)
    acc.add_incoming(cur, builder.block)
    extra.add_incoming(extra1, builder.block)
    after = builder.append_basic_block("blocks_end")
    builder.cbranch(builder.icmp_signed("<", b1, nblocks), loop, after)
    builder.position_at_end(after)
    total = builder.fadd(cur, extra1, flags=_FAST)
    if per == 1:
        return _sum_lanes(builder, total, 16)
    rem = builder.srem(ng, _const(per))        # groups of a last, partial unit

    def tail():
        g = builder.sub(ng, rem)
        # its groups' factors as a block of their own from g (its minimums' share is in `extra` already)
        factors_t, _ = block_scales(g, rem, builder.icmp_signed("<", lanes, _splat(builder, rem, BLOCK_GROUPS)))
        return scaled(unit_vector(g, rem), factors_t, 0, total)
    return _sum_lanes(builder, where(builder.icmp_signed(">", rem, _const(0)), tail, total, "tail"), 16)


def _sum_lanes(builder, v, n: int):
    red = _declare(builder, f"llvm.vector.reduce.fadd.v{n}f32", _F32, [_F32, ir.VectorType(_F32, n)])
    return builder.call(red, [ir.Constant(_F32, 0.0), v], fastmath=("reassoc",))


def _fadd(builder):
    return lambda a, b: builder.fadd(a, b, flags=_FAST)


def _parts(builder, v, k: int):
    """<64 x T> -> its k-th 16 lanes."""
    return builder.shuffle_vector(v, v, ir.Constant(_V16I, list(range(16 * k, 16 * k + 16))))


def _row_s8_intrinsic(group: int):
    per = DOT_CHUNK // group             # groups a 64-code unit holds

    @intrinsic
    def row_dot_s8(typingctx, w_addr, scales_addr, x_addr, ng, pf):
        """Σ_g scale[g] · Σ_{j in g} w[j]·x[j] over one row of ng groups: int8 codes at w_addr,
        fp16 scales at scales_addr, float32 activations at x_addr; the weights `pf` bytes ahead
        are prefetched. float32."""
        sig = types.float32(*([types.intp] * 5))

        def codegen(context, builder, signature, args):
            w, sc, x, ng, pf = args

            def unit_vector(g, n):
                off = builder.mul(g, _const(group))
                wa = builder.add(w, off)
                _prefetch_ir(builder, builder.add(wa, pf))
                count = None if n is None else builder.mul(n, _const(group))
                wv = builder.sitofp(_load_first(builder, wa, _V64B, 1, count), _V64F)
                xv = _load_first(builder, builder.add(x, builder.mul(off, _const(4))), _V64F, 4, count)
                p = builder.fmul(wv, xv, flags=_FAST)
                # 16 consecutive products belong to one group: sum each group's parts, then its runs
                q = [_parts(builder, p, k) for k in range(4)]
                sums = [functools.reduce(_fadd(builder), q[k:k + 4 // per]) for k in range(0, 4, 4 // per)]
                return _merge_runs(builder, sums, 16, _fadd(builder))

            def block_end(base, mask, sums, acc):
                s = _f16_lanes(builder, builder.add(sc, builder.mul(base, _const(2))), mask)
                return builder.fadd(acc, builder.fmul(sums, s, flags=_FAST), flags=_FAST)
            return _sum_lanes(builder, _group_blocks(builder, ng, per, unit_vector, block_end, _V16F, _fadd(builder)), 16)
        return sig, codegen
    return row_dot_s8


#: the whole-row int8 dot for each group size of ROW_DOT_GROUPS
ROW_S8_DOTS = {g: _row_s8_intrinsic(g) for g in ROW_DOT_GROUPS}


# ---- int8 weights times int16 activations ---------------------------------------------------------
# On an AVX2 host the dot above is compute-bound: 8 float lanes an FMA, and two more instructions
# (sign-extend, convert) for every 8 codes; an int8 MoE layer's dots read 13.4 GB/s of weights from
# the caches on a Zen 3 VM (2 threads), against 18.2 in this form (bench/int8_row_dots.py).
# Multiplying the codes by activations quantized to int16 (one scale a group, absmax/32767) takes
# one vpmaddwd for 16 of them: two products summed into each of 8 32-bit lanes, exact in integers.
# An int16 activation is 2^-15 of its group's largest, 128 times finer than the bf16 the activations
# were: the weights' own int8 rounding stays the only loss that counts (int8 activations,
# llama.cpp's Q8_0 way, raised the KL by a third: bench/mixed_precision.py).
# Sums: |code·activation| <= 128·32767 < 2^22, a group of 64 < 2^28: no overflow in 32 bits.

_V64S = ir.VectorType(_I16, DOT_CHUNK)
#: the instruction sets the int16-activation dot is written for (generic: plain LLVM IR)
S8_I16_ISAS = ("avx512bw", "avx2", "generic")


def _s8_i16_unit(builder, isa: str, w, x):
    """64 int8 codes w times 64 int16 activations x -> 16 lanes of 32-bit sums of four products
    each, lanes 0-7 from products 0-31 and lanes 8-15 from 32-63 (a group of 64 fills all 16
    lanes; groups of 32 run 8 lanes each, as _group_blocks wants them)."""
    w16 = builder.sext(w, _V64S)
    if isa == "generic":
        wide = ir.VectorType(_I32, DOT_CHUNK)
        p = builder.mul(builder.sext(w16, wide), builder.sext(x, wide))
        quarters = [builder.shuffle_vector(p, p, ir.Constant(_V16I, list(range(k, DOT_CHUNK, 4)))) for k in range(4)]
        return builder.add(builder.add(quarters[0], quarters[1]), builder.add(quarters[2], quarters[3]))
    n = 16 if isa == "avx2" else 32
    vs, vi = ir.VectorType(_I16, n), ir.VectorType(_I32, n // 2)
    name = "llvm.x86.avx2.pmadd.wd" if isa == "avx2" else "llvm.x86.avx512.pmaddw.d.512"
    madd = _declare(builder, name, vi, [vs, vs])

    def part(v, k):
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n * k, n * k + n))))
    q = [builder.call(madd, [part(w16, k), part(x, k)]) for k in range(DOT_CHUNK // n)]
    if isa == "avx2":     # q[k]: products 16k..16k+15 in pairs; lanes 0-7 of the result: products 0-31
        return builder.shuffle_vector(builder.add(q[0], q[1]), builder.add(q[2], q[3]),
                                      ir.Constant(_V16I, list(range(16))))
    # avx512bw: q[0] holds products 0-31 in pairs, q[1] 32-63; halve each into lanes 0-7, 8-15
    return _merge_runs(builder, q, 16, builder.add)


def _row_s8_i16_intrinsic(isa: str, group: int):
    per = DOT_CHUNK // group

    @intrinsic
    def row_dot_s8_i16(typingctx, w_addr, scales_addr, x_addr, xs_addr, ng, pf):
        """Σ_g scale[g] · xs[g] · Σ_{j in g} w[j]·x[j] over one row of ng groups: int8 codes at
        w_addr, fp16 scales at scales_addr, int16 activations at x_addr with their float32 scale
        per group at xs_addr (quant_kernels._quantize_rows16); the weights `pf` bytes ahead are
        prefetched. float32."""
        sig = types.float32(*([types.intp] * 6))

        def codegen(context, builder, signature, args):
            w, sc, x, xs, ng, pf = args

            def unit_vector(g, n):
                off = builder.mul(g, _const(group))
                wa = builder.add(w, off)
                _prefetch_ir(builder, builder.add(wa, pf))
                count = None if n is None else builder.mul(n, _const(group))
                wv = _load_first(builder, wa, _V64B, 1, count)
                xv = _load_first(builder, builder.add(x, builder.mul(off, _const(2))), _V64S, 2, count)
                return _s8_i16_unit(builder, isa, wv, xv)

            def factors(base, left, mask):
                s = _f16_block(builder, isa, builder.add(sc, builder.mul(base, _const(2))), left, mask)
                xsv = _masked_load(builder, builder.add(xs, builder.mul(base, _const(4))), _V16F, 4, mask)
                return builder.fmul(s, xsv, flags=_FAST)

            if isa == "avx2":
                return _scaled_blocks(builder, ng, per, unit_vector,
                                      lambda base, left, mask: (factors(base, left, mask), None))

            def block_end(base, mask, isums, acc):
                sums = builder.sitofp(isums, _V16F)
                return builder.fadd(acc, builder.fmul(sums, factors(base, builder.sub(ng, base), mask), flags=_FAST),
                                    flags=_FAST)
            return _sum_lanes(builder, _group_blocks(builder, ng, per, unit_vector, block_end, _V16F, builder.add), 16)
        return sig, codegen
    return row_dot_s8_i16


#: the whole-row int8 x int16 dot of each instruction set and group size
ROW_S8_I16_DOTS = {(isa, g): _row_s8_i16_intrinsic(isa, g) for isa in S8_I16_ISAS for g in ROW_DOT_GROUPS}

#: what int8 weights multiply in this process's kernels: "int16" activations where the best the host
#: has is AVX2 (there the float dot is compute-bound: see above, and docs/BENCHMARKS.md), the
#: float32 activations themselves elsewhere (AVX-512 hosts: the path measured there, at memory's
#: speed already; generic builds)
S8_ACTIVATIONS = "int16" if U4_ISA == "avx2" else "float32"
#: the int16-activation dot's instruction set on this host (an AVX2 intrinsic cannot be compiled
#: without AVX2), and its dots
S8_I16_ISA = "avx2" if U4_ISA == "avx2" else "avx512bw" if U4_ISA.startswith("avx512") else "generic"
ROW_S8_I16 = {g: ROW_S8_I16_DOTS[(S8_I16_ISA, g)] for g in ROW_DOT_GROUPS}


def _u4_unit(builder, isa: str, c, e, o):
    """64 bytes of int4 codes c (element 2j in byte j's low nibble) times their even (e) and odd
    (o) int8 activations (64 bytes each, the same order): lane l sums the 8 products of bytes
    4l..4l+3, so a group of 64 (32 bytes) fills 8 lanes and one of 32 fills 4. One load of codes,
    a mask and a shift feed two multiply-adds: no shuffles to pair nibbles with activations."""
    lo = builder.and_(c, ir.Constant(_V64B, [15] * DOT_CHUNK))
    hi = builder.lshr(c, ir.Constant(_V64B, [4] * DOT_CHUNK))
    if isa == "generic":
        wide = ir.VectorType(_I32, DOT_CHUNK)
        p = builder.add(builder.mul(builder.zext(lo, wide), builder.sext(e, wide)),
                        builder.mul(builder.zext(hi, wide), builder.sext(o, wide)))
        quarters = [builder.shuffle_vector(p, p, ir.Constant(_V16I, list(range(k, DOT_CHUNK, 4)))) for k in range(4)]
        return builder.add(builder.add(quarters[0], quarters[1]), builder.add(quarters[2], quarters[3]))
    if isa == "avx512vnni":
        f = _declare(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I, [_V16I] * 3)
        acc = builder.call(f, [ir.Constant(_V16I, None), builder.bitcast(lo, _V16I), builder.bitcast(e, _V16I)])
        return builder.call(f, [acc, builder.bitcast(hi, _V16I), builder.bitcast(o, _V16I)])
    if isa == "avx2":
        # the avx512bw path below on two 256-bit halves: without it LLVM widens the generic
        # path's products to 32 bits, 64 lanes of vpmulld a unit, and an int4 layer ran at
        # 3.5-4 GB/s of weights on an AVX2 host (Zen 3), half the speed of int8
        v32b, v16s, v8i = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
        madd = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", v16s, [v32b, v32b])
        pairs = _declare(builder, "llvm.x86.avx2.pmadd.wd", v8i, [v16s, v16s])
        ones = ir.Constant(v16s, [1] * 16)

        def half(v, k):
            return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 32), list(range(32 * k, 32 * k + 32))))
        quads = [builder.call(pairs, [builder.add(builder.call(madd, [half(lo, k), half(e, k)]),
                                                  builder.call(madd, [half(hi, k), half(o, k)])), ones])
                 for k in range(2)]
        return builder.shuffle_vector(quads[0], quads[1], ir.Constant(_V16I, list(range(16))))
    # avx512bw: u8·s8 pairs to int16 (two of 15·127·2 cannot saturate), then pairs to int32
    i16x32 = ir.VectorType(_I16, 32)
    madd = _declare(builder, "llvm.x86.avx512.pmaddubs.w.512", i16x32, [_V64B, _V64B])
    p16 = builder.add(builder.call(madd, [lo, e]), builder.call(madd, [hi, o]))
    return builder.call(_declare(builder, "llvm.x86.avx512.pmaddw.d.512", _V16I, [i16x32, i16x32]),
                        [p16, ir.Constant(i16x32, [1] * 32)])


def _u4_unit_vector(builder, isa: str, group: int, cw, e, o, pf):
    """The unit_vector (as _group_blocks takes it) of an int4 row: codes at cw, even and odd int8
    activations at e and o, the codes `pf` bytes ahead prefetched."""
    gbytes = group // 2                  # bytes of one group's codes (and of its even / odd activations)

    def unit_vector(g, n):
        off = builder.mul(g, _const(gbytes))
        ca = builder.add(cw, off)
        _prefetch_ir(builder, builder.add(ca, pf))
        count = None if n is None else builder.mul(n, _const(gbytes))
        return _u4_unit(builder, isa, *(_load_first(builder, a, _V64B, 1, count)
                                         for a in (ca, builder.add(e, off), builder.add(o, off))))
    return unit_vector


def _row_u4_intrinsic(isa: str, group: int):
    per = 2 * DOT_CHUNK // group         # groups a 64-byte unit of codes holds

    @intrinsic
    def row_dot_u4(typingctx, codes_addr, scales_addr, mins_addr, e_addr, o_addr, xs_addr, xsum_addr, ng, pf):
        """Σ_g (scale[g] · xs[g] · Σ codes·activations + min[g] · xsum[g]) over one row of ng
        groups: int4 codes, fp16 scales and minimums; the row's activations as even and odd int8
        codes, their float32 scales xs and sums xsum per group (_quantize_rows). float32."""
        sig = types.float32(*([types.intp] * 9))

        def codegen(context, builder, signature, args):
            cw, sc, mn, e, o, xs, xsum, ng, pf = args
            unit_vector = _u4_unit_vector(builder, isa, group, cw, e, o, pf)

            def scales(base, left, mask):
                # (scale · xs, min · xsum) of the block's groups
                b2, b4 = builder.mul(base, _const(2)), builder.mul(base, _const(4))
                s, m = (_f16_block(builder, isa, builder.add(a, b2), left, mask) for a in (sc, mn))
                xsv, xsumv = (_masked_load(builder, builder.add(a, b4), _V16F, 4, mask) for a in (xs, xsum))
                return builder.fmul(s, xsv, flags=_FAST), builder.fmul(m, xsumv, flags=_FAST)

            if isa == "avx2":
                return _scaled_blocks(builder, ng, per, unit_vector, scales)

            def block_end(base, mask, isums, acc):
                f, mins = scales(base, builder.sub(ng, base), mask)
                t = builder.fadd(builder.fmul(builder.sitofp(isums, _V16F), f, flags=_FAST), mins, flags=_FAST)
                return builder.fadd(acc, t, flags=_FAST)
            return _sum_lanes(builder, _group_blocks(builder, ng, per, unit_vector, block_end, _V16F, builder.add), 16)
        return sig, codegen
    return row_dot_u4


#: the whole-row int4 dot of each instruction set and group size; ROW_U4 the process's
ROW_U4_DOTS = {(isa, g): _row_u4_intrinsic(isa, g) for isa in U4_ISAS
               for g in ROW_DOT_GROUPS}
ROW_U4 = {g: ROW_U4_DOTS[(U4_ISA, g)] for g in ROW_DOT_GROUPS}


@intrinsic
def row_dot_bf16(typingctx, w_addr, x_addr, chunks, pf):
    """Σ_j w[j]·x[j] over chunks·64 bf16 weights at w_addr and float32 activations at x_addr, with
    four 16-lane partial sums (no per-chunk reduction); weights `pf` bytes ahead prefetched. float32."""
    sig = types.float32(*([types.intp] * 4))

    def codegen(context, builder, signature, args):
        w, x, chunks, pf = args
        loop, c, acc = _loop_head(builder, "chunk", _V64F)
        off = builder.mul(c, _const(DOT_CHUNK))
        wa = builder.add(w, builder.mul(off, _const(2)))
        _prefetch_ir(builder, builder.add(wa, pf))          # a chunk is two cache lines of bf16
        _prefetch_ir(builder, builder.add(wa, builder.add(pf, _const(64))))
        wv = _widen_bf16(builder, wa, _V64F)
        xv = _at(builder, builder.add(x, builder.mul(off, _const(4))), _V64F, 4)
        acc1 = builder.fadd(acc, builder.fmul(wv, xv, flags=_FAST), flags=_FAST)
        _loop_tail(builder, loop, c, acc, acc1, chunks, "chunks_end")
        return _sum_lanes(builder, acc1, DOT_CHUNK)
    return sig, codegen
