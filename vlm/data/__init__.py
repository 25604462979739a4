"""Data: webdataset shards (caption, chat, interleaved), converters, synthetic shapes, collation."""
