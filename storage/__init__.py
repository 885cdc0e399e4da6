"""vqpt.storage: token shards, codecs, manifests and the streaming reader.

The data path this package owns: token grids -> ``codec`` (bytes) -> ``shard`` (blocks in a
webdataset-compatible tar) -> ``manifest`` (parquet) -> ``stream`` (a torch IterableDataset).
It imports nothing from ``pipeline`` or ``pretrain``.
"""
