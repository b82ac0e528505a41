"""The console's static files (its stylesheet and the vendored htmx), served from a fixed list.

Why not ``StaticFiles``: the list is known at import, so no request path ever reaches the
file system, and the console mounts as one router.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from keel.gateway.console.errors import NotFoundHere
from keel.gateway.console.pages import PREFIX, ConsoleRoute

_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
_FILES = {item.name: (item.read_bytes(), _TYPES[suffix])
          for item in files("keel.gateway.console").joinpath("static").iterdir()
          if (suffix := "." + item.name.rsplit(".", 1)[-1]) in _TYPES}


def static_router() -> APIRouter:
    """``/console/static/{name}``."""
    router = APIRouter(prefix=f"{PREFIX}/static", route_class=ConsoleRoute, include_in_schema=False)

    @router.get("/{name}")
    async def static(name: str) -> Response:
        """One of the console's files, cacheable for an hour."""
        found = _FILES.get(name)
        if found is None:
            raise NotFoundHere(f"no file {name[:60]!r}")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "public, max-age=3600"})

    return router
