"""DecodeConfig: how the fast engine's prefill and decode step run, one frozen object.

FastPhiEngine owns one (its constructor's `config`, default `DecodeConfig()`: the production
settings) and passes it down to the step functions; tests and benchmarks build variants with
`dataclasses.replace` instead of changing module state. Timings behind the defaults are in
docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.kernels.attention_tiles import ATTENTION_TILES, AttentionConfig, attention_config
from pipeline.kernels.linear import SKINNY_MAX_ROWS


@dataclass(frozen=True)
class DecodeConfig:
    # Layer norm and attention kernels start while the product before them drains (programmatic
    # dependent launch; compute capability 9.0 and up, see pipeline/llm/hardware.py).
    pdl: bool = True
    # The "dot" attention kernel (one split) also does the rotary and the cache write: one launch.
    rope_in_attention: bool = True
    # Batches on the fused layer path run the MLP on a second stream beside attention.
    mlp_beside_attention: bool = True
    # ... also while LoRA adapters are loaded (multi_lora.py): False takes the fused layer, whose LoRA
    # work is two masked product pairs per layer instead of four (timings: benchmarks/multi_lora.py).
    lora_mlp_beside: bool = False
    # Batches applying LoRA take the fused layer at every size, not the skinny products below
    # fused_min_rows (measured faster there with the LoRA work: benchmarks/multi_lora.py).
    lora_fused_layer: bool = True
    # The fused layer's GELU runs inside the rotary(+attention) kernel (False: a torch kernel).
    gelu_in_rope: bool = True
    # Warps per row of the layer-norm kernel and per (token, head) of the rotary kernel.
    norm_warps: int = 16
    rope_warps: int = 1
    # From this many rows on, a layer is two wide products (or the MLP beside attention); below it,
    # the skinny Triton products serve qkv and fc1.
    fused_min_rows: int = SKINNY_MAX_ROWS + 1
    # The attention kernel's tiles per batch-size bucket.
    attention_tiles: tuple[tuple[int, AttentionConfig], ...] = ATTENTION_TILES
    # Attention scores in fp32 on the torch path (SDPA) for bfloat16 too. float16 gets fp32 scores
    # whatever this says (phi_model._sdpa): it overflows in phi-2's attention (transformers PR
    # #28163). The Triton kernels always sum scores in fp32.
    fp32_attention_scores: bool = False
    # Each step's tokens go to the host on a second stream, so the next step need not wait behind the
    # copy (llm/step_reader.py); off until measured (benchmarks/block_table_study.py times both).
    host_copy_beside: bool = False

    def attention(self, rows: int) -> AttentionConfig:
        """The attention kernel's tiles for a batch of `rows` rows."""
        return attention_config(rows, self.attention_tiles)


DEFAULT_DECODE = DecodeConfig()
