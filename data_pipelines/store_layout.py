"""The on-disk layout of latentcell stores: one place that writers and readers both import.

Zarr v3 store (a directory, ``<out>``; built in ``<out>.tmp-<hex>`` then renamed)::

    zarr.json                  root group; attrs["latentcell"] = {"format": "zarr", "version": 2}
    manifest.json              MANIFEST (below); written last, before the rename
    X/indptr                   int64 (n_cells + 1,)      CSR row pointers into data/indices
    X/data                     float32 (nnz,)            counts (exact integers for count data)
    X/indices                  int32 (nnz,)              gene index in the store vocabulary
                                                         (uint16 if built with index_dtype=uint16;
                                                         readers always return int32)
    library_size               float32 (n_cells,)        sum of X over the stored genes
    obs/<col>/codes            int32 (n_cells,)          categorical column; attrs["categories"]
    obs/<col>                  numeric (n_cells,)        numeric column (float64/int64/bool)
    obs/_names                 str (n_cells,)            obs names (cell barcodes)
    obs/_source_file           int32 codes; attrs["categories"] = input paths
    obs/_source_row            int64 row in its input file
    var/<col>                  str (n_genes,)            gene_key (vocabulary key), gene_id, gene_symbol
    groups/<role>              int32 (n_ranges,)         role codes per group range (-1: no column)
    groups/start, groups/stop  int64 (n_ranges,)
    crc32c/<array>             uint32 (n_chunks,)        each chunk's crc32c by position, for
                                                         every array above (``integrity``)

Every (n_cells,) array and ``X/indptr`` is chunked by ``chunk_cells`` (default 1000) cells;
``X/data`` and ``X/indices`` are chunked by ``nnz_chunk`` entries. A read unit is one cell
chunk: rows [k*chunk_cells, min((k+1)*chunk_cells, n_cells)). Every array's codec chain ends
with the ``crc32c`` codec and every chunk file is written, also all-zero ones (``integrity``).

WebDataset store (a directory of tar shards)::

    manifest.json              MANIFEST, plus "shards": [{"name", "sha256", "crc32c", "bytes",
                               "nnz", "n_cells", "n_samples", "first_row"}]
    shard-000000.tar ...       samples "<key>.cells.npz", one sample = one block of block_cells
                               consecutive rows; the npz holds data, indices, indptr, rows,
                               library_size, names, code.<col>, num.<col>
A read unit is one shard; shards hold consecutive rows.

MANIFEST (both formats, JSON)::

    {"format": "zarr"|"webdataset", "version": 1, "created": ISO time, "latentcell_version",
     "n_cells", "n_genes", "nnz", "chunk_cells" | "block_cells",
     "nnz_chunk", "codec", "index_dtype",         # zarr only: X/data chunking and compression
     "n_group_ranges", "category_counts": {col: [cells per category]},
     "var": {"gene_key": [...], "gene_id": [...], "gene_symbol": [...]},   # the vocabulary
     "obs": {"categorical": {col: [categories]}, "numeric": {col: dtype}},
     "roles": {"cell_type": col|None, "perturbation": col|None, "batch": col|None},
     "control_label": str|None,
     "groups": {"cell_type": [...], "perturbation": [...], "batch": [...], "start": [...],
                "stop": [...]},                   # webdataset only; zarr keeps it in groups/
     "inputs": [{"path", "n_cells", "schema"}], "build": {...options used...},
     "checksums": {relative file path or array name: sha256},
     "manifest_sha256": sha256 of this JSON without this key (canonical form, ``integrity``)}
                   # zarr: one per array, over the array directory's files in sorted order
                   # (atomic.sha256_tree); webdataset: one per shard file
"""

from __future__ import annotations

FORMAT_VERSION = 2  # 2: per-unit checksums and a sealed manifest (see ``integrity``)
SEALED_SINCE = 2
MANIFEST_NAME = "manifest.json"
DEFAULT_CHUNK_CELLS = 1000
DEFAULT_BLOCK_CELLS = 256
ROLE_COLUMNS = ("cell_type", "perturbation", "batch")
SOURCE_FILE_COLUMN = "_source_file"
SOURCE_ROW_COLUMN = "_source_row"
NAMES_COLUMN = "_names"
