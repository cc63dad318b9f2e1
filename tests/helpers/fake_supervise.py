"""``reuseport-standby supervise`` over the in-memory kernel: the real loop, broker and control
socket, with no BPF and no root.  For the control-plane tests of the fast tier; takes the same
command line as ``supervise``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.fake_kernel import FakeKernel  # noqa: E402
from reuseport_standby import cli  # noqa: E402
from reuseport_standby.errors import ReuseportStandbyError  # noqa: E402
from reuseport_standby.supervisor import SuperviseOptions, Supervisor  # noqa: E402


def main(argv: list[str]) -> int:
    args = cli.build_parser().parse_args(["supervise", *argv])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sup = Supervisor(SuperviseOptions.from_args(args), open_group=FakeKernel().open_group, queues=dict)
    try:
        sup.start()
    except (ReuseportStandbyError, ValueError) as exc:  # as cli.main says it: one line, exit 1
        print(f"reuseport-standby: {exc}", file=sys.stderr)
        return 1
    try:
        sup.serve_forever(notify=False)
    finally:
        sup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
