"""Run one shard server outside Ray: ``python -m services.index --data-dir DIR``.

For operators (inspect or serve a shard directory on its own) and for the crash tests, which
SIGKILL it mid-write. SIGTERM/SIGINT drain in-flight calls, snapshot the index, exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from services.common.grpc_server import ServerOptions
from services.index.servicer import create_server
from services.index.vector_index import IndexSettings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.index", description=__doc__)
    p.add_argument("--data-dir", required=True, help="the shard's directory (store + snapshot)")
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed as JSON on stdout)")
    p.add_argument("--index-factory", default=IndexSettings().factory)
    p.add_argument("--approx-min-images", type=int, default=IndexSettings().approx_min_images)
    p.add_argument("--snapshot-every", type=int, default=IndexSettings().snapshot_every, help="changes between background snapshots")
    p.add_argument("--grace-s", type=float, default=5.0, help="seconds in-flight calls get on SIGTERM")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = IndexSettings(factory=args.index_factory, approx_min_images=args.approx_min_images, snapshot_every=args.snapshot_every)
    except ValueError as exc:
        p.error(str(exc))
    running, servicer = create_server(args.shard_id, ServerOptions(host=args.host, port=args.port), data_dir=args.data_dir, settings=settings)
    print(json.dumps({"address": f"{args.host}:{running.port}", "startup": servicer.index.startup.__dict__ if servicer.index else None}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop(args.grace_s)
    if servicer.index is not None:
        servicer.index.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
