"""Where galleries are kept: named, versioned stores (files in the data dir, or Milvus)."""
