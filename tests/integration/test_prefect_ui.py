"""The Prefect UI of a server on a port other than 4200 talks to that server's API, not to 127.0.0.1:4200."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_ui_settings_hand_out_this_servers_api_url(prefect_server):
    assert not prefect_server.url.endswith(":4200")  # a free port, so the default would be wrong
    settings = httpx.get(prefect_server.url + "/ui-settings", timeout=10).raise_for_status().json()
    assert settings["api_url"] == prefect_server.url + "/api"
