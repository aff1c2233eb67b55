"""Results: the record schema (one module, versioned, validated when read), the paper's tables and the
per-family tables rebuilt from records, the report writer, and `paper/` (every number the paper reports).

Run outputs (`records/`, `summary.csv`, `tables/`) are written beside these modules by default and are
not part of the repository.
"""
