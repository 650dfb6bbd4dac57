"""A handler for process tests: the example blob store plus a slow call."""

from __future__ import annotations

import time

from mesh.examples.blobstore import BlobStore


class Sleeper(BlobStore):
    def sleep(self, seconds: memoryview) -> str:
        time.sleep(float(str(seconds, "utf-8")))
        return "slept"
