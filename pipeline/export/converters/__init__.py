"""Readers of official checkpoints of other codebases, one module each; every module registers a
`pipeline.export.sources.Converter` when imported (`ganpipe convert NAME`, and `init=` / `eval` / `generate` of
the files it claims)."""
