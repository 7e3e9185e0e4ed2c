"""What a compiled program sends: the collectives of XLA's HLO text, counted per step.

`collectives` reads the text of `jax.jit(...).lower(...).compile().as_text()` (any backend;
written against XLA:TPU's output, whose shapes carry tiled layouts and whose async
collectives may be split over chains of fusions). `gathered_bytes` reads a jaxpr: what the
program asks to all-gather. The pod planner (`softcon_jax.plan`) compares the two.
`cudnn_attention_flops` reads a jaxpr for what XLA's cost analysis cannot see: cuDNN's
fused attention.
"""

from __future__ import annotations

import math
import re

from softcon_jax.models.layers import BN_STATISTICS_SCOPE

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
# `%name = SHAPE opcode(`; SHAPE may be a tuple with tiled layouts such as {0:T(128)}, so
# it is everything up to the opcode, not up to the first parenthesis.
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented, ends in {
_CALLEE = re.compile(r"\bcalls=%?([\w.\-]+)|\bbranch_computations=\{([^}]*)\}")
_CHAIN = re.compile(r'\bchannel_id=\d+\b.*\bchain_id="\d+"')
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_S32_CONSTANT = re.compile(r"=\s*s32\[\][^ ]*\s+constant\((\d+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')

# Printed under every plan: what the HBM traffic figure is and is not.
BYTES_ACCESSED_NOTE = (
    "note: HBM traffic is XLA's cost-analysis 'bytes accessed', an estimate from the compiled "
    "program, not a measurement: it counts padded tiles (a 13-wide minor dimension as 128 "
    "lanes), charges gathers several times the data they move, counts staging an operand "
    "into on-chip memory as extra reads and copies, and counts a loop body once whatever its "
    "trip count. Compare it between variants of one step; a profile on the accelerator gives "
    "the real time.")


def _arrays(shape_text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _DTYPE_BYTES:
            out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _op_bytes(m) -> int:
    sizes = _arrays(m.group(1))
    if m.group(3) and m.group(1).startswith("(") and m.group(2) != "all-reduce":
        # An async start's result is (operands, results[, u32[] contexts]): the results.
        sizes = [s for s in sizes if s > 4]
        sizes = sizes[len(sizes) // 2:]
    return sum(sizes)


def collectives(hlo_text: str, *, by_scope: bool = False):
    """[{kind, count, bytes}] per chip per step: each collective's result bytes.

    Ops are counted where they execute: a computation run by a `while` with a known trip
    count (scans, fori loops) counts that many times, one called through `call`, an async
    wrapper or a conditional branch counts once per call site (a branch is counted as if
    taken). Async `*-start` ops are counted, their `*-done` are not; copies of one op that
    share a channel and chain_id (a collective XLA split over several fusions) count once.
    With `by_scope`, also returns the bytes of the ops whose op_name holds
    `BN_STATISTICS_SCOPE` (sync batch norm) and the number of loops whose trip count is
    unknown (counted once).
    """
    direct, calls, entry, comp = {}, {}, None, None
    bounds = {}  # loop condition computation -> its `i < N` bound N
    chains = set()
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            comp = header.group(2)
            direct[comp], calls[comp] = [], []
            entry = comp if header.group(1) else entry
            continue
        if comp is None:
            continue
        m = _OP.search(line)
        chain = _CHAIN.search(line) if m else None
        key = m and chain and (m.group(2), tuple(_arrays(m.group(1))), chain.group(0))
        if m and not (key and key in chains):
            # XLA:TPU splits one async collective over a chain of fusions that overlap it
            # with compute; each holds a copy with the same channel and chain_id.
            chains.add(key)
            direct[comp].append((m.group(2), _op_bytes(m), BN_STATISTICS_SCOPE in line))
        if (c := _S32_CONSTANT.search(line)):
            bounds.setdefault(comp, []).append(int(c.group(1)))
        if " while(" in line:
            trip = _TRIP.search(line)
            cond = _CONDITION.search(line)
            calls[comp].append((_BODY.search(line).group(1),
                                int(trip.group(1)) if trip else None,
                                cond.group(1) if cond else None))
            continue
        for single, branches in _CALLEE.findall(line):
            for name in ([single] if single else re.findall(r"%([\w.\-]+)", branches)):
                calls[comp].append((name, 1, None))

    def trips(times, cond):
        # XLA:TPU drops known_trip_count; a counted loop's condition is `i < N` with N its
        # only integer constant (scan and fori_loop count from 0 by 1).
        if times is None and len(set(bounds.get(cond, ()))) == 1:
            return bounds[cond][0], False
        return (times, False) if times is not None else (1, True)

    memo = {}

    def total(name):  # {kind: [count, bytes]}, bn bytes, unknown loops of one execution
        if name in memo:
            return memo[name]
        out, bn, unknown = {k: [0, 0] for k in COLLECTIVES}, 0, 0
        for kind, nbytes, is_bn in direct.get(name, ()):
            out[kind][0] += 1
            out[kind][1] += nbytes
            bn += nbytes if is_bn else 0
        for callee, times, cond in calls.get(name, ()):
            times, loop_unknown = trips(times, cond)
            sub, sub_bn, sub_unknown = total(callee)
            for k in COLLECTIVES:
                out[k][0] += times * sub[k][0]
                out[k][1] += times * sub[k][1]
            bn += times * sub_bn
            unknown += sub_unknown + (loop_unknown and any(c for c, _ in sub.values()))
        memo[name] = (out, bn, unknown)
        return memo[name]

    sums, bn, unknown = total(entry) if entry else ({}, 0, 0)
    result = [{"kind": k, "count": c, "bytes": b} for k, (c, b) in sums.items() if c]
    return (result, bn, unknown) if by_scope else result


def cudnn_attention_flops(jaxpr) -> int:
    """FLOPs of cuDNN's fused attention in a jaxpr (`jax.nn.dot_product_attention`, cudnn).

    XLA's cost analysis cannot see into the custom calls these become. Each is counted as
    the kernel computes it, at its (padded) shapes: forward QK^T and PV, 2 x 2*B*H*T*S*D;
    backward (flash attention recomputes QK^T, then dV, dP, dQ, dK), 5 x 2*B*H*T*S*D. The
    primitives' `layout` is JAX's AttentionLayout: 0 = (B, T, H, D), 1 = (B, H, T, D).
    """
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name.startswith("dot_product_attention_") and name.endswith("_wrapper"):
            q, k = (v.aval.shape for v in eqn.invars[:2])
            kv_tokens = k[1] if eqn.params.get("layout", 0) == 0 else k[2]
            passes = 5 if "_bwd" in name else 2 if "_fwd" in name else 0
            total += passes * 2 * math.prod(q) * kv_tokens
        for sub in jax_core_subjaxprs(eqn):
            total += cudnn_attention_flops(sub)
    return total


def gathered_bytes(jaxpr) -> int:
    """Bytes of every `all_gather` the program asks for (the loss's embeddings and labels)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "all_gather":
            total += sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in eqn.outvars)
        for sub in jax_core_subjaxprs(eqn):
            total += gathered_bytes(sub)
    return total


def jax_core_subjaxprs(eqn):
    import jax

    for param in eqn.params.values():
        for p in (param if isinstance(param, (tuple, list)) else (param,)):
            if isinstance(p, jax.extend.core.ClosedJaxpr):
                yield p.jaxpr
            elif isinstance(p, jax.extend.core.Jaxpr):
                yield p
