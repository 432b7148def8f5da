"""Clips in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...), through boto3.

Objects sit under ``prefix`` in ``bucket``; a CDN in front of the bucket (``stream.cdn_base_url``)
serves them to clients, who then never reach this node for a clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream_server.clips.backend import BlobInfo, ClipBackend

CONTENT_TYPES = {".mp4": "video/mp4", ".json": "application/json"}


class S3ClipBackend(ClipBackend):
    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str = "", region: str = "") -> None:
        import boto3

        if not bucket:
            raise ValueError("stream.s3_bucket must name a bucket when stream.clip_store = \"s3\"")
        self.bucket = bucket
        self.prefix = prefix
        self._client: Any = boto3.client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None
        )

    def _key(self, name: str) -> str:
        return self.prefix + name

    @staticmethod
    def _extra(name: str) -> dict[str, str]:
        content_type = CONTENT_TYPES.get(Path(name).suffix)
        return {"ContentType": content_type} if content_type else {}

    def put_file(self, name: str, source: Path) -> None:
        self._client.upload_file(str(source), self.bucket, self._key(name), ExtraArgs=self._extra(name))
        source.unlink(missing_ok=True)

    def put_bytes(self, name: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, **self._extra(name))

    def read(self, name: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        except self._client.exceptions.NoSuchKey:
            return None
        body: bytes = response["Body"].read()
        return body

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):  # the most one request may delete
            objects = [{"Key": self._key(n)} for n in names[start : start + 1000]]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    def list(self, prefix: str) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix), Delimiter="/"):
            for item in page.get("Contents", []):
                name = str(item["Key"])[len(self.prefix) :]
                modified_ns = int(item["LastModified"].timestamp() * 1e9)
                found.append(BlobInfo(name, int(item["Size"]), modified_ns))
        return found
