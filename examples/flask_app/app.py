"""A minimal Flask app; nothing in it knows about reuseport-standby."""

import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index() -> str:
    role = os.environ.get("REUSEPORT_STANDBY_ROLE", "unmanaged")
    return f"hello from the {role} instance (pid {os.getpid()})\n"
