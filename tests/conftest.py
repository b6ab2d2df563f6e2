import pytest

from gapaware.common.security import CLIENT_ENV
from tests.inprocess import InProcessServer
from gapaware.processes import ServerProcess


@pytest.fixture(autouse=True)
def _no_token_from_the_shell(monkeypatch):
    """A GAPAWARE_TOKEN in the developer's shell would make every server the tests start require it, and
    it or a GAPAWARE_TLS_* or GAPAWARE_TOKEN_FILE would change what every client sends."""
    for name in ("GAPAWARE_TOKEN", *CLIENT_ENV.values()):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def servers(tmp_path):
    """Starts servers on demand and kills any still running at the end of the test."""
    started: list[ServerProcess] = []

    def start(*flags: str, name: str = "server", env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(tmp_path, *flags, name=name, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def inprocess_servers():
    """Starts in-process servers (:class:`InProcessServer`) on demand and stops them at the end of the test."""
    started: list[InProcessServer] = []

    def start(state, options=None, port: int = 0) -> InProcessServer:
        server = InProcessServer(state, options, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
