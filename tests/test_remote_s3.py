"""Sharing a run through the repository's S3 remote, against a real S3 server (SeaweedFS on 127.0.0.1).

The tiny run (tests/dvc_project.py) is pushed with the remote named in the repository's `.dvc/config`; the
endpoint and credentials are given per user, as the README says: `dvc remote modify --local` in the pushing
copy, the standard AWS environment variables in the pulling clone. A fresh `git clone` + `dvc pull` must give
byte-identical outputs, a clean `dvc status` and a `dvc repro` that recomputes nothing. Wrong credentials must
fail with the server's refusal named and leave the cache and workspace as they were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from dvc_project import ENV, ROOT, ran_stages, sh
from s3_server import anonymous_status, start_seaweedfs


def dvc_config(project: Path, key: str) -> str:
    return sh("dvc", "config", key, cwd=project).stdout.strip()


def remote_bucket(project: Path) -> tuple[str, str]:
    """(name, bucket) of the default remote the repository's `.dvc/config` names."""
    name = dvc_config(project, "core.remote")
    url = dvc_config(project, f"remote.{name}.url")
    assert url.startswith("s3://"), f"default remote {name!r} is {url!r}, not an S3 URL"
    return name, url.removeprefix("s3://").split("/")[0]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """SeaweedFS serving the bucket of the repository's default remote; stopped at the end, pass or fail."""
    _, bucket = remote_bucket(ROOT)
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), bucket)
    yield server
    server.stop()


def use_remote(project: Path, server, *, access_key: str | None = None, secret_key: str | None = None) -> None:
    """Point the default remote at `server` for this copy only (`.dvc/config.local`, never committed)."""
    name, _ = remote_bucket(project)
    sh("dvc", "remote", "modify", "--local", name, "endpointurl", server.endpoint, cwd=project)
    if access_key is not None:
        sh("dvc", "remote", "modify", "--local", name, "access_key_id", access_key, cwd=project)
        sh("dvc", "remote", "modify", "--local", name, "secret_access_key", secret_key, cwd=project)


def aws_env(access_key: str, secret_key: str) -> dict[str, str]:
    return {**ENV, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}


def pipeline_outputs(project: Path) -> list[str]:
    """Every file under every `outs` path of dvc.lock (DVC-cached outputs and git-tracked metrics and plots)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    paths = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    assert paths, "dvc.lock lists no outputs"
    files = []
    for path in paths:
        target = project / path
        assert target.exists(), f"{path} (an output in dvc.lock) is missing in {project}"
        found = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        files += [str(p.relative_to(project)) for p in found]
    return files


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of every file of the workspace and the DVC cache (git internals and DVC's temp files left out)."""
    skip = {".git", ".dvc/tmp"}
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(project.rglob("*"))
            if p.is_file() and not any(str(p.relative_to(project)).startswith(s + "/") for s in skip)}


@pytest.mark.slow
def test_push_then_pull_into_a_fresh_clone_reproduces_the_run(tiny_project, s3_server, tmp_path):
    assert anonymous_status(f"{s3_server.endpoint}/{s3_server.bucket}/") == 403, "anonymous listing not refused"
    assert anonymous_status(f"{s3_server.endpoint}/{s3_server.bucket}/probe", "PUT", b"x") == 403

    use_remote(tiny_project, s3_server, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    assert sh("git", "status", "--porcelain", cwd=tiny_project).stdout == "", "per-user remote settings not ignored"
    assert s3_server.secret_key not in (tiny_project / ".dvc/config").read_text()
    pushed = sh("dvc", "push", cwd=tiny_project)
    assert "files pushed" in pushed.stdout, pushed.stdout
    assert "in sync" in sh("dvc", "status", "--cloud", cwd=tiny_project).stdout

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(tiny_project), str(clone), cwd=tmp_path)
    assert not (clone / "data/runs").exists()
    use_remote(clone, s3_server)
    credentials = aws_env(s3_server.access_key, s3_server.secret_key)
    sh("dvc", "pull", cwd=clone, env=credentials)

    outputs = pipeline_outputs(tiny_project)
    assert pipeline_outputs(clone) == outputs
    differing = [p for p in outputs if (clone / p).read_bytes() != (tiny_project / p).read_bytes()]
    assert not differing, f"pulled outputs differ from the pushed run: {differing}"
    assert "up to date" in sh("dvc", "status", cwd=clone).stdout
    assert "in sync" in sh("dvc", "status", "--cloud", cwd=clone, env=credentials).stdout
    assert ran_stages(sh("dvc", "repro", cwd=clone).stdout) == []


@pytest.mark.slow
def test_wrong_credentials_fail_clearly_and_change_nothing(tiny_project, s3_server, tmp_path):
    use_remote(tiny_project, s3_server, access_key=s3_server.access_key, secret_key="not-the-secret")
    before = snapshot(tiny_project)
    for command in ("push", "pull"):
        result = sh("dvc", command, cwd=tiny_project, check=False)
        assert result.returncode != 0, f"dvc {command} with a wrong secret succeeded"
        assert "403" in result.stderr and "Forbidden" in result.stderr, result.stderr
    assert snapshot(tiny_project) == before
    assert "up to date" in sh("dvc", "status", cwd=tiny_project).stdout

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(tiny_project), str(clone), cwd=tmp_path)
    use_remote(clone, s3_server)
    before = snapshot(clone)
    for env, refusal in [(aws_env(s3_server.access_key, "not-the-secret"), "Forbidden"),
                         (ENV, "Unable to locate credentials")]:
        result = sh("dvc", "pull", cwd=clone, env=env, check=False)
        assert result.returncode != 0 and refusal in result.stderr, result.stderr
        assert "failed to pull data from the cloud" in result.stderr, result.stderr
        assert snapshot(clone) == before, "a refused pull changed the workspace or the cache"
