import pytest

from tests.processes import ServerProcess


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
