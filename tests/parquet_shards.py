"""Embedding shards written the way `openclip-lite embed` writes them, for tests of the code that reads them."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np


def write_shards(
    folder: Path,
    paths: Sequence[str],
    features,
    sizes: Sequence[int],
    manifest: Optional[dict] = None,
    row_group_size: Optional[int] = None,
) -> None:
    """`features` (rows x dim: numpy or torch) and their `paths` as part-NNNNN.parquet files of `sizes` rows each
    (columns `path`, `embedding` as list<float32>), plus manifest.json when one is given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.asarray(features, dtype=np.float32)
    assert sum(sizes) == len(rows) == len(paths), "the sizes must cover every row once"
    folder.mkdir()
    start = 0
    for number, size in enumerate(sizes):
        table = pa.table(
            {
                "path": pa.array(list(paths[start : start + size]), pa.string()),
                "embedding": pa.array(list(rows[start : start + size]), pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, folder / f"part-{number:05d}.parquet", row_group_size=row_group_size)
        start += size
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))
