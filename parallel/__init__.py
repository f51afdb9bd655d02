"""rnnscale.parallel: process groups, sequence parallelism across the chunkwise scans.

Empty until the sequence-parallel issue lands; the package exists now so that the import
contract (launch -> train -> {parallel, data} -> kernels) is checked from the start.
"""
