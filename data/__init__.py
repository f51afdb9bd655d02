"""rnnscale.data: token sources, document packing into rows with cu_seqlens, batches."""
