"""Sharing a run through the repository's S3 remote, against a real S3 server (SeaweedFS on 127.0.0.1).

The tiny run (tests/dvc_project.py) is pushed with the remote named in the repository's `.dvc/config`; the
endpoint and credentials are given per user, as the README says: `dvc remote modify --local` in the pushing
copy, the standard AWS environment variables in the pulling clone. A fresh `git clone` + `dvc pull` must give
byte-identical outputs, a clean `dvc status` and a `dvc repro` that recomputes nothing; before it, `dvc pull analysis`
must bring the viewer's inputs and nothing more (no hidden states). Adding a traced position must push only the new
shards and the changed small files (the hidden states are sharded by position). Wrong credentials must fail with
the server's refusal named and leave the cache and workspace as they were.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from dvc_project import ENV, ROOT, ran_stages, sh
from s3_server import anonymous_status, start_seaweedfs

from viewer.loaders import METRICS_FILES, PLOT_TABLES, load_analysis, load_metrics, load_plot_table
from viewer.views.early_exit import load_early_exit


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

    # the viewer's inputs only: the analysis directory from the remote, metrics and plots from git
    sh("dvc", "pull", "analysis", cwd=clone, env=credentials)
    analysis = lock_out(clone, "analysis")
    assert cache_objects(clone) == {analysis["md5"]} | dir_entries(tiny_project, analysis["md5"]), \
        "`dvc pull analysis` fetched more than the analysis directory"
    assert not (clone / lock_out(clone, "trace")["path"]).exists(), "`dvc pull analysis` brought hidden states"
    assert not (clone / lock_out(clone, "generate")["path"]).exists()
    assert len(load_analysis(clone)) == len(load_analysis(tiny_project))
    for name in METRICS_FILES:
        assert load_metrics(clone, name).model_dump_json() == load_metrics(tiny_project, name).model_dump_json()
    for name in PLOT_TABLES:
        assert load_plot_table(clone, name).equals(load_plot_table(tiny_project, name))

    # the early-exit tab's too: the runs and the forced answers, still no hidden states
    sh("dvc", "pull", "analysis", "generate", "forced_answers", cwd=clone, env=credentials)
    pulled, pushed = load_early_exit(clone), load_early_exit(tiny_project)
    assert pulled.runs.equals(pushed.runs) and pulled.forced.equals(pushed.forced)
    assert not (clone / lock_out(clone, "trace")["path"]).exists()

    sh("dvc", "pull", cwd=clone, env=credentials)

    outputs = pipeline_outputs(tiny_project)
    assert pipeline_outputs(clone) == outputs
    differing = [p for p in outputs if (clone / p).read_bytes() != (tiny_project / p).read_bytes()]
    assert not differing, f"pulled outputs differ from the pushed run: {differing}"
    assert "up to date" in sh("dvc", "status", cwd=clone).stdout
    assert "in sync" in sh("dvc", "status", "--cloud", cwd=clone, env=credentials).stdout
    assert ran_stages(sh("dvc", "repro", cwd=clone).stdout) == []


@pytest.mark.slow
def test_a_new_traced_position_pushes_only_its_shards(tiny_project, s3_server):
    """The hidden states are one file per (dataset, position): after a push, tracing one more position and pushing
    again sends its two shards (id, ood) and the two meta files (and the directory listing), nothing else."""
    use_remote(tiny_project, s3_server, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    sh("dvc", "push", cwd=tiny_project)
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["trace"]["positions"].append("think_10")
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = lock_out(tiny_project, "trace")["md5"]
    sh("dvc", "repro", "--single-item", "trace", cwd=tiny_project)
    after = lock_out(tiny_project, "trace")["md5"]
    old, new = dir_listing(tiny_project, before), dir_listing(tiny_project, after)
    changed = sorted(path for path, md5 in new.items() if old.get(path) != md5)
    assert changed == ["id/think_10.npy", "id_meta.json", "ood/think_10.npy", "ood_meta.json"]
    pushed = sh("dvc", "push", "trace", cwd=tiny_project).stdout
    assert re.search(r"\b4 files pushed", pushed), pushed  # the 4 changed files (DVC does not count the listing)
    assert "in sync" in sh("dvc", "status", "--cloud", "trace", cwd=tiny_project).stdout  # and nothing else missing


def lock_out(project: Path, stage: str) -> dict:
    """The directory output of ``stage`` in ``project``'s dvc.lock (its cost record, also listed, left out)."""
    outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]["outs"]
    [out] = [out for out in outs if out["md5"].endswith(".dir")]
    return out


def cache_objects(project: Path) -> set[str]:
    """The md5 of every object in the project's DVC cache (``.dir`` listings keep their suffix)."""
    root = project / ".dvc/cache/files/md5"
    return {p.parent.name + p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def dir_listing(project: Path, dir_md5: str) -> dict[str, str]:
    """relpath -> md5 of a directory output, from its ``.dir`` object in the project's cache."""
    path = project / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]
    return {entry["relpath"]: entry["md5"] for entry in json.loads(path.read_text())}


def dir_entries(project: Path, dir_md5: str) -> set[str]:
    return set(dir_listing(project, dir_md5).values())


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
