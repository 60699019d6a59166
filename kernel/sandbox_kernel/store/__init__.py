"""The content-addressed store: files as content-defined chunks, each kept once."""

from .chunks import CHUNK_AVG, chunk_hash, file_hash
from .store import ContentStore, CorruptChunk, FileRecord, MissingChunk

__all__ = ["CHUNK_AVG", "ContentStore", "CorruptChunk", "FileRecord", "MissingChunk",
           "chunk_hash", "file_hash"]
