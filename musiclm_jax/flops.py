"""Analytic FLOP count of a JAX function from its jaxpr: matrix products and convolutions, the work a TPU's
matrix units do.

XLA's cost_analysis() (libtpu's included) counts the body of a scanned layer stack once, so a 24-layer model
scanned over its layers reads as one layer. Walking the jaxpr instead multiplies a scan's body by its length.

    flops = matmul_flops(fn, *example_args)   # example_args: arrays or jax.ShapeDtypeStruct

Counted: dot_general (2 x output elements x contracted size) and conv_general_dilated (2 x output elements x
kernel elements per output feature), inside jit, scan (x length), remat, custom_jvp / custom_vjp and cond (its
costliest branch). Not counted: FFTs, elementwise work, reductions and gathers. A while loop's trip count is
unknown from the jaxpr, so one raises ValueError naming it (write the loop as a scan or count it yourself).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core


def _dot_general_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # The kernel holds in_features / feature_group_count inputs per output feature.
    return 2 * math.prod(out) * (math.prod(rhs) // rhs[out_feature_dim])


def _sub_jaxprs(eqn) -> list[tuple[Any, int]]:
    """(jaxpr, multiplicity) of the sub-computations an equation runs."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        return [(params["jaxpr"], int(params["length"]))]
    if name == "while":
        raise ValueError("matmul_flops: a while loop's trip count is not in the jaxpr (write it as a scan)")
    if name == "cond":
        return [(max(params["branches"], key=lambda b: jaxpr_flops(b)), 1)]
    found = []
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params:
            found.append((params[key], 1))
    return found


def jaxpr_flops(jaxpr) -> int:
    """Matrix-unit FLOPs of a (closed) jaxpr; see the module docstring."""
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            for sub, times in _sub_jaxprs(eqn):
                total += times * jaxpr_flops(sub)
    return total


def matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of the matrix products and convolutions of fn(*args, **kwargs) (arrays or ShapeDtypeStructs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
