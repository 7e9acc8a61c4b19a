"""URL routes: the read-only admin is the only web surface of the tool."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.staticfiles.views import serve
from django.urls import path, re_path

urlpatterns = [
    path("admin/", admin.site.urls),
    # The admin's own CSS and JavaScript, also with DEBUG off: the tool is served by
    # runserver to operators, never as a public site, and serves nothing else.
    re_path(r"^static/(?P<path>.*)$", serve, {"insecure": True}),
]
