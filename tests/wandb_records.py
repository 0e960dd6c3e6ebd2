"""Read the records of an offline W&B run file (`run-*.wandb`), to check what a run logged.

The file is a 7-byte header then LevelDB-log-style 32 KiB blocks of chunks, each chunk with a 7-byte
header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); records are protobuf `Record`s.
"""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32 * 1024, 7


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def summarize(path: Path) -> dict:
    """The run's id, group, name, tags, the history rows' steps, and whether it was finished."""
    out = {"history_steps": [], "global_steps": [], "finished": False, "history_keys": set()}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, group=r.run.run_group, name=r.run.display_name, tags=list(r.run.tags))
        elif kind == "history":
            out["history_steps"].append(r.history.step.num)
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history_keys"].add(key)
                if key == "trainer/global_step":
                    out["global_steps"].append(int(float(item.value_json)))
        elif kind == "exit":
            out["finished"] = True
    return out
