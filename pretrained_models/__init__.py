"""Packaged trained encoders live in this folder, one sub-folder each (pretrained_models/README.md).

`python -m pretrained_models.export` writes them. Reading them belongs with reading a checkpoint: the format,
lookup by name and reading are in `models.packages`, used through `models.load_encoder` and
`models.loading.resolve_checkpoint`.
"""
