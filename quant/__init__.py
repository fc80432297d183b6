"""Quantization for dg: 4-bit experts, 8-bit dense weights and embedding, as module replacement.

- formats.py   packed formats (int4 g64 sym/asym, int8 per row, NF4): quantize and dequantize
- schemes.py   which tensor gets which format (the one path predicate), and the named schemes
- planner.py   VRAM estimate and the choice of formats within a budget (`dg quantize`, `dg show`)
- convert.py   `dg quantize`: stream a checkpoint into a quantized directory (quantize_checkpoint)
- manifest.py  dg_manifest.json: format version, per-tensor formats, shard checksums
- runtime.py   QuantLinear / QuantExperts / QuantEmbedding and prepare_quantized (the loader hook)
See docs/quantization.md.
"""
