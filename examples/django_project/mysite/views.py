import os

from django.http import HttpRequest, HttpResponse


def index(request: HttpRequest) -> HttpResponse:
    role = os.environ.get("REUSEPORT_STANDBY_ROLE", "unmanaged")
    return HttpResponse(f"hello from the {role} instance (pid {os.getpid()})\n", content_type="text/plain")
