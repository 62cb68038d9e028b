"""ossfs: read Alibaba Cloud OSS and S3-compatible buckets as files.

A read-only FUSE mount backed by a resumable on-disk part cache, and a
resumable parallel downloader (``ossfs download``, ``ossfs materialize``).
See ``docs/architecture.md`` for how the modules fit together.
"""

__version__ = "0.1.0"
