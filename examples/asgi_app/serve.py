"""The same instance started from Python: ``REUSEPORT_STANDBY_ROLE=primary python serve.py``.

``run`` takes ``uvicorn.Config``'s keywords, minus the addresses (the
supervisor owns them); role and service come from the environment here.
"""

import logging

from reuseport_standby.uvicorn import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raise SystemExit(run("app:create_app", factory=True, workers=2, timeout_graceful_shutdown=20))
