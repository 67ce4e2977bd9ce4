"""The Hugging Face Hub, offline or unreachable: models and ``hf:`` datasets fail fast, saying how to fix it.

stages/lib/hub.py asks the Hub once through huggingface_hub (its session, timeout, ``HF_ENDPOINT`` and proxy
variables); stages/lib/models/loading.py turns the answer into "load from the Hub", "load the cached copy" or a one-line
error. huggingface_hub reads ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_HOME`` when it is imported and the proxy
variables when its session opens, so every case runs in a fresh interpreter with its own environment. The Hub
itself is never reached: a closed port on 127.0.0.1 stands for an unreachable Hub, and a small HTTP proxy on
127.0.0.1 answers for a Hub behind a proxy. Besides a generous bound on the whole subprocess, the speed is checked
by what did not happen: no "Retrying in ..." line from huggingface_hub's retry loop (about 50 s in all).
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from stages.lib.models import loading as models
from stages.lib.models.loading import ModelSource

REPO = Path(__file__).resolve().parents[1]
MISSING = "sep-tests/no-such-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_python(script: str, tmp_path: Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter with a clean environment: an empty HOME and HF_HOME under ``tmp_path``."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
            "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_TELEMETRY": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd or REPO, env=base | env, capture_output=True,
                            text=True, timeout=180)
    assert time.perf_counter() - started < 60, result.stderr[-2000:]  # transformers alone retries for ~50 s
    assert "Retrying in" not in result.stderr, result.stderr[-2000:]
    return result


LOAD = ("from stages.lib.models import loading as models\n"
        "try:\n"
        "    model, _ = models.load_model({name!r}, 'unused')\n"
        "    print('LOADED', type(model).__name__)\n"
        "except models.ModelNotAvailableError as error:\n"
        "    print('ERROR', error)\n")


# ---- a missing model ----------------------------------------------------------------------------------------
def test_offline_without_a_cached_copy_fails_at_once_naming_the_fixes(tmp_path):
    result = run_python(LOAD.format(name=MISSING), tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip()
    assert message.startswith(f"ERROR model.name={MISSING!r}: HF_HUB_OFFLINE=1 and the model is not in the "
                              f"Hugging Face cache") and "\n" not in message
    assert f"`hf download {MISSING}`" in message and "local directory" in message
    assert str(tmp_path / "hf" / "hub") in message  # where `hf download` puts it


def test_an_unreachable_hub_without_a_cached_copy_fails_at_once_naming_the_fixes(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = run_python(LOAD.format(name=MISSING), tmp_path, HF_ENDPOINT=endpoint)
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip()
    assert message.startswith(f"ERROR model.name={MISSING!r}: the Hugging Face Hub ({endpoint}) did not answer (")
    assert "not in the cache" in message and f"`hf download {MISSING}`" in message and "HF_HUB_OFFLINE=1" in message
    assert "local directory" in message and "\n" not in message


def test_the_generate_stage_prints_the_one_line_error_and_exits_2(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["name"] = MISSING
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_python("from stages.lib.io.files import run_stage\nfrom stages import generate\n"
                        "run_stage(generate.main, generate.__doc__)\n", tmp_path, cwd=project, HF_HUB_OFFLINE="1")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model.name={MISSING!r}: HF_HUB_OFFLINE=1") and "hf download" in last
    assert "Traceback" not in result.stderr


def test_a_missing_local_directory_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(models.ModelNotAvailableError, match=r"no such local directory, and not a Hugging Face repo"):
        models.model_source(str(tmp_path / "nowhere"), "unused")


def test_an_untrained_toy_model_says_to_run_its_stage(tmp_path):
    (tmp_path / "toy_model").mkdir()  # what the toy_model stage leaves when model.name is not `toy`
    with pytest.raises(models.ModelNotAvailableError, match=r"toy model has not been trained .*dvc repro toy_model"):
        models.load_model("toy", tmp_path / "toy_model")


# ---- a cached copy ------------------------------------------------------------------------------------------
def cache_copy(tiny_lm_dir: Path, hf_home: Path, repo_id: str) -> None:
    """``tiny_lm_dir`` laid out as huggingface_hub's cache holds a downloaded repo (refs/main -> a snapshot)."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in tiny_lm_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_a_cached_copy_loads_without_asking_again(tiny_lm_dir, tmp_path, offline):
    repo_id = "sep-tests/tiny-cached"
    cache_copy(tiny_lm_dir, tmp_path / "hf", repo_id)
    env = {"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    script = ("import torch\nfrom stages.lib.models import loading as models\n"
              f"model, tokenizer = models.load_model({repo_id!r}, 'unused')\n"
              "ids = torch.tensor([tokenizer('12+7-5')['input_ids']])\n"
              "print('LOGITS', model(ids).logits[0, -1, :4].tolist())\n")
    result = run_python(script, tmp_path, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ids = torch.tensor([[int(i) for i in models.AutoTokenizer.from_pretrained(tiny_lm_dir)("12+7-5")["input_ids"]]])
    logits = json.loads(result.stdout.split("LOGITS", 1)[1])
    assert logits == pytest.approx(reference(ids).logits[0, -1, :4].tolist(), abs=1e-6)
    assert ("loading the cached copy" in result.stderr) is not offline


def test_from_pretrained_kwargs():
    assert ModelSource("org/x").from_pretrained_kwargs() == {}
    assert ModelSource("org/x", "v1", local_files_only=True).from_pretrained_kwargs() == {
        "local_files_only": True, "revision": "v1"}


# ---- a Hub behind a proxy -----------------------------------------------------------------------------------
class FakeHubProxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy that answers the Hub's metadata API itself: repos in ``known`` exist, others are 404."""

    known = {"/api/models/sep-tests/tiny", "/api/datasets/openai/gsm8k"}
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append(self.path)  # a proxy gets the absolute URL: http://hub.invalid/api/...
        path = self.path.removeprefix("http://hub.invalid").split("?")[0]
        found = self.path.startswith("http://hub.invalid/") and path in self.known
        body = json.dumps({"id": path.split("/", 3)[3], "sha": COMMIT} if found else {"error": "not found"}).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        if not found:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    FakeHubProxy.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHubProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_the_reachability_check_goes_through_the_proxy(proxy, tmp_path):
    """hub.invalid does not resolve: only a check that honours HTTP_PROXY (as the downloads do) can reach it."""
    script = ("from stages.lib import hub\nfrom stages.lib.questions import sources as questions\n"
              "print('MODEL', hub.unreachable_reason('sep-tests/tiny'))\n"
              "print('DATASET', questions.hub_unreachable_reason(questions.HUB_DATASETS['hf:gsm8k']))\n"
              "try:\n"
              "    hub.unreachable_reason('sep-tests/gone')\n"
              "except hub.HubRepoError as error:\n"
              "    print('GONE', error)\n"
              "try:\n"
              "    questions.build_dataset('ood', 'hf:math500', 5, 0, None)\n"
              "except questions.QuestionSourceError as error:\n"
              "    print('MATH500', error)\n")
    result = run_python(script, tmp_path, HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=proxy)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["MODEL"] == "None" and lines["DATASET"] == "None"
    assert lines["GONE"].startswith("model 'sep-tests/gone': not found on the Hub, or private or gated")
    assert lines["MATH500"].startswith("data source `hf:math500`: dataset 'HuggingFaceH4/MATH-500': not found")
    assert "http://hub.invalid/api/models/sep-tests/tiny" in [seen.split("?")[0] for seen in FakeHubProxy.seen]


def test_without_the_proxy_the_same_check_reports_the_hub_unreachable(tmp_path):
    result = run_python("from stages.lib import hub\nprint(hub.unreachable_reason('sep-tests/tiny'))\n",
                        tmp_path, HF_ENDPOINT="http://hub.invalid")
    assert result.returncode == 0 and result.stdout.strip() not in ("", "None"), result.stderr[-2000:]
