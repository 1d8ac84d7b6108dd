"""Silent bf16 -> f32 matmul upcasts in an HLO module (`benchmarks.accelerator`'s bf16 check).

The model computes in bf16 and accumulates some matmuls in f32 on purpose; what must not
happen is a 16-bit value converted to f32 and then multiplied in f32 (an eighth to a
fifteenth of a GPU's bf16 rate). This reads the HLO text, traced or compiled, and finds them.
"""

from __future__ import annotations

import re
from typing import Any

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[[^\]]*\](?:\{[^}]*\})?\s+([\w\-]+)\((.*)$")
_PASS_THROUGH = {"reshape", "transpose", "bitcast", "copy", "broadcast", "slice", "dynamic-slice", "concatenate",
                 "pad", "get-tuple-element"}
_MATMULS = {"dot", "convolution"}
_LOW = {"bf16", "f16"}


def _operand_names(rest: str) -> list[str]:
    """The operand names of an instruction from the text after ``opcode(``: printed with their
    types (``f32[4,8]{1,0} %x``) or without (``x``), depending on the jax version."""
    depth, end = 0, len(rest)
    for i, char in enumerate(rest):  # the operand list ends at the matching ')'
        depth += char in "([{"
        if char in ")]}":
            if depth == 0:
                end = i
                break
            depth -= 1
    listed = re.sub(r"\[[^\]]*\]|\{[^}]*\}", "", rest[:end])
    return [piece.split()[-1].lstrip("%") for piece in listed.split(",") if piece.strip()]


def _instructions(hlo_text: str) -> dict[str, tuple[str, str, list[str], str]]:
    """name -> (result dtype, opcode, operand names, line) of every HLO instruction."""
    table = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, dtype, opcode, rest = match.groups()
            table[name] = (dtype, opcode, _operand_names(rest), line.strip())
    return table


def _dtype(name: str, table) -> str | None:
    return table[name][0] if name in table else None


def _from_low_precision(name: str, table, depth: int = 0) -> bool:
    """Whether the value ``name`` is a 16-bit float converted up (through shape-only ops)."""
    if name not in table or depth > 12:
        return False
    _, opcode, operands, _ = table[name]
    if opcode == "convert":
        return bool(operands) and _dtype(operands[0], table) in _LOW
    if opcode in _PASS_THROUGH:
        return any(_from_low_precision(operand, table, depth + 1) for operand in operands)
    if opcode == "fusion":  # compiled programs fuse the convert: 16-bit in, f32 out
        return any(_dtype(operand, table) in _LOW for operand in operands)
    return False


def upcast_matmuls(hlo_text: str) -> list[str]:
    """The f32 matmuls of an HLO module whose inputs are bf16/f16 values converted to f32.

    A matmul (``dot``, ``convolution``, or a cuBLAS gemm custom-call) with an f32 operand that
    is a 16-bit value run through ``convert`` (and shape-only ops) computes in f32 what the
    model meant to compute in bf16: at an eighth to a fifteenth of the matrix units' rate on
    a GPU. Matmuls that take bf16 operands and accumulate into f32 (scores, the output
    projection) are not upcasts; f32 values that never were bf16 (optimizer, loss, softmax
    statistics) are not either. Returns the offending instruction lines.
    """
    table = _instructions(hlo_text)
    found = []
    for dtype, opcode, operands, line in table.values():
        is_gemm = opcode == "custom-call" and ("gemm" in line or "matmul" in line)
        if dtype != "f32" or not (opcode in _MATMULS or is_gemm):
            continue
        if any(_dtype(operand, table) == "f32" and _from_low_precision(operand, table) for operand in operands):
            found.append(line[:300])
    return found


def matmul_dtypes(hlo_text: str) -> dict[str, int]:
    """Counts of matmul instructions by their operand dtypes (e.g. "bf16,bf16->f32": 12)."""
    counts: dict[str, int] = {}
    table = _instructions(hlo_text)
    for dtype, opcode, operands, line in table.values():
        if opcode in _MATMULS or (opcode == "custom-call" and ("gemm" in line or "matmul" in line)):
            key = ",".join(str(_dtype(operand, table)) for operand in operands[:2]) + "->" + dtype
            counts[key] = counts.get(key, 0) + 1
    return counts


def hlo_report(lowered, compiled=None) -> dict[str, Any]:
    """Upcasts in the program as traced (the model's own code) and as compiled (what runs:
    ``compiled``, or ``lowered`` compiled here), and the compiled matmuls by dtype."""
    compiled_text = (compiled if compiled is not None else lowered.compile()).as_text()
    return {"traced_upcasts": upcast_matmuls(lowered.as_text(dialect="hlo")),
            "compiled_upcasts": upcast_matmuls(compiled_text), "compiled_matmul_dtypes": matmul_dtypes(compiled_text)}
