"""Scan kernel tests. Not named tests/kernels: pytest would import that as a top-level
`kernels` package, the bare name the ruff rule bans."""
