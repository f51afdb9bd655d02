"""rnnscale.parallel: the DeepSpeed config, and sequence parallelism across the scans.

- `layout`: `ParallelLayout`, the job's ranks as data-parallel replicas of sequence-parallel
  ranks (`rank = d * P + s`, written nowhere else).
- `deepspeed_config`: the DeepSpeed config dict derived from the run config and the layout.
- `sequence`: data x sequence parallel groups (DeepSpeed's mpu), the slice each rank holds,
  the collectives between the ranks of a sequence group (state all-gather, halos, key/value
  all-gather, DeepSpeed Ulysses) and the bytes they move.
- `state_passing`: the scan kernels over a slice of a sequence, passing recurrent states.
"""
