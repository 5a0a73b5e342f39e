"""Reading images of a curation directory: by uid, decoded in background threads ahead of the model."""

from __future__ import annotations

import io
import queue
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from lpo.curate.ingest import image_parts


@dataclass
class ImageBatch:
    uids: list[str]
    captions: list[str]
    images: list[Any]  # PIL images, None where decoding failed
    errors: list[str | None]


def decode(data: bytes | None) -> tuple[Any, str | None]:
    if data is None:
        return None, "no image bytes"
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB"), None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        # object reprs carry memory addresses: drop them so the same bad image always gets the same message
        return None, f"undecodable image: {type(err).__name__}: {re.sub(r' ?<[^>]*>', '', str(err))}"


def iter_images(work_dir: Path, todo: set[str], batch_size: int, workers: int) -> Iterator[ImageBatch]:
    """Batches of decoded images for the uids in `todo`, read part by part with only the rows needed."""
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in image_parts(work_dir):
            handle = pq.ParquetFile(part)
            for group in range(handle.num_row_groups):
                uids = handle.read_row_group(group, columns=["image_uid"]).column("image_uid").to_pylist()
                rows = [i for i, u in enumerate(uids) if u in todo]
                if not rows:
                    continue
                table = handle.read_row_group(group, columns=["image_uid", "caption", "image"]).take(rows)
                for start in range(0, table.num_rows, batch_size):
                    chunk = table.slice(start, batch_size)
                    decoded = list(pool.map(decode, chunk.column("image").to_pylist()))
                    yield ImageBatch(chunk.column("image_uid").to_pylist(), chunk.column("caption").to_pylist(),
                                 [d[0] for d in decoded], [d[1] for d in decoded])


def prefetch(iterator: Iterator[ImageBatch], depth: int = 2) -> Iterator[ImageBatch]:
    """Run `iterator` in a background thread, `depth` batches ahead, so decoding overlaps the model forward."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # re-raised in the consumer
            failure.append(err)
        finally:
            buffer.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
