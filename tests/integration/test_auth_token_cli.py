"""``inference-auth-token`` as a user runs it, with the real globus-sdk against the local Globus stand-in."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from packaging.requirements import Requirement

from compute_functions.model_server import free_port
from tests.globus_fake import NATIVE_CLIENT_ID, SCOPE, FakeGlobus
from tests.support import REPO, endpoint, gateway

SCRIPT = REPO / "scripts" / "inference-auth-token.py"


@pytest.fixture
def fake() -> Iterator[FakeGlobus]:
    with FakeGlobus() as server:
        yield server


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def environment(fake: FakeGlobus, home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **fake.env(),
        "HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "INFERENCE_AUTH_CLIENT_ID": NATIVE_CLIENT_ID,
        "INFERENCE_GATEWAY_SCOPE": SCOPE,
        **extra,
    }


def run(
    fake: FakeGlobus, home: Path, *args: str, python: str = sys.executable, script: Path = SCRIPT, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, str(script), *args],
        capture_output=True,
        text=True,
        env=environment(fake, home, **extra),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def authenticate(
    fake: FakeGlobus, home: Path, *args: str, python: str = sys.executable, script: Path = SCRIPT, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``authenticate``, with the test playing the browser: open the printed URL, paste back the code."""
    process = subprocess.Popen(
        [python, str(script), "authenticate", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(fake, home, **extra),
    )
    assert process.stdout is not None and process.stdin is not None
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith(f"{fake.url}v2/oauth2/authorize?"):
            break
    else:
        stdout, stderr = process.communicate(timeout=30)
        return subprocess.CompletedProcess(process.args, process.returncode, "".join(printed) + stdout, stderr)
    browser = httpx.get(line.strip(), follow_redirects=False)
    code = parse_qs(urlsplit(browser.headers["location"]).query)["code"][0]
    stdout, stderr = process.communicate(code + "\n", timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(printed) + stdout, stderr)


def token_file(home: Path) -> Path:
    return home / ".globus" / "app" / NATIVE_CLIENT_ID / "inference-gateway" / "tokens.json"


def stored(home: Path) -> dict[str, Any]:
    data = json.loads(token_file(home).read_text())["data"]["DEFAULT"]
    (tokens,) = data.values()
    return dict(tokens)


def test_login_stores_private_tokens_and_prints_a_valid_access_token(fake: FakeGlobus, home: Path) -> None:
    result = authenticate(fake, home, "--policy", "policy-1")
    assert result.returncode == 0, result.stderr
    assert "Logged in" in result.stderr
    asked = fake.authorize_params[-1]
    assert asked["client_id"] == NATIVE_CLIENT_ID and SCOPE in asked["scope"].split()
    assert asked["access_type"] == "offline" and asked["code_challenge_method"] == "S256"
    assert asked["session_required_policies"] == "policy-1" and "prompt" not in asked
    assert stat.S_IMODE(token_file(home).stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file(home).parent.stat().st_mode) == 0o700
    tokens = stored(home)
    assert tokens["refresh_token"] and tokens["scope"] == SCOPE

    printed = run(fake, home, "get_access_token")
    assert printed.returncode == 0 and printed.stdout.strip() == tokens["access_token"]
    assert fake.active(tokens["access_token"]) and fake.calls["refresh"] == 0
    hours = run(fake, home, "get_time_until_token_expiration", "--units", "hours")
    assert 47.9 < float(hours.stdout) <= 48.0

    again = run(fake, home, "authenticate")
    assert again.returncode == 0 and "Already logged in" in again.stderr and len(fake.authorize_params) == 1


def test_a_token_about_to_expire_is_refreshed(fake: FakeGlobus, home: Path) -> None:
    fake.login.lifetime = 30
    assert authenticate(fake, home).returncode == 0
    first = stored(home)
    assert float(run(fake, home, "get_time_until_token_expiration").stdout) <= 30
    fake.login.lifetime = 172_800
    printed = run(fake, home, "get_access_token").stdout.strip()
    assert printed != first["access_token"] and fake.active(printed) and fake.calls["refresh"] == 1
    assert stored(home)["refresh_token"] == first["refresh_token"]
    assert run(fake, home, "get_access_token").stdout.strip() == printed and fake.calls["refresh"] == 1


def expire_stored_token(home: Path) -> None:
    document = json.loads(token_file(home).read_text())
    for tokens in document["data"]["DEFAULT"].values():
        tokens["expires_at_seconds"] = int(time.time()) - 10
    token_file(home).write_text(json.dumps(document))


def test_expired_refresh_token_tells_the_user_to_authenticate(fake: FakeGlobus, home: Path) -> None:
    assert authenticate(fake, home).returncode == 0
    fake.revoke(stored(home)["refresh_token"])
    expire_stored_token(home)
    result = run(fake, home, "get_access_token")
    assert result.returncode == 1 and result.stdout == ""
    assert "refresh token has expired or was revoked" in result.stderr
    assert "inference-auth-token authenticate" in result.stderr
    assert authenticate(fake, home).returncode == 0 and len(fake.authorize_params) == 2


def test_revoke_ends_the_tokens_at_globus_and_on_disk(fake: FakeGlobus, home: Path) -> None:
    assert authenticate(fake, home).returncode == 0
    tokens = stored(home)
    result = run(fake, home, "revoke")
    assert result.returncode == 0 and "revoked" in result.stderr
    assert not fake.active(tokens["access_token"]) and fake.calls["revoke"] == 2
    assert json.loads(token_file(home).read_text())["data"]["DEFAULT"] == {}
    after = run(fake, home, "get_access_token")
    assert after.returncode == 1 and "Not logged in" in after.stderr


def test_force_logs_out_then_forces_a_fresh_login(fake: FakeGlobus, home: Path) -> None:
    assert authenticate(fake, home).returncode == 0
    old = stored(home)["access_token"]
    result = authenticate(fake, home, "--force")
    assert result.returncode == 0 and "Logging out first" in result.stderr
    assert not fake.active(old) and fake.authorize_params[-1]["prompt"] == "login"
    assert stored(home)["access_token"] != old


def test_not_logged_in(fake: FakeGlobus, home: Path) -> None:
    for command in ("get_access_token", "get_time_until_token_expiration"):
        result = run(fake, home, command)
        assert result.returncode == 1 and "Not logged in" in result.stderr and "authenticate" in result.stderr


def test_network_error_is_explained(fake: FakeGlobus, home: Path) -> None:
    assert authenticate(fake, home).returncode == 0
    expire_stored_token(home)
    result = run(fake, home, "get_access_token", GLOBUS_SDK_SERVICE_URL_AUTH=f"http://127.0.0.1:{free_port()}/")
    assert result.returncode == 1 and "Cannot reach Globus Auth" in result.stderr and "network" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_code_entered(fake: FakeGlobus, home: Path) -> None:
    result = run(fake, home, "authenticate")
    assert result.returncode == 1 and "No authorization code was entered" in result.stderr


def test_placeholder_client_id_is_refused_with_what_to_set(fake: FakeGlobus, home: Path) -> None:
    env = {key: value for key, value in environment(fake, home).items() if not key.startswith("INFERENCE_")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "get_access_token"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1 and "INFERENCE_AUTH_CLIENT_ID" in result.stderr


def test_flags_override_the_environment_and_the_module_runs_as_the_console_script(fake: FakeGlobus, home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.auth.token_cli", "get_access_token", "--client-id", "other-app"],
        capture_output=True,
        text=True,
        env=environment(fake, home),
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1 and str(home / ".globus" / "app" / "other-app") in result.stderr


IMPORTS_PROBE = """
import runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    pass
print(sorted({"starlette", "pydantic", "yaml", "httpx", "uvicorn", "redis", "gateway.config"} & set(sys.modules)))
"""


def test_the_script_needs_only_globus_sdk() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, str(SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert "usage: inference-auth-token" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout


# --- the one file, alone, with only globus-sdk -------------------------------------------------------------------


def _importable(distribution: str, found: dict[str, Path]) -> None:
    """The top-level modules of ``distribution`` and of everything it needs, by name, where they are installed."""
    dist = metadata.distribution(distribution)
    for file in dist.files or ():
        top = file.parts[0]
        # Its metadata too (the .dist-info folder): globus_sdk reads its own version from it.
        if top not in ("..", "__pycache__") and not top.endswith(".pth"):
            found.setdefault(top, Path(str(dist.locate_file(top))))
    for requirement in map(Requirement, dist.requires or ()):
        wanted = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        if wanted and requirement.name.lower() not in {name.lower() for name in found}:
            _importable(requirement.name, found)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python that can import globus-sdk and what it needs, and nothing else: a fresh virtual environment
    without the system's packages, whose one .pth names a folder holding links to globus_sdk and its dependencies
    (taken from this environment, so the test needs no network)."""
    root = tmp_path_factory.mktemp("bare-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = str(root / "venv" / "bin" / "python")
    only = root / "only-globus-sdk"
    only.mkdir()
    found: dict[str, Path] = {}
    _importable("globus-sdk", found)
    for name, path in found.items():
        (only / name).symlink_to(path)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "only-globus-sdk.pth").write_text(f"{only}\n")
    probe = subprocess.run(
        [
            python,
            "-c",
            "import globus_sdk, importlib.util as u; print([m for m in ('gateway', 'yaml', 'starlette', "
            "'pydantic', 'httpx') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    return python


def globus_gateway_config() -> dict[str, object]:
    return {
        "auth": {"providers": ["dev", "globus"], "globus": {"native_client_id": NATIVE_CLIENT_ID, "timeout": 2.0}},
        "endpoints": [endpoint(f"http://127.0.0.1:{free_port()}/v1")],
    }


def test_the_served_command_logs_in_alone_with_only_globus_sdk(
    fake: FakeGlobus, home: Path, tmp_path: Path, bare_python: str
) -> None:
    # The usage guide's way: download the command from the gateway, log in, use the token.
    with gateway(globus_gateway_config(), tmp_path, env=fake.gateway_env()) as server:
        base = f"http://127.0.0.1:{server.port}/resource_server"
        download = httpx.get(f"{base}/inference-auth-token.py")
        assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
        script = tmp_path / "downloads" / "inference-auth-token.py"
        script.parent.mkdir()
        script.write_text(download.text)
        assert f"DEFAULT_CLIENT_ID = {NATIVE_CLIENT_ID!r}" in download.text and repr(SCOPE) in download.text
        # No INFERENCE_AUTH_* variables: the served file knows its gateway.
        plain = {"INFERENCE_AUTH_CLIENT_ID": "", "INFERENCE_GATEWAY_SCOPE": ""}
        logged_in = authenticate(fake, home, python=bare_python, script=script, **plain)
        assert logged_in.returncode == 0, logged_in.stderr
        assert fake.authorize_params[-1]["client_id"] == NATIVE_CLIENT_ID
        printed = run(fake, home, "get_access_token", python=bare_python, script=script, **plain)
        assert printed.returncode == 0, printed.stderr
        whoami = httpx.get(f"{base}/whoami", headers={"authorization": f"Bearer {printed.stdout.strip()}"})
        assert whoami.status_code == 200 and whoami.json()["provider"] == "globus"


def test_a_dev_gateway_serves_a_command_that_points_to_the_dev_token(
    fake: FakeGlobus, home: Path, tmp_path: Path, bare_python: str
) -> None:
    config = {"auth": {"providers": ["dev"]}, "endpoints": [endpoint(f"http://127.0.0.1:{free_port()}/v1")]}
    with gateway(config, tmp_path) as server:
        url = f"http://127.0.0.1:{server.port}"
        script = tmp_path / "inference-auth-token.py"
        script.write_text(httpx.get(f"{url}/resource_server/inference-auth-token.py").text)
    plain = {"INFERENCE_AUTH_CLIENT_ID": "", "INFERENCE_GATEWAY_SCOPE": ""}
    for command in ("get_access_token", "authenticate"):
        result = run(fake, home, command, python=bare_python, script=script, **plain)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"The gateway at {url} takes dev tokens" in result.stderr
        assert "inference-gateway dev-token" in result.stderr
    assert not fake.authorize_params


def test_the_repository_script_copied_alone_runs_with_only_globus_sdk(
    fake: FakeGlobus, home: Path, tmp_path: Path, bare_python: str
) -> None:
    alone = tmp_path / "elsewhere" / "inference-auth-token.py"
    alone.parent.mkdir()
    shutil.copy(SCRIPT, alone)  # the file, not the link
    assert not alone.is_symlink()
    helped = subprocess.run([bare_python, str(alone), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "usage: inference-auth-token" in helped.stdout, helped.stderr
    assert authenticate(fake, home, python=bare_python, script=alone).returncode == 0
    printed = run(fake, home, "get_access_token", python=bare_python, script=alone)
    assert printed.returncode == 0 and fake.active(printed.stdout.strip())
    unset = run(fake, home, "get_access_token", python=bare_python, script=alone, INFERENCE_AUTH_CLIENT_ID="")
    assert unset.returncode == 1 and "inference-gateway dev-token" in unset.stderr
    assert "/resource_server/inference-auth-token.py" in unset.stderr
