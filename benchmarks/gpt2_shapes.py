"""GPT-2 shapes shared by the benchmarks (transformers' names and Conv1D layout: in × out)."""

from __future__ import annotations


def block_shapes(prefix: str, d: int = 768) -> dict[str, tuple[int, ...]]:
    """The twelve parameters of one GPT-2 block under ``prefix`` (e.g. ``transformer.h.0``)."""
    return {
        f"{prefix}.ln_1.weight": (d,),
        f"{prefix}.ln_1.bias": (d,),
        f"{prefix}.attn.c_attn.weight": (d, 3 * d),
        f"{prefix}.attn.c_attn.bias": (3 * d,),
        f"{prefix}.attn.c_proj.weight": (d, d),
        f"{prefix}.attn.c_proj.bias": (d,),
        f"{prefix}.ln_2.weight": (d,),
        f"{prefix}.ln_2.bias": (d,),
        f"{prefix}.mlp.c_fc.weight": (d, 4 * d),
        f"{prefix}.mlp.c_fc.bias": (4 * d,),
        f"{prefix}.mlp.c_proj.weight": (4 * d, d),
        f"{prefix}.mlp.c_proj.bias": (d,),
    }


def gpt2_small_shapes(
    layers: int = 12, d: int = 768, vocab: int = 50257, positions: int = 1024
) -> dict[str, tuple[int, ...]]:
    """A GPT-2 model's parameter shapes (no tied lm_head); the defaults are GPT-2 small's
    (124 M parameters)."""
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, d),
        "transformer.wpe.weight": (positions, d),
    }
    for i in range(layers):
        shapes |= block_shapes(f"transformer.h.{i}", d)
    return shapes | {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
