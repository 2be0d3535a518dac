"""`ganpipe data inspect URL`: read every sample once through the streaming loader and summarise the dataset.

Contract: `inspect_dataset` returns a JSON-ready dict (good samples, bad samples per kind, worst shards,
classes, captions, resolution histogram, manifest facts). Bad samples and broken shards are counted, not raised;
a URL or manifest that cannot be opened, or a dataset none of whose shards can be read, raises `DatasetError`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from pipeline.data.stream import StreamOptions, open_source, read_once
from pipeline.errors import DatasetError


def inspect_dataset(url: str, num_workers: int = 0, options: StreamOptions | None = None) -> dict[str, Any]:
    """Summary of every sample of `url` (a dataset folder, manifest, or brace-expanded shard URLs)."""
    source = open_source(url)
    m = source.manifest
    reader = read_once(source, num_workers=num_workers, options=options or StreamOptions(retry_backoff_s=0.5))
    sizes: Counter[str] = Counter()
    labels: Counter[int] = Counter()
    captions = 0
    start = time.perf_counter()
    for item in reader:
        _, h, w = item["image"].shape
        sizes[f"{w}x{h}"] += 1
        if item["label"] >= 0:
            labels[item["label"]] += 1
        captions += bool(item["caption"])
    seconds = time.perf_counter() - start
    stats = reader.stats
    if stats.shards_read == 0 and stats.good == 0:
        raise DatasetError(
            f"none of the {source.num_shards} shards of {url!r} could be read "
            f"(worst: {stats.worst_shards[:1]}): check the URL, credentials and network"
        )
    names = m.class_names if m is not None and m.class_names else None
    return {
        "url": url,
        "shards": source.num_shards,
        "shards_read": stats.shards_read,
        "samples_expected": m.num_samples if m is not None else None,
        "good": stats.good,
        "bad": stats.num_bad,
        "bad_by_kind": {k: n for k, n in stats.bad.items() if n},
        "worst_shards": [{"shard": name, "bad": n} for name, n in stats.worst_shards],
        "classes": {(names[i] if names and i < len(names) else str(i)): n for i, n in sorted(labels.items())},
        "captions": captions,
        "resolutions": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "manifest": None
        if m is None
        else {
            "resolution": m.resolution,
            "num_classes": m.num_classes,
            "has_labels": m.has_labels,
            "has_captions": m.has_captions,
            "image_format": m.image_format,
        },
        "seconds": round(seconds, 3),
        "img_per_s": round(stats.good / seconds, 1) if seconds > 0 else None,
    }
