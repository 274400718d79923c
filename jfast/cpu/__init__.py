"""What helps XLA:CPU only: half-precision products in the forms its bf16 kernel takes, the remat compiler option,
glibc allocator tunables (`jfast.cpu.hugepages`), and row-sparse word-table training.

Nothing here is on the GPU or TPU path. The models ask `active` (a bf16/fp16 trace for a CPU with bf16 instructions)
before they build a CPU-shaped product, `jfast.training.fit` adds `compiler_options` only when the backend is the CPU, and the command
line sets the allocator tunables only for CPU runs. Row-sparse embeddings are opt-in
(``OptimizerConfig(row_sparse_embeddings=...)``). Names are imported on first use, so the command line reads
`jfast.cpu.hugepages` before JAX is loaded.
"""

from jfast._lazy import lazy_exports

_EXPORTS = {
  "MixedDense": ".dots",
  "add_bias": ".dots",
  "mixed_dot_general": ".dots",
  "mixed_matmul": ".dots",
  "mixed_matmul_nt": ".dots",
  "row_major": ".dots",
  "active": ".platform",
  "cpu_has_bf16": ".platform",
  "layer_enabled": ".platform",
  "current_platform": ".platform",
  "platform_kind": ".platform",
  "target": ".platform",
  "use_layer": ".platform",
  "CPU_REMAT_OPTIONS": ".remat",
  "compiler_options": ".remat",
  "RowSparseAdamState": ".row_sparse",
  "RowSparseEmbedding": ".row_sparse",
  "RowUpdate": ".row_sparse",
  "row_sparse_adamw": ".row_sparse",
  "row_sparse_embedding": ".row_sparse",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
