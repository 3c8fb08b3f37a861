"""Backups of a collection: content-addressed chunk files of shard records, the broker's model
files and a manifest with checksums, in a directory or an S3 bucket; restore into any shard count.

- ``storage``: where backups live (a directory, ``s3://bucket/prefix``);
- ``chunks``: the chunk file format (length-delimited ``ShardRecord`` messages) and the
  content-defined cut rule that lets an incremental backup reuse unchanged chunks;
- ``manifest``: the manifest (JSON) and its checks;
- ``take``: taking a backup from live shards; ``restore``: verifying and restoring one.
"""
