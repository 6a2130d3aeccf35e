"""Run docker/compose.yaml's topology as plain processes, as `docker compose up` would run its containers.

No container engine runs on the CI machines, so tests/test_compose.py runs the compose file this
way. Each service gets what its container would get:

- its own network namespace and IP on one bridge (tests/netns.py), and compose's DNS: every
  service name resolves to its service's address, through /etc/netns/NS/hosts, which
  `ip netns exec` binds over /etc/hosts (the directories are removed at close);
- its secrets at /run/secrets/NAME, read-only bind mounts of the secret files, in a private
  mount namespace (`unshare --mount`, a tmpfs on /run/secrets), so the command lines stay the
  compose file's, /run/secrets paths included;
- the compose file's `command` and `environment`, and its `healthcheck.test`, run in the same
  namespaces; services start in `depends_on` order, each once its dependencies are healthy.

What differs, all of it documented here:
- the executable: the image runs `swarm-node`, `swarm` and `python` from /app/.venv/bin; here
  they are this interpreter with `-m node.cli`, `-m client.cli` or nothing (`EXECUTABLES`),
  so the checkout under test runs (a console script of the dev venv would import the editable
  install). Every argument after the executable is the compose file's, unchanged.
- the processes run as the test's user, not `user:`; `build`, `image`, `restart` and the image's
  ENV (PATH, and the offline flags of transformers: nothing here downloads either) do not apply;
- published `ports` bind the host's loopback; here a client dials the service on the LAN from
  its own namespace (the root namespace never connects to a namespace address).
- a healthcheck first waits for the service's `ready` line (an event, not a sleep), then runs
  the compose test every `start_interval` until it passes or `retries` runs after
  `start_period` failed, as the engine would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.netns import Host, Lan, Lines

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker" / "compose.yaml"
SECRETS_DIR = Path("/run/secrets")
ETC_NETNS = Path("/etc/netns")

# the image's executables (/app/.venv/bin/...) -> this checkout's
EXECUTABLES = {
    "swarm-node": [sys.executable, "-m", "node.cli"],
    "swarm": [sys.executable, "-m", "client.cli"],
    "python": [sys.executable],
}

# mount a tmpfs on /run/secrets, bind each SOURCE read-only at /run/secrets/NAME, then exec the
# command: `sh -c MOUNT sh SOURCE NAME ... -- COMMAND...`
_MOUNT_SECRETS = r"""set -e
mount -t tmpfs -o mode=0755,size=1m layerswarm-secrets /run/secrets
while [ "$1" != "--" ]; do
  : > "/run/secrets/$2"
  mount --bind "$1" "/run/secrets/$2"
  mount -o remount,bind,ro "/run/secrets/$2"
  shift 2
done
shift
exec "$@"
"""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def load(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as a mapping (YAML merge keys resolved, as compose does)."""
    with path.open() as file:
        return yaml.safe_load(file)


def duration(text: str | float | None, default: float) -> float:
    """Compose's durations ('1m30s', '2s', '500ms') in seconds."""
    if text is None:
        return default
    if isinstance(text, (int, float)):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def dependencies(service: dict[str, Any]) -> dict[str, str]:
    """`depends_on` in either syntax: {service: condition}."""
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return {name: "service_started" for name in depends}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in depends.items()}


def start_waves(services: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Services grouped by when they can start: each wave depends only on earlier ones."""
    waves, placed = [], set()
    while len(placed) < len(services):
        wave = [name for name in services if name not in placed and set(dependencies(services[name])) <= placed]
        if not wave:
            raise ValueError(f"depends_on has a cycle among {sorted(set(services) - placed)}")
        waves.append(wave)
        placed.update(wave)
    return waves


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def executable(argv: list[str]) -> list[str]:
    """`argv` with its executable mapped to this checkout's (EXECUTABLES); the rest unchanged."""
    if argv[0] not in EXECUTABLES:
        raise ValueError(f"{argv[0]!r} is not an executable of the image (one of {sorted(EXECUTABLES)})")
    return [*EXECUTABLES[argv[0]], *argv[1:]]


def health_argv(test: list[str] | str) -> list[str]:
    """The argv of a compose healthcheck `test`."""
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    if kind == "CMD":
        return executable(rest)
    if kind == "CMD-SHELL":
        return ["sh", "-c", rest[0]]
    raise ValueError(f"healthcheck test {test!r}: CMD or CMD-SHELL expected")


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    host: Host
    process: subprocess.Popen[str] | None = None
    lines: Lines | None = None
    healthy: bool = False


@dataclass
class Topology:
    """The compose file's services as processes on one LAN; `up()`, then `url_of`, `run_client`, `close()`."""

    compose: dict[str, Any]
    project_dir: Path  # where the compose file's relative paths (the secret files) are resolved
    lan: Lan = field(init=False)
    services: dict[str, Service] = field(default_factory=dict)
    client: Host | None = None  # a namespace of its own, for parties outside the services
    _made_secrets_dir: bool = False
    _made_etc_netns: bool = False
    _netns_dirs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        specs = self.compose["services"]
        self.lan = Lan(len(specs) + 1).__enter__()
        try:
            for (name, spec), host in zip(specs.items(), self.lan.hosts):
                self.services[name] = Service(name, spec, host)
            self.client = self.lan.hosts[-1]
            self._write_hosts()
            if not SECRETS_DIR.exists():  # a mount point for the tmpfs each service mounts in its own namespace
                SECRETS_DIR.mkdir(parents=True)
                self._made_secrets_dir = True
        except BaseException:
            self.close()
            raise

    def _write_hosts(self) -> None:
        """Compose's DNS: in every namespace, each service name resolves to its address."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{service.host.address} {name}" for name, service in self.services.items()]
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir(parents=True)
            self._made_etc_netns = True
        for host in self.lan.hosts:
            folder = ETC_NETNS / host.namespace
            folder.mkdir(parents=True)
            self._netns_dirs.append(folder)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def _secret_mounts(self, service: Service) -> list[str]:
        """`SOURCE NAME` pairs of the service's secrets (short syntax: target = name; or long `source`/`target`)."""
        declared = self.compose.get("secrets") or {}
        pairs = []
        for entry in service.spec.get("secrets") or []:
            source, target = (entry, entry) if isinstance(entry, str) else (entry["source"], entry.get("target", entry["source"]))
            path = self.project_dir / declared[source]["file"]
            pairs += [str(path.resolve()), target]
        return pairs

    def _run(self, service: Service, argv: list[str], **popen: Any) -> subprocess.Popen[str]:
        """`argv` in the service's network namespace, with its secrets mounted and its environment."""
        wrapped = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _MOUNT_SECRETS, "sh", *self._secret_mounts(service), "--", *argv]
        env = {**os.environ, **environment(service.spec)}
        return self.lan.run_in(service.host, wrapped, env=env, **popen)

    def up(self, timeout_s: float = 300.0) -> None:
        """Start every service in depends_on order, each wave once the services it needs are healthy."""
        deadline = time.monotonic() + timeout_s
        for wave in start_waves(self.compose["services"]):
            for name in wave:
                self._check_conditions(name)
                service = self.services[name]
                service.process = self._run(service, executable(service.spec["command"]), stderr=subprocess.STDOUT)
                service.lines = Lines(service.process.stdout)
            with ThreadPoolExecutor(len(wave)) as pool:  # the engine checks them all at once, too
                for waited in [pool.submit(self.wait_healthy, name, deadline) for name in wave]:
                    waited.result()

    def _check_conditions(self, name: str) -> None:
        for dependency, condition in dependencies(self.services[name].spec).items():
            if condition == "service_healthy":
                assert self.services[dependency].healthy, f"{name} needs {dependency} healthy"
            elif condition == "service_started":
                assert self.services[dependency].process is not None
            else:
                raise ValueError(f"{name}: depends_on condition {condition!r} is not run here")

    def wait_healthy(self, name: str, deadline: float) -> None:
        """The compose healthcheck of `name`, run as the engine would once the service said it is ready."""
        service = self.services[name]
        check = service.spec.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        start_period = duration(check.get("start_period"), 0.0)
        interval, start_interval = duration(check.get("interval"), 30.0), duration(check.get("start_interval"), 5.0)
        timeout, retries = duration(check.get("timeout"), 30.0), int(check.get("retries", 3))
        started = time.monotonic()
        # the event: the ready line (or the end of the output, which fails below)
        service.lines.expect(lambda line: line.startswith("ready"), min(start_period or timeout, deadline - started))
        failures, last = 0, ""
        while time.monotonic() < deadline:
            probe = self._run(service, health_argv(check["test"]), stderr=subprocess.STDOUT)
            try:
                output, _ = probe.communicate(timeout=timeout)
                code = probe.returncode
            except subprocess.TimeoutExpired:
                probe.kill()
                output, code = probe.communicate()[0], -1
            if code == 0:
                service.healthy = True
                return
            last = output
            assert service.process.poll() is None, f"{name} exited with {service.process.returncode}: {service.lines.seen[-10:]}"
            in_start_period = time.monotonic() - started < start_period
            failures += 0 if in_start_period else 1
            if failures >= retries:
                break
            time.sleep(start_interval if in_start_period else interval)  # the engine's own schedule
        raise AssertionError(f"{name} is not healthy: {last.strip()[-500:]}; its output: {service.lines.seen[-10:]}")

    def run_client(self, argv: list[str], timeout_s: float = 120.0, **popen: Any) -> str:
        """Run `argv` in the client's namespace (a party beside the services); its stdout."""
        process = self.lan.run_in(self.client, argv, **popen)
        output, _ = process.communicate(timeout=timeout_s)
        assert process.returncode == 0, f"{argv[:3]} exited with {process.returncode}: {output[-2000:]}"
        return output

    def stop(self, timeout_s: float | None = None) -> dict[str, int]:
        """SIGTERM every service, the last started first, as `docker compose stop`; their exit codes."""
        codes = {}
        for name in reversed(list(self.services)):
            process = self.services[name].process
            if process is None:
                continue
            grace = timeout_s if timeout_s is not None else duration(self.services[name].spec.get("stop_grace_period"), 10.0)
            if process.poll() is None:
                process.terminate()
            try:
                codes[name] = process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        return codes

    def close(self) -> None:
        """Stop everything, delete the namespaces and every file this made outside the test's tmp."""
        try:
            self.stop(timeout_s=5.0)
            self.lan.close()
        finally:
            for folder in self._netns_dirs:
                shutil.rmtree(folder, ignore_errors=True)
            for made, folder in ((self._made_secrets_dir, SECRETS_DIR), (self._made_etc_netns, ETC_NETNS)):
                if made:
                    try:
                        folder.rmdir()
                    except OSError:
                        pass  # a concurrent run uses it; it removes it itself
