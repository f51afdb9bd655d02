"""rnnscale.kernels: the recurrent scans as pure functions on tensors.

Layout `[B, T, H, K]` for queries and keys, `[B, T, H, V]` for values and outputs, recurrent
state `[N, H, K, V]`. Every op returns `(out, final_state)`. This package knows nothing of
configs, modules or torch.distributed (docs/architecture.md); the one exception is the sm_90
fit report's `sm90_scope.py`, a command that reads the recipes' head shapes and that no op
imports.
"""
